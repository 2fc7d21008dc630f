"""The escalation automations on a real Prefect server (event, trigger and action services).

A stand-in runbook declared `critical`/`database` fails, or waits in a pause longer than its
deadline (10 s, Prefect's minimum for a proactive trigger): the server itself must start
the `escalate` deployment with the runbook's severity, topic and incident key. Controls that
must not escalate: a completed run, a failing run of a runbook without a severity, a pause
answered in time.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from uuid import UUID

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.client.schemas.objects import FlowRun, State
from prefect.events.actions import RunDeployment, SendNotification
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Completed, Crashed, Failed, Paused, Running, Scheduled

from deployments.automations import (
    ESCALATE_FAILED,
    ESCALATE_PAUSED,
    ESCALATE_WATCH,
    ESCALATION_PREFIXES,
    ZOMBIE_AUTOMATION,
    apply,
    declared,
)
from deployments.catalog import RUNBOOKS, Runbook
from deployments.serve import to_deployments
from flows.escalate import EscalateParams, escalate_incident
from tasks.contacts import Severity
from tests.fixtures.sinks import Sinks
from tests.fixtures.stack import prefect_server
from tests.fixtures.stub_runbooks import STUB_RUNBOOKS, stub_readonly, stub_remediate

WITHIN_S = 10
CRITICAL_STUB = Runbook(
    entrypoint="tests.fixtures.stub_runbooks:stub_remediate",
    description="stand-in",
    concurrency_limit=None,
    overrides={"severity": "critical", "topic": "database"},
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with (
        prefect_server(tmp_path_factory.mktemp("prefect")) as api_url,
        temporary_settings(updates={PREFECT_API_URL: api_url}),
    ):
        yield api_url


@pytest.fixture(scope="module")
def escalate_id(server: str) -> UUID:
    (deployment,) = to_deployments(tuple(rb for rb in RUNBOOKS if rb.name == "escalate"))
    deployment_id = deployment.apply()
    assert isinstance(deployment_id, UUID)
    return deployment_id


@pytest.fixture
def applied(escalate_id: UUID, monkeypatch: pytest.MonkeyPatch) -> UUID:
    monkeypatch.setenv("RUNBOOKS_ESCALATION_DEADLINES_S", f'{{"critical": {WITHIN_S}}}')
    monkeypatch.setenv("RUNBOOKS_ESCALATION_APPROVAL_REPAGE_S", str(WITHIN_S))
    apply(declared(60, escalate_id, (CRITICAL_STUB, STUB_RUNBOOKS[1])))
    return escalate_id


def until(what: str, check: Callable[[], Any], timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.25)
    return value


def escalation_runs(deployment_id: UUID) -> list[EscalateParams]:
    """The parameters of every escalate run the server created."""
    with get_client(sync_client=True) as client:
        runs: list[FlowRun] = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )
    return [EscalateParams.model_validate(run.parameters["params"]) for run in runs]


def escalations(deployment_id: UUID) -> dict[str, EscalateParams]:
    """incident key -> parameters of every escalate run the server created."""
    with get_client(sync_client=True) as client:
        runs: list[FlowRun] = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )
    out = {}
    for run in runs:
        params = EscalateParams.model_validate(run.parameters["params"])
        out[params.incident_key] = params
    return out


def stub_run(flow: Any = stub_remediate) -> UUID:
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(flow, parameters={"params": {}}, state=Scheduled())
    return run.id


def move(run_id: UUID, *states: State[Any]) -> None:
    with get_client(sync_client=True) as client:
        for state in states:
            client.set_flow_run_state(run_id, state, force=True)


def test_applying_twice_keeps_one_of_each(escalate_id: UUID) -> None:
    runbooks = (CRITICAL_STUB, STUB_RUNBOOKS[1])  # the second has no severity: none for it
    first = apply(declared(60, escalate_id, runbooks))
    second = apply(declared(60, escalate_id, runbooks))
    assert [a.id for a in second] == [a.id for a in first]
    names = [a.name for a in first]
    assert names == [
        ZOMBIE_AUTOMATION,
        ESCALATE_FAILED + "stub-remediate",
        ESCALATE_PAUSED + "stub-remediate",
    ]
    with get_client(sync_client=True) as client:
        for name in names:
            assert len(client.read_automations_by_name(name)) == 1
    assert declared(60, None, runbooks) == declared(60)  # escalate not deployed: zombie only

    # The runbook loses its severity: `make run` prunes its escalations, keeps the rest.
    quiet = dataclasses.replace(CRITICAL_STUB, overrides={"severity": None})
    apply(declared(60, escalate_id, (quiet,)), ESCALATION_PREFIXES)
    with get_client(sync_client=True) as client:
        assert [len(client.read_automations_by_name(n)) for n in names] == [1, 0, 0]


def test_a_failed_runbook_run_starts_escalate_with_its_severity(applied: UUID) -> None:
    completed, other = stub_run(), stub_run(stub_readonly)
    move(completed, Running(), Completed())
    move(other, Running(), Failed(message="not escalated: no severity"))
    failed = stub_run()
    move(failed, Running(), Failed(message="pool still exhausted"))

    found = until("escalate run for the failed run", lambda: escalations(applied).get(str(failed)))
    assert (found.severity, found.topic, found.wait_for_ack) == (
        Severity.CRITICAL,
        "database",
        True,
    )
    assert "stub-remediate run" in found.summary and "pool still exhausted" in found.summary
    # Reactive triggers act in event order: the controls' events came first.
    keys = escalations(applied)
    assert str(completed) not in keys and str(other) not in keys


def test_a_run_paused_past_its_deadline_reminds_under_its_own_incident_key(
    applied: UUID,
) -> None:
    waiting, answered = stub_run(), stub_run()
    move(waiting, Running(), Paused(timeout_seconds=600, pause_key="1"))
    move(answered, Running(), Paused(timeout_seconds=600, pause_key="1"))
    move(answered, Running())  # approved in time

    found = until("reminder for the long pause", lambda: escalations(applied).get(str(waiting)))
    assert (found.reason, found.severity, found.topic) == (
        "approval",
        Severity.CRITICAL,
        "database",
    )
    assert f"longer than {WITHIN_S} s" in found.summary
    assert str(answered) not in escalations(applied)

    # The same run then fails: the failure escalates under the same key, one incident.
    move(waiting, Running(), Failed(message="refused"))

    def both() -> list[EscalateParams]:
        mine = [p for p in escalation_runs(applied) if p.incident_key == str(waiting)]
        return mine if len(mine) == 2 else []

    reasons = sorted(p.reason for p in until("failure escalation of the same run", both))
    assert reasons == ["approval", "incident"]


def test_make_run_registers_escalate_and_one_pair_per_runbook_with_a_severity(
    server: str,
) -> None:
    from deployments.serve import apply_automations

    apply_automations(RUNBOOKS, to_deployments(RUNBOOKS))
    apply_automations(RUNBOOKS, to_deployments(RUNBOOKS))  # a restart: same automations
    with get_client(sync_client=True) as client:
        names = sorted(a.name for a in client.read_automations())
        deployment = client.read_deployment_by_name("escalate/escalate")
    paged = sorted(rb.name for rb in RUNBOOKS if rb.severity)
    assert paged == [
        "cert-expiry",
        "cert-renew",
        "cert-replace",
        "db-pool-exhausted",
        "high-error-rate",
        "high-latency",
        "payment-failure",
        "pool-threshold",
        "security-breach",
        "system-outage",
    ]
    assert names == sorted(
        [ZOMBIE_AUTOMATION]
        + [ESCALATE_FAILED + n for n in paged]
        + [ESCALATE_PAUSED + n for n in paged]
    )
    with get_client(sync_client=True) as client:
        (failed,) = client.read_automations_by_name(ESCALATE_FAILED + "db-pool-exhausted")
    (action,) = failed.actions
    assert isinstance(action, RunDeployment) and action.parameters is not None
    assert action.deployment_id == deployment.id
    assert action.parameters["params"]["severity"] == "critical"


@flow(name="stub-critical-pager")
def pages_critical(incident: str) -> None:
    """A runbook that pages critical from inside, then completes (no failure automation)."""
    escalate_incident("critical", "database", "certificate expires in 12 h", incident_key=incident)


def test_a_critical_page_from_a_completed_runbook_still_gets_one_ack_waiter(
    escalate_id: UUID,
) -> None:
    incident = f"inc-{uuid.uuid4().hex[:12]}"
    assert pages_critical(incident, return_state=True).is_completed()
    assert pages_critical(incident, return_state=True).is_completed()  # a rerun: still one
    waiters = [p for p in escalation_runs(escalate_id) if p.incident_key == incident]
    assert [(p.severity, p.wait_for_ack, p.reason) for p in waiters] == [
        (Severity.CRITICAL, True, "incident")
    ]
    high = f"inc-{uuid.uuid4().hex[:12]}"  # no ack needed for high: no waiter

    @flow(name="stub-high-pager")
    def pages_high() -> None:
        escalate_incident("high", "database", "certificate expires in 3 days", incident_key=high)

    pages_high()
    assert not [p for p in escalation_runs(escalate_id) if p.incident_key == high]


def test_a_failed_or_crashed_escalation_pages_the_last_resort_block(
    escalate_id: UUID, sinks: Sinks, monkeypatch: pytest.MonkeyPatch
) -> None:
    last_resort = sinks.slack()
    ref = last_resort.save_block("test-last-resort")
    monkeypatch.setenv("RUNBOOKS_ESCALATION_LAST_RESORT_BLOCK", ref)
    applied = apply(declared(60, escalate_id, (CRITICAL_STUB,)), ESCALATION_PREFIXES)
    assert [a.name for a in applied][-1] == ESCALATE_WATCH
    (action,) = applied[-1].actions
    assert isinstance(action, SendNotification)  # Prefect's own action, run by the server

    def escalate_run(incident: str) -> UUID:
        params = {"severity": "critical", "topic": "database", "incident_key": incident}
        with get_client(sync_client=True) as client:
            made = client.create_flow_run_from_deployment(
                escalate_id, parameters={"params": params}
            )
        return made.id

    fine, crashed, failed = escalate_run("inc-ok"), escalate_run("inc-c"), escalate_run("inc-f")
    move(fine, Running(), Completed())
    move(crashed, Running(), Paused(timeout_seconds=600, pause_key="ack"))
    move(crashed, Crashed(message="No heartbeat for 90 s: the process running it died."))
    move(failed, Running(), Failed(message="escalation config: cannot read it (OSError)"))

    until("two last-resort pages", lambda: len(last_resort.delivered) >= 2)
    time.sleep(2)  # reactive triggers act in event order: the completed run's came first
    texts = [p["text"] for p in last_resort.delivered]
    assert len(texts) == 2
    (crash,) = [t for t in texts if "inc-c" in t]
    (fail,) = [t for t in texts if "inc-f" in t]
    assert "ended Crashed" in crash and "No heartbeat" in crash
    assert "ended Failed" in fail and "cannot read" in fail
    assert all("ESCALATION FAILED" in t for t in texts)
    assert last_resort.secret not in "".join(texts)
