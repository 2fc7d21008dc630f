"""One incident, one chain of pages: severity = the highest raised, one ack waiter, one ack
stops every run of the incident, approval reminders go to the on-call chain only and stop
when the runbook run stops waiting. Pages counted per contact on the local sinks."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.flow_runs import resume_flow_run
from prefect.states import Completed, Paused, Running, Scheduled

from flows.common import run_link
from flows.escalate import EscalateParams, EscalationOutcome, escalate
from tasks.contacts import Severity
from tests.fixtures.prefect_runs import paused_runs
from tests.fixtures.stub_runbooks import stub_remediate

pytestmark = pytest.mark.usefixtures("prefect_api")


def run(severity: str, incident: str, *, wait: bool = True, reason: str = "incident") -> Any:
    params = EscalateParams(
        severity=Severity(severity),
        topic="database",
        incident_key=incident,
        summary="pool still exhausted",
        wait_for_ack=wait,
        reason=reason,
    )
    return escalate(params, return_state=True)


def outcome(state: Any) -> EscalationOutcome:
    assert state.is_completed(), state.message
    result = state.result()
    assert isinstance(result, EscalationOutcome)
    return result


def until(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.1)
    return value


def new_paused(before: set[UUID], pool: ThreadPoolExecutor, future: Future[Any]) -> UUID:
    """The escalate run that paused since `before` (fails fast if its thread ended)."""

    def found() -> UUID | None:
        if future.done():
            pytest.fail(f"the escalate run ended instead of waiting: {future.result()}")
        fresh = [r for r in paused_runs("escalate") if r not in before]
        return fresh[0] if fresh else None

    return until("an escalate run waiting for its ack", found)  # type: ignore[no-any-return]


def paused_runbook_run() -> UUID:
    """A stand-in runbook run, Paused for its approval (what the approval automation sees)."""
    with get_client(sync_client=True) as client:
        made = client.create_flow_run(stub_remediate, parameters={"params": {}}, state=Scheduled())
        client.set_flow_run_state(made.id, Running(), force=True)
        client.set_flow_run_state(made.id, Paused(timeout_seconds=600, pause_key="1"), force=True)
    return made.id


def test_a_critical_page_from_the_runbook_re_pages_when_the_catalog_says_high(
    world_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cert-expiry pages critical (no wait) then fails; the automation comes with `high`."""
    world = world_env()
    monkeypatch.setenv("RUNBOOKS_ESCALATION_DEADLINES_S", '{"critical": 2}')
    incident = str(uuid.uuid4())
    assert outcome(run("critical", incident, wait=False)).ended == "not-waited"
    late = outcome(run("high", incident))
    assert (late.severity, late.ended, late.levels_paged) == (
        Severity.CRITICAL,
        "unacknowledged",
        3,
    )
    # Each level once; the high contacts (incidents) are not paged for a critical incident.
    assert world.pages() == {
        "on-call": 1,
        "leadership": 1,
        "db-team": 1,
        "on-call-secondary": 1,
        "team-lead": 1,
    }


def test_a_higher_severity_upgrades_the_open_chain(
    world_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = world_env()
    monkeypatch.setenv("RUNBOOKS_ESCALATION_DEADLINES_S", '{"critical": 2}')
    incident = str(uuid.uuid4())
    assert outcome(run("high", incident)).ended == "notified"
    assert world.pages() == {"team-lead": 1, "incidents": 1, "db-team": 1}
    upgraded = outcome(run("critical", incident))
    assert (upgraded.ended, upgraded.levels_paged) == ("unacknowledged", 3)
    # The new level's contacts once each; the topic's team hears the upgrade (its 2nd page).
    assert world.pages() == {
        "team-lead": 2,  # high's first level, then critical's level 3
        "incidents": 1,
        "db-team": 2,
        "on-call": 1,
        "leadership": 1,
        "on-call-secondary": 1,
    }
    # A lower severity later does not lower the incident nor page anyone again.
    again = outcome(run("medium", incident))
    assert again.severity == Severity.CRITICAL and "tickets" not in world.pages()


def test_two_runs_of_one_incident_wait_once_and_one_ack_stops_both(
    world_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failure automation and a second escalation of the same run: one chain."""
    world = world_env()
    monkeypatch.setenv("RUNBOOKS_ESCALATION_DEADLINES_S", '{"critical": 4}')
    incident = str(uuid.uuid4())
    before = set(paused_runs("escalate"))
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(run, "critical", incident)
        waiting = new_paused(before, pool, first)
        second = outcome(run("high", incident))  # the catalog's severity, same run
        assert second.ended == "joined"
        resume_flow_run(waiting, run_input={"acknowledged": True, "by": "alice"})
        acked = outcome(first.result(timeout=60))
    assert (acked.ended, acked.acknowledged_by) == ("acknowledged", "alice")
    time.sleep(5)  # past a deadline: nobody may page level 2 now
    late = outcome(run("critical", incident))  # a retry after the ack waits for nothing
    assert (late.ended, late.acknowledged_by) == ("acknowledged", "alice")
    assert world.pages() == {"on-call": 1, "leadership": 1, "db-team": 1}


def test_failure_and_approval_wait_on_one_run_share_the_chain_and_one_ack(
    world_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = world_env()
    monkeypatch.setenv("RUNBOOKS_ESCALATION_DEADLINES_S", '{"critical": 30}')
    monkeypatch.setenv("RUNBOOKS_ESCALATION_APPROVAL_REPAGE_S", "30")
    runbook_run = paused_runbook_run()
    incident = str(runbook_run)
    before = set(paused_runs("escalate"))
    with ThreadPoolExecutor(2) as pool:
        approval = pool.submit(run, "critical", incident, reason="approval")
        approval_run = new_paused(before, pool, approval)
        failure = pool.submit(run, "critical", incident)  # the same run then failed
        failure_run = new_paused(before | {approval_run}, pool, failure)
        # Acknowledge the page of the failure: the approval reminders stop too.
        resume_flow_run(failure_run, run_input={"acknowledged": True, "by": "carol"})
        ends = [outcome(f.result(timeout=60)) for f in (approval, failure)]
    assert [(o.ended, o.acknowledged_by) for o in ends] == [
        ("acknowledged", "carol"),
        ("acknowledged", "carol"),
    ]
    # PagerDuty merges the reminder and the failure page (one dedup_key: the run's id).
    assert [p["dedup_key"] for p in world.sink["on-call"].delivered] == [incident, incident]
    assert world.pages() == {"on-call": 1, "leadership": 1, "db-team": 1}


def test_approval_reminders_go_to_the_on_call_chain_never_to_leadership(
    world_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = world_env()
    monkeypatch.setenv("RUNBOOKS_ESCALATION_APPROVAL_REPAGE_S", "1")
    runbook_run = paused_runbook_run()
    state = run("critical", str(runbook_run), reason="approval")
    assert world.pages() == {"on-call": 1, "on-call-secondary": 1}
    reminded = outcome(state)
    assert (reminded.ended, reminded.levels_paged) == ("unacknowledged", 2)
    page = world.sink["on-call"].delivered[0]["payload"]
    assert "APPROVAL" in page["summary"]
    # The page's body (PagerDuty: its custom details) links to the paused run in the UI,
    # where it is approved or refused.
    body = page["custom_details"]["details"]
    assert run_link(runbook_run) in body, body


def test_approval_reminders_stop_when_the_runbook_run_stops_waiting(
    world_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = world_env()
    monkeypatch.setenv("RUNBOOKS_ESCALATION_APPROVAL_REPAGE_S", "3")
    runbook_run = paused_runbook_run()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(run, "critical", str(runbook_run), reason="approval")
        until("the first reminder", lambda: world.sink["on-call"].delivered)
        with get_client(sync_client=True) as client:  # approved, acted, ended
            client.set_flow_run_state(runbook_run, Running(), force=True)
            client.set_flow_run_state(runbook_run, Completed(), force=True)
        stopped = outcome(future.result(timeout=60))
    assert stopped.ended == "approval-ended"
    assert world.pages() == {"on-call": 1}
    # A reminder that comes after the run ended pages nobody at all.
    assert outcome(run("critical", str(runbook_run), reason="approval")).ended == ("approval-ended")
    assert world.pages() == {"on-call": 1}
