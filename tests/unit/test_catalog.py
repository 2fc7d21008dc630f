"""The catalog is the one place per runbook: schedules live there, flows load lazily."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deployments.catalog import RUNBOOKS

REPO = Path(__file__).resolve().parents[2]


def _in_fresh_python(code: str, **env: str) -> str:
    """Run `code` in a new interpreter (nothing imported yet); return its stdout."""
    base = {k: v for k, v in os.environ.items() if k != "RUNBOOKS_POOL_CHECK_INTERVAL_S"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=base | env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout


def test_importing_the_catalog_imports_no_flow_and_loading_imports_one() -> None:
    out = _in_fresh_python(
        "import json, sys\n"
        "flows = lambda: sorted(m for m in sys.modules if m == 'flows' or m.startswith('flows.'))\n"
        "from deployments.catalog import by_deployment, RUNBOOKS\n"
        "before = flows()\n"
        "[rb for rb in RUNBOOKS if rb.entrypoint.startswith('flows.cert_replace:')][0].load()\n"
        "print(json.dumps([before, flows()]))"
    )
    before, after = json.loads(out)
    assert before == []
    assert "flows.cert_replace" in after
    assert {"flows.cert_expiry", "flows.db_pool_exhausted", "flows.pool_threshold"}.isdisjoint(
        after
    )


@pytest.mark.parametrize(
    ("env", "expected"), [({}, 300), ({"RUNBOOKS_POOL_CHECK_INTERVAL_S": "60"}, 60)]
)
def test_pool_check_interval_comes_from_the_environment(env: dict[str, str], expected: int) -> None:
    out = _in_fresh_python(
        "from deployments.catalog import by_deployment, RUNBOOKS\n"
        "print(by_deployment(RUNBOOKS)['pool-threshold/pool-threshold'].interval_s)",
        **env,
    )
    assert int(out) == expected


@pytest.mark.parametrize("rb", RUNBOOKS, ids=lambda rb: rb.name)
def test_no_flow_module_declares_a_schedule(rb: object) -> None:
    module = sys.modules[rb.load().fn.__module__]  # type: ignore[attr-defined]
    assert not [name for name in vars(module) if name.startswith("SCHEDULE")]


def test_every_runbook_declares_its_spec_once_where_post_incident_reads_it() -> None:
    from deployments.routing import _has_path
    from flows.spec import spec_of

    for rb in RUNBOOKS:
        # The catalog's entry and post-incident's lookup by name find the same object.
        assert spec_of(rb.name) is rb.spec, rb.name
        if rb.dry_run_field is not None:
            assert _has_path(rb.params_model(), rb.dry_run_field), rb.name
    fields = {rb.name: rb.dry_run_field for rb in RUNBOOKS}
    assert fields["pool-threshold"] == "remediation.dry_run"
    assert fields["db-pool-exhausted"] == "dry_run"
    assert fields["cert-expiry"] is None
