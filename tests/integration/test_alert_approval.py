"""Approval from the alert's own run (issue 19): an alert, a paused run, an approval through
the API as the UI sends it, and the same run acts; no second run.

Alertmanager's webhook (POST /alerts, served by uvicorn) -> the receiver, whose route for
`FlagStale` is `mode: approve` -> a run of the registered `stale-flag` deployment (the
throwaway runbook on the driver, tests/fixtures/throwaway_runbook.py, on a real Redis key),
executed the way the warm pool executes alert runs (`deployments.warm_pool.execute`) -> it
checks, plans and pauses -> `POST /flow_runs/{id}/resume` with the approval form's
`run_input` (the UI's Resume button) -> that same run measures again under the lock, asks the
receiver whether its alert still fires, and sets the key back. Resolved while it waits: the
same run, approved, changes nothing. A runbook with a severity (`paged-flag`) pages the
on-call as its run pauses, with the link to that run in the UI.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from uuid import UUID

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.settings import PREFECT_API_URL

from deployments.catalog import Runbook
from deployments.receiver import create_app
from deployments.routing import RoutingTable, validate_routing
from deployments.serve import to_deployments
from deployments.warm_pool import execute
from flows.common import run_link
from tasks.alerts import alert_status
from tests.fixtures.paged_flag import paged_flag
from tests.fixtures.prefect_runs import flow_run_artifacts
from tests.fixtures.throwaway_runbook import read_flag, stale_flag, stale_key
from tests.fixtures.triggers import (
    TOKEN,
    LiveServer,
    alert,
    bearer,
    payload,
    receiver_settings,
    serve_app,
)

#: The stand-in catalog: the throwaway runbook (the recipe's catalog entry), and the same
#: with a severity.
CATALOG = (
    Runbook(
        entrypoint="tests.fixtures.throwaway_runbook:stale_flag",
        description="Throwaway: a stale Redis flag, set back.",
        concurrency_limit=None,
    ),
    Runbook(
        entrypoint="tests.fixtures.paged_flag:paged_flag",
        description="Throwaway, paging high / database.",
        concurrency_limit=None,
    ),
)
TABLE = RoutingTable.model_validate(
    {
        "routes": [
            {
                "alertname": alertname,
                "runbook": runbook,
                "mode": "approve",
                "params": {"key": "${key}", "approval_timeout_s": 120},
            }
            for alertname, runbook in (("FlagStale", "stale-flag"), ("FlagPaged", "paged-flag"))
        ]
    }
)


@pytest.fixture(scope="module")
def served(prefect_api: None) -> None:
    """The stand-in catalog's deployment, registered as `make run` registers the real ones."""
    validate_routing(TABLE, CATALOG, "test")
    for deployment in to_deployments(CATALOG):
        deployment.apply()


@pytest.fixture
def receiver(served: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveServer]:
    """The receiver on a loopback port; runs ask it whether their alert still fires."""
    url = PREFECT_API_URL.value()
    assert url
    app = create_app(receiver_settings(sync_wait_s=10), TABLE, CATALOG, api_url=str(url))
    with serve_app(app) as server:
        monkeypatch.setenv("RUNBOOKS_ALERTS_RECEIVER_URL", server.url)
        monkeypatch.setenv("RUNBOOKS_ALERTS_RECEIVER_TOKEN", TOKEN)
        yield server


@pytest.fixture
def key() -> Iterator[str]:
    with stale_key("approval") as made:
        yield made


def fire(server: LiveServer, firing: dict[str, Any], runbook: str = "stale-flag") -> UUID:
    """Deliver the alert as Alertmanager does; the id of the run it started."""
    r = httpx.post(f"{server.url}/alerts", json=payload(firing), headers=bearer(), timeout=30)
    assert r.status_code == 200, r.text
    (result,) = r.json()["alerts"]
    assert result["outcome"] == "started", result
    assert result["deployment"] == f"{runbook}/{runbook}"
    return UUID(result["flow_run_id"])


def read_run(run_id: UUID) -> FlowRun:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def wait_paused(run_id: UUID, future: Future[str], timeout: float = 90) -> FlowRun:
    deadline = time.monotonic() + timeout
    while True:
        run = read_run(run_id)
        if run.state is not None and run.state.is_paused():
            return run
        if future.done():
            pytest.fail(f"the run ended instead of pausing: {future.result()}")
        if time.monotonic() > deadline:
            pytest.fail(f"run {run_id} never paused: {run.state}")
        time.sleep(0.2)


def approve_as_the_ui(run_id: UUID, approved: bool = True) -> None:
    """The UI's Resume form: `POST /flow_runs/{id}/resume` with the form's values."""
    url = PREFECT_API_URL.value()
    form = {"approved": approved, "approver": "alice", "reason": "INC-19 looked at the plan"}
    for _ in range(5):
        r = httpx.post(f"{url}/flow_runs/{run_id}/resume", json={"run_input": form}, timeout=30)
        if r.status_code != 503:  # Prefect's "retry me" (its SQLite busy): clients retry it
            break
        time.sleep(1)
    assert r.status_code in (200, 201), r.text
    assert r.json()["status"] == "ACCEPT", r.text


def deployment_runs() -> set[UUID]:
    """Every run of the `stale-flag` deployment, whoever started it (alert, UI, API)."""
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("stale-flag/stale-flag")
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        )
    return {r.id for r in runs}


def ended(run_id: UUID, future: Future[str]) -> FlowRun:
    """The run once its execution returned (the engine's final state)."""
    future.result(timeout=120)
    run = read_run(run_id)
    assert run.state is not None and run.state.is_final(), run.state
    return run


def history(run_id: UUID) -> list[StateType]:
    with get_client(sync_client=True) as client:
        return [s.type for s in client.read_flow_run_states(run_id)]


def test_an_alert_run_pauses_is_approved_in_the_ui_and_the_same_run_acts(
    receiver: LiveServer, key: str
) -> None:
    firing = alert(alertname="FlagStale", key=key, instance="flags-1")
    before = deployment_runs()
    run_id = fire(receiver, firing)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(execute, run_id, stale_flag)
        paused = wait_paused(run_id, future)
        # The alert's own run: acting parameters, the request filled in by the receiver.
        params = paused.parameters["params"]
        assert (params["dry_run"], params["auto_approve"]) == (False, False)
        assert params["requested_by"] == "alertmanager"
        assert params["reason"] == "alert FlagStale on flags-1"
        assert read_flag(key) == "stale"  # nothing changes while it waits
        approve_as_the_ui(run_id)
        run = ended(run_id, future)
    assert run.state is not None and run.state.is_completed(), run.state
    assert read_flag(key) == "ok"
    # Paused, then resumed: the same run, not a second one.
    states = history(run_id)
    assert StateType.PAUSED in states
    assert states[states.index(StateType.PAUSED) + 1 :].count(StateType.RUNNING) >= 1
    assert deployment_runs() - before == {run_id}
    # The alert's tags stayed on it, so the "still firing?" check applied (the receiver said).
    assert {"source:alert", f"alert:{firing['fingerprint']}", "alertname:FlagStale"} <= set(
        run.tags
    )
    (md,) = flow_run_artifacts(run_id, "stale-flag")
    assert "Alert still firing?" in md
    assert "**firing** (source: receiver" in md
    assert "approved by **alice**" in md
    assert "Re-planned after approval" in md and "**acted**" in md


def test_an_alert_that_resolves_while_its_run_waits_is_not_acted_on_after_approval(
    receiver: LiveServer, key: str
) -> None:
    firing = alert(alertname="FlagStale", key=key)
    run_id = fire(receiver, firing)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(execute, run_id, stale_flag)
        wait_paused(run_id, future)
        resolved = payload({**firing, "status": "resolved"}, status="resolved")
        r = httpx.post(f"{receiver.url}/alerts", json=resolved, headers=bearer(), timeout=30)
        assert r.status_code == 200, r.text
        # The receiver records the resolution as it answers; wait until it says so (a loaded
        # machine may take a moment), then approve: the run asks it before acting.
        deadline = time.monotonic() + 30
        while alert_status(firing["fingerprint"]).state != "resolved":
            assert time.monotonic() < deadline, "the receiver never reported the resolution"
            time.sleep(0.2)
        assert read_run(run_id).state.is_paused()  # type: ignore[union-attr]  # never cancelled
        approve_as_the_ui(run_id)
        run = ended(run_id, future)
    assert run.state is not None and run.state.is_completed(), run.state
    assert read_flag(key) == "stale"
    (md,) = flow_run_artifacts(run_id, "stale-flag")
    assert "**resolved** (source: receiver" in md
    assert "**skipped**" in md


def test_a_paused_alert_run_pages_the_on_call_at_once_with_its_link(
    receiver: LiveServer, key: str, world_env: Any
) -> None:
    world = world_env()
    run_id = fire(receiver, alert(alertname="FlagPaged", key=key), runbook="paged-flag")
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(execute, run_id, paged_flag)
        wait_paused(run_id, future)
        # High / database: the team lead, the incident channel and the database team, now,
        # not after the first reminder interval.
        (page,) = world.sink["db-team"].delivered
        assert "Approval needed: paged-flag: reset-flag" in page["text"]
        assert run_link(run_id) in page["text"]
        # And each allowed approver (the default rule: the on-call chain) its own links.
        assert world.pages() == {
            "team-lead": 2,
            "incidents": 1,
            "db-team": 1,
            "on-call": 1,
            "on-call-secondary": 1,
        }
        (request,) = world.sink["on-call"].delivered  # PagerDuty's shape
        assert "/approvals/" in str(request) and "asks on-call to approve" in str(request)
        approve_as_the_ui(run_id)
        run = ended(run_id, future)
    assert run.state is not None and run.state.is_completed(), run.state
    assert read_flag(key) == "ok"
