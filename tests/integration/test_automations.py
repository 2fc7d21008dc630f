"""The `crash-zombie-runs` automation on a real Prefect server (event + trigger services).

A warm process is SIGKILLed mid-run with nobody left to report the run's end (no pool owner
watching it): only the missing heartbeats tell. The window is Prefect's minimum here (10 s,
so the test takes seconds); production keeps it at least two heartbeats wide (StackSettings).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Scheduled

from deployments.automations import ZOMBIE_AUTOMATION, apply, declared
from deployments.warm_pool import worker_main
from tests.fixtures.stack import prefect_server
from tests.fixtures.stub_runbooks import stub_remediate

ENTRYPOINT = "tests.fixtures.stub_runbooks:stub_remediate"
WITHIN_S = 10  # Prefect's minimum for a proactive trigger


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with (
        prefect_server(tmp_path_factory.mktemp("prefect")) as api_url,
        temporary_settings(updates={PREFECT_API_URL: api_url}),
    ):
        yield api_url


def until(what: str, check: Callable[[], Any], timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.25)
    return value


def state_of(run_id: UUID) -> StateType | None:
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
    return state.type if state else None


def heartbeats(api_url: str, run_id: UUID) -> int:
    r = httpx.post(
        f"{api_url}/events/filter",
        json={
            "filter": {
                "event": {"name": ["prefect.flow-run.heartbeat"]},
                "resource": {"id": [f"prefect.flow-run.{run_id}"]},
            }
        },
        timeout=10,
    )
    r.raise_for_status()
    return int(r.json()["total"])


def scheduled_run(sleep_s: float) -> UUID:
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(
            stub_remediate, parameters={"params": {"sleep_s": sleep_s}}, state=Scheduled()
        )
    return run.id


def test_applying_twice_keeps_one_automation(server: str) -> None:
    first = apply(declared(WITHIN_S))
    second = apply(declared(WITHIN_S * 2))
    assert [a.id for a in second] == [a.id for a in first]
    with get_client(sync_client=True) as client:
        found = client.read_automations_by_name(ZOMBIE_AUTOMATION)
    assert len(found) == 1
    assert found[0].trigger.within.total_seconds() == WITHIN_S * 2  # type: ignore[union-attr]


def test_a_run_whose_warm_process_was_killed_ends_crashed(server: str) -> None:
    (applied,) = apply(declared(WITHIN_S))
    assert applied.enabled
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    env = {"PREFECT_API_URL": server, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
    worker = ctx.Process(target=worker_main, args=(child, [ENTRYPOINT], env), daemon=True)
    worker.start()
    child.close()
    try:
        assert parent.poll(120), "the warm process never got ready"
        assert parent.recv() == "ready"

        # Control: a run that ends normally sends its final state after its heartbeat, so the
        # automation leaves it alone.
        finished = scheduled_run(sleep_s=0)
        parent.send((str(finished), ENTRYPOINT))
        assert parent.poll(60), "the control run did not finish"
        assert parent.recv()[0] == "done"

        doomed = scheduled_run(sleep_s=120)
        parent.send((str(doomed), ENTRYPOINT))
        until("the run is Running", lambda: state_of(doomed) == StateType.RUNNING)
        until("its first heartbeat reached Prefect", lambda: heartbeats(server, doomed) >= 1)
        assert worker.pid is not None
        os.kill(worker.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        worker.join(10)

        until("the zombie run is Crashed", lambda: state_of(doomed) == StateType.CRASHED)
        # A figure for the docs, not an assertion: window + up to one evaluation period (5 s).
        print(f"zombie run Crashed {time.monotonic() - killed_at:.1f} s after SIGKILL")
        assert state_of(finished) == StateType.COMPLETED
    finally:
        if worker.is_alive():
            worker.kill()
            worker.join(5)


def test_stack_settings_feed_the_heartbeat_to_every_run(tmp_path: Path) -> None:
    from deployments.cli import base_env
    from deployments.settings import StackSettings

    env = base_env(StackSettings(home=tmp_path))
    assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
