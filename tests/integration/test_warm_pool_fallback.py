"""A Prefect whose internals changed: the warm pool says so and the Runner runs everything.

The whole `make run` stack starts with a `sitecustomize` that deletes
`prefect.utilities.engine.propose_state_sync` in the receiver and its warm processes, as a
Prefect upgrade that renamed it would.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from deployments.warm_pool import missing_internals
from tests.fixtures.stack import running_stack
from tests.fixtures.triggers import alert, payload

HOOK = """
import sys
# The receiver (`-m deployments.cli receiver`) and its spawned warm processes only.
if sys.argv[-1] in ("receiver", "--multiprocessing-fork"):
    # Prefect's own modules keep the reference they imported; only a new lookup fails.
    import prefect.flow_engine
    import prefect.main
    import prefect.utilities.engine
    del prefect.utilities.engine.propose_state_sync
"""


def test_missing_internals_is_empty_on_the_installed_prefect() -> None:
    assert missing_internals() == []


def test_missing_internal_disables_the_pool_and_the_runner_runs_the_alert(tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    env = {"PYTHONPATH": str(hook), "RUNBOOKS_RECEIVER_SYNC_WAIT_S": "20"}
    with running_stack(tmp_path / "stack", pool_size=1, wait_warm=False, extra_env=env) as stack:
        assert "warm pool disabled, the Runner executes every run" in stack.log()
        assert "propose_state_sync is missing" in stack.log()
        health = httpx.get(f"{stack.receiver_url}/healthz", timeout=5).json()
        assert health["warm_idle"] == 0

        r = httpx.post(
            f"{stack.receiver_url}/alerts",
            json=payload(alert(namespace="fallback")),
            headers={"Authorization": f"Bearer {stack.token}"},
            timeout=30,
        )
        r.raise_for_status()
        (result,) = r.json()["alerts"]
        assert result["outcome"] == "started"
        assert result["executor"] == "runner"
        run_url = f"{stack.api_url}/flow_runs/{result['flow_run_id']}"
        deadline = time.monotonic() + 120
        state = None
        while time.monotonic() < deadline:
            state = httpx.get(run_url, timeout=5).json()["state"]["type"]
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(0.5)
        assert state == "COMPLETED"
