"""The escalate flow on a Prefect API, against real local Slack and PagerDuty webhook sinks."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prefect.blocks.core import Block
from prefect.client.orchestration import get_client
from prefect.flow_runs import resume_flow_run

from flows.escalate import EscalateParams, EscalationFailed, EscalationOutcome, escalate
from tasks.contacts import Severity
from tasks.notify import record_name
from tests.fixtures.prefect_runs import (
    flow_run_artifacts,
    flow_run_logs,
    task_run_states,
    task_runs,
    wait_for_paused_run,
)
from tests.fixtures.sinks import CONTACTS

pytestmark = pytest.mark.usefixtures("prefect_api")


def key() -> str:
    return f"inc-{uuid.uuid4().hex[:12]}"


def run(severity: str, topic: str, incident: str, **kw: Any) -> Any:
    params = EscalateParams(
        severity=Severity(severity),
        topic=topic,
        incident_key=incident,
        summary="pool still exhausted",
        wait_for_ack=kw.pop("wait_for_ack", False),
    )
    return escalate(params, return_state=True)


def report_of(state: Any) -> str:
    (text,) = flow_run_artifacts(state.state_details.flow_run_id, "escalate")
    return text


def test_critical_database_pages_on_call_executives_and_the_db_team_once(world_env: Any) -> None:
    world = world_env()
    incident = key()
    state = run("critical", "database", incident)
    assert state.is_completed(), state.message
    outcome: EscalationOutcome = state.result()
    assert outcome.ended == "not-waited"
    assert world.counts() == {"on-call": 1, "leadership": 1, "db-team": 1}
    (page,) = world.sink["on-call"].delivered
    assert page["payload"]["severity"] == "critical"
    assert incident in page["payload"]["summary"]
    assert "pool still exhausted" in page["payload"]["custom_details"]["details"]
    assert incident in world.sink["db-team"].delivered[0]["text"]
    with get_client(sync_client=True) as client:
        tags = client.read_flow_run(state.state_details.flow_run_id).tags
    assert {f"incident:{incident}", "runbook:escalate"} <= set(tags)
    text = report_of(state)
    for expected in ("test-on-call", "test-leadership", "test-db-team", "accepted: HTTP 2xx"):
        assert expected in text

    # A rerun of the same incident (a retried flow, the automation's run) pages nobody again.
    again = run("critical", "database", incident)
    assert again.is_completed(), again.message
    assert world.counts() == {"on-call": 1, "leadership": 1, "db-team": 1}
    assert all(d.repeated for d in again.result().deliveries)
    assert "not sent again" in report_of(again)


@pytest.mark.parametrize(
    ("severity", "topic", "expected"),
    [
        ("high", "security", {"team-lead": 1, "incidents": 1, "security-team": 1}),
        ("high", "unknown-topic", {"team-lead": 1, "incidents": 1}),
        ("medium", "database", {"tickets": 1}),
        ("low", "payments", {"backlog": 1}),
    ],
)
def test_each_severity_reaches_its_contacts(
    world_env: Any, severity: str, topic: str, expected: dict[str, int]
) -> None:
    world = world_env()
    state = run(severity, topic, key())
    assert state.is_completed(), state.message
    assert world.counts() == expected


def test_a_failed_first_attempt_is_retried_and_delivered_once(world_env: Any) -> None:
    world = world_env(db_team={"fail_first": 1})
    state = run("critical", "database", key())
    assert state.is_completed(), state.message
    assert len(world.sink["db-team"].requests) == 2  # the 503, then the retry
    assert len(world.sink["db-team"].delivered) == 1
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["notify-db-team-via-custom-webhook/test-db-team"] == 2


def test_a_lost_answer_on_slack_is_never_resent_and_the_next_channel_is_used(
    world_env: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = world_env(db_team={"drop_first": 1})
    # db-team with a second channel (the ticket queue), so the fallback is visible.
    config = yaml.safe_load(world.file.read_text())
    config["contacts"]["db-team"]["channels"].append("custom-webhook/test-tickets")
    (tmp_path / "esc.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("RUNBOOKS_ESCALATION_CONFIG_FILE", str(tmp_path / "esc.yaml"))
    state = run("high", "database", key())
    assert state.is_completed(), state.message
    slack = world.sink["db-team"]
    assert len(slack.requests) == 1 and len(slack.delivered) == 1  # arrived; not sent again
    assert len(world.sink["tickets"].delivered) == 1  # the fallback got the page
    rows = {(d.contact, d.block): d for d in state.result().deliveries}
    assert rows[("db-team", "custom-webhook/test-db-team")].status == "unconfirmed"
    assert rows[("db-team", "custom-webhook/test-tickets")].status == "sent"
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["notify-db-team-via-custom-webhook/test-db-team"] == 1


def test_a_lost_pagerduty_answer_is_retried_under_the_incident_dedup_key(
    world_env: Any,
) -> None:
    world = world_env(on_call={"drop_first": 1})
    incident = key()
    state = run("critical", "database", incident)
    assert state.is_completed(), state.message
    pd = world.sink["on-call"]
    # Sent twice (the first answer was lost), one page: PagerDuty merges by dedup_key.
    assert [p["dedup_key"] for p in pd.delivered] == [incident, incident]
    assert world.pages() == {"on-call": 1, "leadership": 1, "db-team": 1}
    assert "on-call-slack" not in world.counts()  # confirmed on PagerDuty: no fallback
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["notify-on-call-via-custom-webhook/test-on-call"] == 2


def test_a_sink_that_is_down_is_reported_and_the_next_channel_pages(world_env: Any) -> None:
    world = world_env()
    world.sink["on-call"].stop()
    state = run("critical", "database", key())
    assert state.is_completed(), state.message
    assert world.counts() == {"on-call-slack": 1, "leadership": 1, "db-team": 1}
    text = report_of(state)
    assert "not reached: ConnectError" in text
    assert "test-on-call-slack" in text


def test_a_contact_nobody_can_reach_fails_the_run_with_its_report(world_env: Any) -> None:
    world = world_env()
    world.sink["db-team"].stop()
    state = run("high", "database", key())
    assert state.is_failed()
    with pytest.raises(EscalationFailed, match="db-team"):
        state.result()
    assert world.counts() == {"team-lead": 1, "incidents": 1}
    assert "not reached" in report_of(state)


def _variables(incident: str) -> list[str]:
    names = [
        record_name(incident, c, f"custom-webhook/test-{c}", stage)
        for c in CONTACTS
        for stage in ("critical", "high")
    ]
    names += [
        record_name(incident, "on-call", "custom-webhook/test-on-call-slack", stage)
        for stage in ("critical", "high")
    ]
    with get_client(sync_client=True) as client:
        found = [v for v in client.read_variables() if v.name in names]
    assert found
    return [json.dumps(v.value) for v in found]


def test_no_secret_in_logs_artifacts_states_or_records(
    world_env: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    world = world_env(leadership={"fail_first": 99}, db_team={"drop_first": 1})
    world.sink["on-call"].stop()
    # A block whose token the service does not know: Slack answers 404, and httpx's error
    # text names the URL, token included.
    incidents = world.sink["incidents"]
    real, wrong = incidents.secret, "T0NOPE/B0/SLKnope" + uuid.uuid4().hex[:8]
    incidents.secret = wrong
    incidents.save_block("test-incidents")
    incidents.secret = real
    incident = key()
    states = [run("critical", "database", incident), run("high", "platform", incident)]
    seen: list[str] = []
    for state in states:
        run_id = state.state_details.flow_run_id
        seen += flow_run_logs(run_id) + flow_run_artifacts(run_id)
        seen += [*task_run_states(run_id), str(state.message)]
    seen += _variables(incident)
    out, err = capfd.readouterr()
    seen += [out, err]
    assert len(seen) > 10
    assert any("HTTP 503" in s for s in seen) and any("HTTP 404" in s for s in seen)
    secrets = [*world.secrets, wrong]
    for text in seen:
        for secret in secrets:
            assert secret not in text
            assert secret.rsplit("/", 1)[-1] not in text


def test_an_acknowledgement_stops_the_re_escalation(
    world_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = world_env()
    monkeypatch.setenv("RUNBOOKS_ESCALATION_DEADLINES_S", '{"critical": 60}')
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(run, "critical", "database", key(), wait_for_ack=True)
        run_id = wait_for_paused_run("escalate")
        resume_flow_run(run_id, run_input={"acknowledged": True, "by": "alice", "note": "on it"})
        state = future.result(timeout=60)
    assert state.is_completed(), state.message
    outcome: EscalationOutcome = state.result()
    assert (outcome.ended, outcome.acknowledged_by, outcome.levels_paged) == (
        "acknowledged",
        "alice",
        1,
    )
    assert world.counts() == {"on-call": 1, "leadership": 1, "db-team": 1}
    assert "acknowledged by **alice**" in report_of(state)


def test_without_an_acknowledgement_each_next_level_is_paged(
    world_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = world_env()
    monkeypatch.setenv("RUNBOOKS_ESCALATION_DEADLINES_S", '{"critical": 2}')
    state = run("critical", "database", key(), wait_for_ack=True)
    assert state.is_completed(), state.message
    outcome: EscalationOutcome = state.result()
    assert (outcome.ended, outcome.levels_paged) == ("unacknowledged", 3)
    assert world.counts() == {
        "on-call": 1,
        "leadership": 1,
        "db-team": 1,
        "on-call-secondary": 1,
        "team-lead": 1,
    }
    assert (
        "re-escalation, level 2"
        in world.sink["on-call-secondary"].delivered[0]["payload"]["summary"]
    )
    text = report_of(state)
    assert "Level 2" in text and "Level 3" in text and "Not acknowledged" in text


def test_an_ack_at_the_second_level_stops_before_the_third(
    world_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = world_env()
    monkeypatch.setenv("RUNBOOKS_ESCALATION_DEADLINES_S", '{"critical": 3}')
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(run, "critical", "database", key(), wait_for_ack=True)
        run_id = wait_for_paused_run("escalate")
        # Wait until level 2 was paged (the first pause timed out), then acknowledge.
        for _ in range(200):
            if world.sink["on-call-secondary"].delivered:
                break
            time.sleep(0.1)
        assert world.sink["on-call-secondary"].delivered
        wait_for_paused_run("escalate")
        resume_flow_run(run_id, run_input={"by": "bob"})
        state = future.result(timeout=60)
    outcome: EscalationOutcome = state.result()
    assert (outcome.ended, outcome.acknowledged_by, outcome.levels_paged) == (
        "acknowledged",
        "bob",
        2,
    )
    assert "team-lead" not in world.counts()


def test_a_prefect_api_error_loading_the_block_is_retried_and_pages_once(
    world_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API's answer to the block read is lost: nothing was sent, so it is sent now."""
    world = world_env()

    class FlakyApi:
        calls = 0

        @staticmethod
        def load(ref: str) -> Any:
            FlakyApi.calls += 1
            if FlakyApi.calls == 1:
                raise httpx.ReadTimeout("timed out reading from the Prefect API")
            return Block.load(ref)

    monkeypatch.setattr("tasks.notify.Block", FlakyApi)
    state = run("critical", "database", key())
    assert state.is_completed(), state.message
    assert world.pages() == {"on-call": 1, "leadership": 1, "db-team": 1}
    assert "on-call-slack" not in world.counts()  # PagerDuty itself got it: no fallback
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["notify-on-call-via-custom-webhook/test-on-call"] == 2
