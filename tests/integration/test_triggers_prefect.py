"""Receiver and warm pool against a real Prefect API (the session's test server)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

import httpx
import pytest
from fastapi.testclient import TestClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_URL

from deployments.prefect_runs import CreatedRun, PrefectRefused, PrefectRuns
from deployments.receiver import create_app
from deployments.serve import to_deployments
from deployments.warm_pool import WarmPool, execute
from tests.fixtures.stub_runbooks import STUB_RUNBOOKS, stub_remediate
from tests.fixtures.triggers import (
    alert,
    bearer,
    no_cooldown_table,
    payload,
    receiver_settings,
    stub_table,
)


@pytest.fixture(scope="session")
def stub_deployments(prefect_api: None) -> None:
    for deployment in to_deployments(STUB_RUNBOOKS):
        deployment.apply()


def api_url() -> str:
    url = PREFECT_API_URL.value()
    assert url
    return str(url)


def live_app(pool: WarmPool | None = None) -> Any:
    # Wait for the run id (the default 50 ms answers "accepted" under load): tests read it.
    return create_app(
        receiver_settings(sync_wait_s=10), stub_table(), STUB_RUNBOOKS, api_url=api_url(), pool=pool
    )


def runs_tagged(tag: str) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]))
        )


def wait_final(run_id: UUID, timeout: float = 60) -> FlowRun:
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"run {run_id} still {run.state}")
            time.sleep(0.2)


@pytest.mark.usefixtures("stub_deployments")
def test_firing_alert_creates_a_deployment_run_with_params_and_tags() -> None:
    a = alert(alertname="StubPlan", severity="critical", namespace="prod-x", fingerprint="live1")
    with TestClient(live_app()) as client:
        r = client.post("/alerts", json=payload(a), headers=bearer())
    assert r.status_code == 200, r.text
    (result,) = r.json()["alerts"]
    assert result["outcome"] == "started" and result["executor"] == "runner"
    (run,) = runs_tagged("alert:live1")
    assert str(run.id) == result["flow_run_id"]
    assert run.deployment_id is not None
    assert run.parameters == {"params": {"namespace": "prod-x", "dry_run": True}}
    assert {"source:alert", "alertname:StubPlan", "plan-only"} <= set(run.tags)
    assert run.idempotency_key == f"live1:{a['startsAt']}"
    assert run.state is not None and run.state.is_scheduled()


@pytest.mark.usefixtures("stub_deployments")
def test_resolved_and_unrouted_start_nothing() -> None:
    body = payload(
        alert(status="resolved", namespace="x", fingerprint="gone1"),
        alert(alertname="NotOurs", fingerprint="gone2"),
    )
    with TestClient(live_app()) as client:
        r = client.post("/alerts", json=body, headers=bearer())
    assert r.status_code == 200
    assert runs_tagged("alert:gone1") == [] and runs_tagged("alert:gone2") == []


@pytest.mark.usefixtures("stub_deployments")
def test_50_concurrent_identical_deliveries_start_exactly_one_run() -> None:
    """Two receiver instances (as with Alertmanager HA peers): no shared memory, one run."""
    body = json.dumps(payload(alert(namespace="x", fingerprint="storm1"))).encode()
    apps = [live_app(), live_app()]

    async def deliver() -> list[httpx.Response]:
        clients = [
            httpx.AsyncClient(transport=httpx.ASGITransport(app=a), base_url="http://r")
            for a in apps
        ]
        headers = {**bearer(), "content-type": "application/json"}
        try:
            return await asyncio.gather(
                *(clients[i % 2].post("/alerts", content=body, headers=headers) for i in range(50))
            )
        finally:
            for c in clients:
                await c.aclose()

    responses = asyncio.run(deliver())
    assert [r.status_code for r in responses] == [200] * 50
    outcomes = [r.json()["alerts"][0]["outcome"] for r in responses]
    assert outcomes.count("started") == 1
    assert outcomes.count("deduplicated") == 49
    assert len(runs_tagged("alert:storm1")) == 1


@pytest.mark.usefixtures("prefect_api")
def test_alert_for_a_deployment_not_served_yet_is_kept_until_it_is() -> None:
    from deployments.catalog import Runbook
    from deployments.journal import Journal

    table = stub_table().model_copy(
        update={
            "routes": [
                r.model_copy(update={"runbook": "never-served"}) for r in stub_table().routes
            ]
        }
    )
    runbooks = (
        *STUB_RUNBOOKS,
        Runbook(
            entrypoint="tests.fixtures.stub_runbooks:stub_remediate",
            description="",
            overrides={"name": "never-served"},
        ),
    )
    journal = Journal(None)
    app = create_app(receiver_settings(), table, runbooks, api_url=api_url(), journal=journal)
    with TestClient(app) as client:
        r = client.post("/alerts", json=payload(alert(namespace="x")), headers=bearer())
        assert r.status_code == 200
        assert r.json()["alerts"][0]["outcome"] == "accepted"
        time.sleep(1)
        assert len(journal.pending()) == 1  # retried in the background, not dropped


@contextmanager
def stub_pool(**kw: Any) -> Iterator[WarmPool]:
    """One warm process for the stub runbook, ready."""
    pool = WarmPool(
        {"stub-remediate/stub-remediate": "tests.fixtures.stub_runbooks:stub_remediate"},
        size=1,
        env={"PREFECT_API_URL": api_url()},
        **kw,
    )
    pool.start()
    try:
        assert pool.wait_ready(90), "warm process did not start"
        yield pool
    finally:
        pool.close()


@pytest.fixture
def warm_pool(stub_deployments: None) -> Iterator[WarmPool]:
    with stub_pool() as pool:
        yield pool


def three_alerts_run_once_each(pool: WarmPool, prefix: str, timeout: float) -> None:
    """Three alerts at once, all to the pool; each run completes, executed exactly once."""
    stamp = time.time_ns()
    alerts = [alert(namespace=f"{prefix}{i}", fingerprint=f"{prefix}{i}{stamp}") for i in range(3)]
    with TestClient(live_app(pool)) as client:
        r = client.post("/alerts", json=payload(*alerts), headers=bearer())
    results = r.json()["alerts"]
    assert [x["executor"] for x in results] == ["warm"] * 3
    for x in results:
        run = wait_final(UUID(x["flow_run_id"]), timeout=timeout)
        assert run.state is not None and run.state.is_completed(), run.state
        assert run.run_count == 1
    assert pool.wait_ready(90)


def test_warm_pool_executes_the_alert_run_as_a_normal_deployment_run(
    warm_pool: WarmPool,
) -> None:
    t0 = time.monotonic()
    with TestClient(live_app(warm_pool)) as client:
        r = client.post(
            "/alerts", json=payload(alert(namespace="w", fingerprint="warm1")), headers=bearer()
        )
    (result,) = r.json()["alerts"]
    assert result["executor"] == "warm"
    run = wait_final(UUID(result["flow_run_id"]))
    assert run.state is not None and run.state.is_completed(), run.state
    assert time.monotonic() - t0 < 30
    assert {"source:alert", "runbook:stub-remediate", "alert:warm1"} <= set(run.tags)
    with get_client(sync_client=True) as client:
        states = client.read_flow_run_states(run.id)
        tasks = client.read_task_runs()
    assert [s.type.value for s in states][:3] == ["SCHEDULED", "PENDING", "RUNNING"]
    assert any(t.flow_run_id == run.id and t.name.startswith("remediate-w") for t in tasks)
    # The pool replaced the process that ran it.
    assert warm_pool.wait_ready(90)


def test_a_busy_pool_queues_runs_and_runs_each_once_in_turn(warm_pool: WarmPool) -> None:
    # One process; three alerts at once: the first runs, two wait in the pool's queue (long
    # grace, so the Runner, absent here anyway, would not take them) and follow in turn.
    three_alerts_run_once_each(warm_pool, "queue", timeout=120)


def test_a_process_at_its_run_limit_is_recycled_and_no_run_is_lost(
    stub_deployments: None,
) -> None:
    """Limit 2, one process, three alerts at once: the third run waits for the fresh
    process (never handed to the one about to exit), and each run executes exactly once."""
    with stub_pool(max_runs=2) as pool:
        first_pid = pool._workers[0].process.pid
        three_alerts_run_once_each(pool, "recycle", timeout=180)
        assert pool._workers[0].process.pid != first_pid  # recycled after its 2 runs


def test_a_run_claimed_elsewhere_is_not_run_twice(stub_deployments: None) -> None:
    with TestClient(live_app()) as client:
        r = client.post(
            "/alerts", json=payload(alert(namespace="c", fingerprint="claim1")), headers=bearer()
        )
    run_id = UUID(r.json()["alerts"][0]["flow_run_id"])
    from prefect.states import Pending

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Pending())  # as the Runner would
    assert execute(run_id, stub_remediate).startswith("not claimed")


def test_saturated_or_closed_pool_leaves_the_run_to_the_runner() -> None:
    pool = WarmPool({"d/d": "tests.fixtures.stub_runbooks:stub_remediate"}, size=0)
    pool.start()
    assert pool.try_submit(UUID(int=1), "d/d") is False
    assert pool.try_submit(UUID(int=1), "unknown/unknown") is False
    pool.close()


def test_cancelling_a_warm_run_in_the_ui_stops_it(warm_pool: WarmPool) -> None:
    from datetime import UTC, datetime

    from prefect.states import Cancelling, Scheduled

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("stub-remediate/stub-remediate")
        run = client.create_flow_run_from_deployment(
            dep.id,
            parameters={"params": {"namespace": "slow", "sleep_s": 60}},
            state=Scheduled(scheduled_time=datetime.now(UTC)),
        )
        assert warm_pool.try_submit(run.id, "stub-remediate/stub-remediate")
        deadline = time.monotonic() + 60
        while not (client.read_flow_run(run.id).state or Scheduled()).is_running():
            assert time.monotonic() < deadline, "the warm run never started"
            time.sleep(0.2)
        client.set_flow_run_state(run.id, Cancelling(), force=True)  # the UI's Cancel button
    final = wait_final(run.id, timeout=30)
    assert final.state is not None and final.state.is_cancelled(), final.state
    assert warm_pool.wait_ready(90), "the terminated process was not replaced"


# --- Issue 8, item 5: Prefect's answers and resolved alerts, against the real API ----------


def read_state(run_id: str) -> str:
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(UUID(run_id)).state
    assert state is not None
    return state.type.value


def fire_then_resolve(fingerprint: str, before_resolve: list[Any]) -> tuple[str, dict[str, Any]]:
    """Fire an alert (run created, Scheduled), move the run through `before_resolve` states
    as the Runner and the engine would, then resolve the alert. (run id, answer)."""
    a = alert(namespace="r", fingerprint=fingerprint)
    with TestClient(live_app()) as client:
        fired = client.post("/alerts", json=payload(a), headers=bearer())
        run_id = fired.json()["alerts"][0]["flow_run_id"]
        with get_client(sync_client=True) as prefect:
            for state in before_resolve:
                result = prefect.set_flow_run_state(UUID(run_id), state)
                assert result.status.value == "ACCEPT", result.details
        resolved = client.post(
            "/alerts",
            json=payload({**a, "status": "resolved"}, status="resolved"),
            headers=bearer(),
        )
    return run_id, resolved.json()["alerts"][0]


@pytest.mark.usefixtures("stub_deployments")
def test_a_resolved_alert_cancels_its_scheduled_run() -> None:
    run_id, answer = fire_then_resolve("resolvesched", [])
    assert read_state(run_id) == "CANCELLED"
    assert answer["outcome"] == "cancelled"


@pytest.mark.usefixtures("stub_deployments")
def test_a_resolved_alert_cancels_its_pending_run() -> None:
    """Pending (claimed, process starting): CANCELLING, as the UI's Cancel button does; the
    Runner or warm pool that claimed it terminates the process and marks it Cancelled."""
    from prefect.states import Pending

    run_id, answer = fire_then_resolve("resolvepend", [Pending()])
    assert read_state(run_id) == "CANCELLING"
    assert answer["outcome"] == "cancelled"


@pytest.mark.usefixtures("stub_deployments")
def test_a_resolved_alert_never_cancels_a_running_run() -> None:
    from prefect.states import Completed, Pending, Running

    run_id, answer = fire_then_resolve("resolverun", [Pending(), Running()])
    state_after_resolve = read_state(run_id)
    with get_client(sync_client=True) as client:  # let it finish, as the engine would
        client.set_flow_run_state(UUID(run_id), Completed())
    assert state_after_resolve == "RUNNING"
    assert answer["outcome"] == "resolved"
    assert "RUNNING: left alone" in answer["detail"]


@pytest.mark.usefixtures("stub_deployments")
def test_a_late_resolve_of_an_earlier_occurrence_leaves_the_newer_run_alone() -> None:
    """Issue 18, item 5: the alert fired (occurrence 1), fired again with a new startsAt
    (occurrence 2, its own run: no cooldown on this route), then occurrence 1's resolve came
    late. It cancels occurrence 1's run only; occurrence 2's run stays Scheduled."""
    one = alert(namespace="r", fingerprint="lateresolve", starts_at="2026-11-27T03:00:00Z")
    two = {**one, "startsAt": "2026-11-27T03:20:00Z"}
    settings = receiver_settings(sync_wait_s=10)
    app = create_app(settings, no_cooldown_table(), STUB_RUNBOOKS, api_url=api_url())
    with TestClient(app) as client:
        run_one, run_two = (
            client.post("/alerts", json=payload(a), headers=bearer()).json()["alerts"][0][
                "flow_run_id"
            ]
            for a in (one, two)
        )
        late = {**one, "status": "resolved", "endsAt": "2026-11-27T03:10:00Z"}
        answer = client.post("/alerts", json=payload(late, status="resolved"), headers=bearer())
        alert_state = client.get("/alerts/lateresolve", headers=bearer()).json()["state"]
    assert answer.json()["alerts"][0]["outcome"] == "cancelled"
    assert read_state(run_one) == "CANCELLED"
    assert read_state(run_two) == "SCHEDULED"
    assert alert_state == "firing"


class CountingRuns(PrefectRuns):
    """The real client, counting its create calls."""

    creates = 0

    async def create_run(self, deployment: str, **kwargs: Any) -> CreatedRun:
        self.creates += 1
        return await super().create_run(deployment, **kwargs)


def test_prefect_refuses_parameters_outside_the_deployment_schema(
    stub_deployments: None,
) -> None:
    async def create() -> None:
        runs = PrefectRuns(api_url(), None, retry_s=2)
        try:
            await runs.create_run(
                "stub-remediate/stub-remediate",
                name="refused",
                parameters={"params": {"max_sessions": 100_000}},
                tags=[],
                idempotency_key=f"refused-{time.time()}",
                grace_s=0,
            )
        finally:
            await runs.aclose()

    with pytest.raises(PrefectRefused) as refused:
        asyncio.run(create())
    assert refused.value.status == 409


@pytest.mark.usefixtures("stub_deployments")
def test_a_run_prefect_refuses_is_journaled_failed_and_asked_once() -> None:
    from deployments.catalog import Runbook
    from deployments.journal import Journal
    from deployments.routing import RoutingTable

    table = RoutingTable.model_validate(
        {
            "routes": [
                {
                    "alertname": "StubLoose",
                    "runbook": "stub-remediate",
                    "mode": "auto",
                    "params": {"namespace": "${namespace}", "max_sessions": "${n}"},
                }
            ]
        }
    )
    loose = (
        Runbook(
            entrypoint="tests.fixtures.triggers:loose_stub_remediate",
            description="",
        ),
    )
    journal = Journal(None)
    runs = CountingRuns(api_url(), None, 2.0)
    app = create_app(
        receiver_settings(sync_wait_s=10),
        table,
        loose,
        api_url=api_url(),
        runs=runs,
        journal=journal,
    )
    a = alert(alertname="StubLoose", namespace="x", n="5000", fingerprint="refused1")
    with TestClient(app) as client:
        first = client.post("/alerts", json=payload(a), headers=bearer())
        again = client.post("/alerts", json=payload(a), headers=bearer())
    record = journal.get(f"refused1:{a['startsAt']}")
    assert first.json()["alerts"][0]["outcome"] == "refused"
    assert again.json()["alerts"][0]["outcome"] == "deduplicated"
    assert record is not None and record.status == "failed"
    assert record.reason is not None and "HTTP 409" in record.reason
    assert runs.creates == 1
    assert runs_tagged("alert:refused1") == []
