"""post-incident on a real incident: an alert, a dry run, an approval, a real run, the resolve.

Everything goes through the real pieces: the receiver with the project's routing table and
catalog (deployment runs on the session's Prefect server), the db-pool-exhausted runbook on
the local PostgreSQL, Prefect's pause/resume forms. The timeline is checked against the
API's own timestamps, read independently of the code under test.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
import redis
from fastapi.testclient import TestClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterTags
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.context import tags
from prefect.flow_runs import resume_flow_run
from prefect.settings import PREFECT_API_URL
from prefect.states import Completed, Scheduled
from prefect.variables import Variable

from deployments.catalog import RUNBOOKS
from deployments.receiver import create_app
from deployments.routing import load_routing
from deployments.serve import to_deployments
from deployments.warm_pool import execute
from flows.common import md_escape
from flows.db_pool_exhausted import DbPoolParams, _cooldown_key, db_pool_exhausted, target_of
from flows.high_latency import high_latency
from flows.pool_threshold import pool_threshold
from flows.post_incident import (
    PostIncidentParams,
    PostIncidentRecord,
    build_record,
    export,
    load,
    main,
    post_incident,
    record_markdown,
)
from tasks.approvals.desk import WAKE
from tasks.run_history import IncidentKey, collect
from tests.fixtures.approvals import vote
from tests.fixtures.postgres import ADMIN_DSN, PgWorld, Sessions, alive, pid, wait_gone
from tests.fixtures.prefect_runs import flow_run_artifacts, paused_runs, wait_for_paused_run
from tests.fixtures.throwaway_runbook import StaleFlagParams, read_flag, stale_flag
from tests.fixtures.triggers import alert, bearer, payload, receiver_settings

REPO = Path(__file__).resolve().parents[2]
WANTED = ("db-pool-exhausted", "post-incident")


@pytest.fixture(scope="module")
def deployed(prefect_api: None) -> None:
    for deployment in to_deployments(tuple(rb for rb in RUNBOOKS if rb.name in WANTED)):
        deployment.apply()


def receiver() -> Any:
    url = PREFECT_API_URL.value()
    assert url
    shipped = load_routing(REPO / "deployments" / "routing.yaml", RUNBOOKS)
    # This incident is a plan-only alert run, then the on-call's own run from the UI; the
    # shipped route approves in the alert's own run (tests/integration/test_alert_approval.py).
    plan_only = [
        r.model_copy(update={"mode": "plan"}) if r.runbook == "db-pool-exhausted" else r
        for r in shipped.routes
    ]
    table = shipped.model_copy(update={"routes": plan_only})
    return create_app(receiver_settings(sync_wait_s=10), table, RUNBOOKS, api_url=str(url))


def read_run(run_id: UUID) -> FlowRun:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


def tagged(tag: str) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]))
        )


def run_here(run_id: UUID, flow: Any) -> str:
    """Execute a deployment run in this process, as the warm pool would; its final state."""
    execute(run_id, flow)
    state = read_run(run_id).state
    assert state is not None
    return state.type.value


def wait_paused(run_id: UUID, responses: int, timeout: float = 90) -> None:
    """Until the run is Paused with `responses` form answers already given."""
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            state = client.read_flow_run(run_id).state
            got = client.filter_flow_run_input(
                flow_run_id=run_id, key_prefix="paused-", limit=50, exclude_keys=set()
            )
            answered = [i for i in got if i.key.endswith("-response")]
            if state is not None and state.is_paused() and len(answered) == responses:
                return
            time.sleep(0.2)
    raise AssertionError(f"{run_id} did not pause again")


class Incident:
    """The ids and facts of the incident built once for the module's tests."""

    fingerprint: str
    fired: datetime
    dry_run_id: UUID
    real_run_id: UUID
    draft_id: UUID
    resolve_answer: dict[str, Any]
    terminated: set[int]


@pytest.fixture(scope="module")
def incident(deployed: None, pg_world: PgWorld) -> Iterator[Incident]:
    """Built once (about 20 s): every test below reads the same incident."""
    with pytest.MonkeyPatch.context() as mp:
        # As the pg_env fixture does, for the whole module.
        mp.setenv("RUNBOOKS_PG_DSN", ADMIN_DSN)
        mp.setenv("RUNBOOKS_PG_CONNECT_TIMEOUT_S", "2")
        mp.setenv("RUNBOOKS_PG_MIN_IDLE_MINUTES", str(1 / 60))
        sessions = Sessions(pg_world)
        try:
            yield _build_incident(pg_world, sessions)
        finally:
            sessions.close()


def _build_incident(world: PgWorld, sessions: Sessions) -> Incident:
    inc = Incident()
    inc.fingerprint = "pi" + uuid4().hex[:14]
    inc.fired = datetime.now(UTC).replace(microsecond=123456)
    starts_at = inc.fired.isoformat().replace("+00:00", "") + "789Z"  # nanoseconds, like AM
    firing = alert(
        alertname="DatabaseConnectionPoolExhausted",
        fingerprint=inc.fingerprint,
        starts_at=starts_at,
        datname=world.database,
        instance="pg-test",
    )
    victims = [sessions.open(world.app_role, "idle") for _ in range(2)]
    time.sleep(1.2)  # idle for longer than the guard's 1 s floor
    Variable.unset(
        _cooldown_key(
            target_of(DbPoolParams.model_validate({"guard": {"database": world.database}}))
        )
    )
    with TestClient(receiver()) as client:
        r = client.post("/alerts", json=payload(firing), headers=bearer())
        assert r.status_code == 200, r.text
        (fired,) = r.json()["alerts"]
        assert fired["outcome"] == "started", fired
        inc.dry_run_id = UUID(fired["flow_run_id"])
        # 1. The alert's run: plan only (the route is `mode: plan` here).
        assert run_here(inc.dry_run_id, db_pool_exhausted) == "COMPLETED"
        assert alive([pid(c) for c in victims]) == {pid(c) for c in victims}
        # 2. The on-call starts the real run from the UI, in the same incident, with approval.
        with get_client(sync_client=True) as prefect:
            dep = prefect.read_deployment_by_name("db-pool-exhausted/db-pool-exhausted")
            real = prefect.create_flow_run_from_deployment(
                dep.id,
                parameters={
                    "params": {
                        "dry_run": False,
                        "approval_timeout_s": 120,
                        "act_above_percent": 0,
                        "healthy_below_percent": 100,
                        "cooldown_minutes": 0,
                        "requested_by": "oncall",
                        "guard": {
                            "database": world.database,
                            "idle_minutes": 1 / 60,
                            "protected_roles": [world.protected_role],
                        },
                    }
                },
                tags=[f"alert:{inc.fingerprint}"],
                state=Scheduled(scheduled_time=datetime.now(UTC)),
            )
        inc.real_run_id = real.id
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(run_here, real.id, db_pool_exhausted)
            assert wait_for_paused_run("db-pool-exhausted") == real.id
            time.sleep(0.5)  # a visible wait for the approval in the timeline
            resume_flow_run(
                real.id, run_input={"approved": True, "approver": "alice", "reason": "INC-9"}
            )
            assert fut.result(timeout=120) == "COMPLETED"
        inc.terminated = {pid(c) for c in victims}
        assert wait_gone(list(inc.terminated)) == set()
        # 3. The alert resolves: its runbook ran, so a post-incident draft starts.
        resolved = client.post(
            "/alerts",
            json=payload({**firing, "status": "resolved"}, status="resolved"),
            headers=bearer(),
        )
        inc.resolve_answer = resolved.json()["alerts"][0]
        # Alertmanager re-sends resolved notifications: still one draft.
        client.post(
            "/alerts",
            json=payload({**firing, "status": "resolved"}, status="resolved"),
            headers=bearer(),
        )
    (draft,) = tagged(f"incident:alert:{inc.fingerprint}")
    inc.draft_id = draft.id
    assert run_here(draft.id, post_incident) == "COMPLETED"
    return inc


def api_facts(run_ids: list[UUID]) -> dict[str, Any]:
    """What the API says, read here without the code under test."""
    with get_client(sync_client=True) as client:
        runs = {
            r.id: r
            for r in client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids))
            )
        }
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids))
        )
        states = {i: client.read_flow_run_states(i) for i in run_ids}
        inputs = {
            i: [
                x
                for x in client.filter_flow_run_input(
                    flow_run_id=i, key_prefix="paused-", limit=50, exclude_keys=set()
                )
                if x.key.endswith("-response")
            ]
            for i in run_ids
        }
        decisions = {
            i: [
                json.loads(x.value)
                for x in client.filter_flow_run_input(
                    flow_run_id=i, key_prefix="approval-decision-", limit=50, exclude_keys=set()
                )
            ]
            for i in run_ids
        }
    return {
        "runs": runs,
        "tasks": tasks,
        "states": states,
        "inputs": inputs,
        "decisions": decisions,
    }


def secs(a: datetime | None, b: datetime | None) -> float:
    assert a is not None and b is not None
    return round((b - a).total_seconds(), 6)


def test_the_resolved_alert_started_one_draft(incident: Incident) -> None:
    answer = incident.resolve_answer
    assert answer["outcome"] == "resolved"
    assert f"post-incident draft run {incident.draft_id}" in answer["detail"]
    draft = read_run(incident.draft_id)
    assert draft.parameters == {
        "params": {"incident": f"alert:{incident.fingerprint}", "draft": True}
    }
    assert draft.state is not None and draft.state.is_completed()
    (md,) = flow_run_artifacts(incident.draft_id, "post-incident")
    assert "## Timeline" in md and "db-pool-exhausted" in md
    # A draft: the checklist is open, nobody was asked.
    assert md.count("| open |") == 6


def test_timeline_lists_every_step_in_order_with_the_apis_durations(incident: Incident) -> None:
    key = IncidentKey.parse(f"alert:{incident.fingerprint}")
    with get_client(sync_client=True) as client:
        record = build_record(key, collect(client, key), mode="draft")
    runs = [incident.dry_run_id, incident.real_run_id]
    facts = api_facts(runs)
    # Exactly the incident's two runbook runs: not the draft, not other tests' runs.
    assert {r.id for r in record.runs} == set(runs)
    stamps = [e.at for e in record.timeline]
    assert stamps == sorted(stamps)
    assert record.timeline[0].kind == "alert" and record.timeline[0].at == incident.fired
    # Every task run, once, in the order the API's start times give, with its duration.
    task_events = [e for e in record.timeline if e.kind == "task"]
    api_tasks = sorted(facts["tasks"], key=lambda t: t.start_time)
    assert [(e.run, e.step) for e in task_events] == [
        (facts["runs"][t.flow_run_id].name, t.name) for t in api_tasks
    ]
    assert [e.duration_s for e in task_events] == [
        secs(t.start_time, t.end_time) for t in api_tasks
    ]
    steps = [e.step for e in task_events]
    for prefix in ("survey-pool", "plan-terminations", "terminate-sessions"):
        assert any(step.startswith(prefix) for step in steps), (prefix, steps)
    # Every state change of both runs, with the time spent in it.
    for run_id in runs:
        name = facts["runs"][run_id].name
        api_states = sorted(facts["states"][run_id], key=lambda s: s.timestamp)
        mine = [e for e in record.timeline if e.kind == "state" and e.run == name]
        assert [e.step for e in mine] == [s.name for s in api_states]
        assert [e.duration_s for e in mine[:-1]] == [
            secs(a.timestamp, b.timestamp) for a, b in pairwise(api_states)
        ]
    real_states = [s.type for s in facts["states"][incident.real_run_id]]
    assert StateType.PAUSED in real_states
    # The approval: who, through what, and how long the run waited for it. The gate's
    # decision is the record (the Resume-form answer it counted is not listed twice).
    (answer,) = facts["inputs"][incident.real_run_id]
    (decision,) = facts["decisions"][incident.real_run_id]
    assert decision["state"] == "approved"
    (vote,) = decision["approvers"]
    assert (vote["approver"], vote["channel"], vote["counted"]) == ("alice", "ui", True)
    voted = datetime.fromtimestamp(vote["at"], UTC)
    assert voted >= answer.created
    paused = max(
        s.timestamp for s in facts["states"][incident.real_run_id] if s.type == StateType.PAUSED
    )
    (approval,) = [e for e in record.timeline if e.kind == "approval"]
    assert approval.step == "approved"
    assert approval.detail == "approved by alice (UI, self-declared); counted; reason: INC-9"
    assert approval.at == voted
    assert approval.duration_s == secs(paused, voted)
    assert approval.duration_s > 0  # the API's own times; no wall-clock bound in a test
    # The figures, from the alert's startsAt.
    m = record.metrics
    real = facts["runs"][incident.real_run_id]
    assert m.started_at == incident.fired and m.started_by == "alert startsAt"
    assert m.first_action_at == api_tasks[0].start_time
    assert api_tasks[0].flow_run_id == incident.dry_run_id  # the dry run acted first
    assert m.first_action_s == secs(incident.fired, api_tasks[0].start_time)
    assert m.approval_at == voted and m.approval_by == "alice (UI, self-declared)"
    assert m.approval_s == secs(incident.fired, voted)
    assert m.recovered and m.recovery_at == real.end_time
    assert m.recovery_s == secs(incident.fired, real.end_time)
    assert 0 < m.first_action_s < m.approval_s < m.recovery_s
    assert m.notifications == 0  # no escalate runs: "none" in the markdown
    assert "| notifications | none |" in record_markdown(record)
    durations = {r.id: r.duration_s for r in record.runs}
    assert durations[incident.real_run_id] == secs(real.start_time, real.end_time)
    assert {r.id: r.dry_run for r in record.runs} == {
        incident.dry_run_id: True,
        incident.real_run_id: False,
    }


def test_a_dry_run_alone_is_not_recovered(incident: Incident) -> None:
    key = IncidentKey.parse(f"alert:{incident.fingerprint}")
    with get_client(sync_client=True) as client:
        data = collect(client, key)
    only_dry = data.model_copy(
        update={"runs": [r for r in data.runs if r.id == incident.dry_run_id]}
    )
    record = build_record(key, only_dry, mode="draft")
    assert record.metrics.recovered is False
    assert record.metrics.approval_at is None
    assert "NOT recovered" in record_markdown(record)


def test_checklist_form_records_who_and_when_and_the_export_round_trips(
    incident: Incident, tmp_path: Path
) -> None:
    params = PostIncidentParams(
        incident=f"alert:{incident.fingerprint}", export_dir=str(tmp_path / "ui")
    )
    # audit-retention's tests leave a Paused post-incident run on the shared server.
    before = set(paused_runs("post-incident"))
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(post_incident, params)
        run_id = wait_for_paused_run("post-incident", ignore=before)
        resume_flow_run(
            run_id,
            run_input={
                "filled_by": "carol",
                "root_cause": "leaked idle sessions from the <b>batch</b> job",
                "prevention": "idle_in_transaction_session_timeout on rb_app",
            },
        )
        wait_paused(run_id, responses=1)  # four items still open: the form comes back
        resume_flow_run(
            run_id,
            run_input={
                "filled_by": "dave",
                "root_cause": "leaked idle sessions from the <b>batch</b> job",  # unchanged
                "prevention": "idle_in_transaction_session_timeout on rb_app",
                "runbook_update": "added the batch role to the guard docs",
                "learning_session": "Tuesday",
                "alert_thresholds": "70% warn kept",
                "customer_communication": "not needed: no customer impact",
            },
        )
        record: PostIncidentRecord = fut.result(timeout=120)
    with get_client(sync_client=True) as client:
        answers = sorted(
            (
                i
                for i in client.filter_flow_run_input(
                    flow_run_id=run_id, key_prefix="paused-", limit=50, exclude_keys=set()
                )
                if i.key.endswith("-response")
            ),
            key=lambda i: str(i.created),
        )
        tags = client.read_flow_run(run_id).tags
    assert f"incident:alert:{incident.fingerprint}" in tags
    first, second = answers
    items = {i.item: i for i in record.checklist.items}
    assert record.mode == "final" and record.checklist.complete
    assert (items["root_cause"].by, items["root_cause"].at) == ("carol", first.created)
    assert (items["prevention"].by, items["prevention"].at) == ("carol", first.created)
    for name in ("runbook_update", "learning_session", "alert_thresholds"):
        assert (items[name].by, items[name].at) == ("dave", second.created)
    # The flow's export and its artifact.
    (md_file,) = (tmp_path / "ui").glob("*.md")
    (json_file,) = (tmp_path / "ui").glob("*.json")
    assert load(json_file) == record
    text = md_file.read_text()
    assert "<b>" not in text and "\\<b\\>batch" in text  # human text is inert
    (artifact,) = flow_run_artifacts(run_id, "post-incident")
    assert "## Checklist" in artifact and "carol" in artifact
    # The CLI: the same record, checklist read back from the run's answers.
    assert (
        main(["--incident", f"alert:{incident.fingerprint}", "--out", str(tmp_path / "cli")]) == 0
    )
    (cli_json,) = (tmp_path / "cli").glob("*.json")
    again = load(cli_json)
    assert again.mode == "final"
    assert again.checklist == record.checklist
    assert again.timeline == record.timeline and again.metrics == record.metrics
    assert json.loads(cli_json.read_text())["incident"]["fingerprint"] == incident.fingerprint


def test_export_round_trips(incident: Incident, tmp_path: Path) -> None:
    key = IncidentKey.parse(f"alert:{incident.fingerprint}")
    with get_client(sync_client=True) as client:
        record = build_record(key, collect(client, key), mode="draft")
    md, js = export(record, tmp_path)
    assert load(js) == record
    assert load(js).model_dump_json() == record.model_dump_json()
    assert md.read_text() == record_markdown(record)


def test_bad_or_empty_keys_fail_clearly(tmp_path: Path, prefect_api: None) -> None:
    from pydantic import ValidationError

    for bad in ("two words", "x@2026-01-01T00:00:00..2025-01-01T00:00:00", "tag:"):
        with pytest.raises(ValueError):  # noqa: PT011 - message checked below
            IncidentKey.parse(bad)
    with pytest.raises(ValidationError, match="incident key"):
        PostIncidentParams(incident="two words")
    assert main(["--incident", "alert:nosuchfingerprint", "--out", str(tmp_path)]) == 2
    assert list(tmp_path.iterdir()) == []
    key = IncidentKey.parse("db-pool-exhausted@2026-01-01T00:00:00Z..2026-01-02T00:00:00Z")
    assert IncidentKey.parse(key.label()) == key


def test_an_alert_resolved_before_its_run_started_gets_no_draft(deployed: None) -> None:
    fingerprint = "pinorun" + uuid4().hex[:8]
    firing = alert(
        alertname="DatabaseConnectionPoolExhausted", fingerprint=fingerprint, datname="x"
    )
    with TestClient(receiver()) as client:
        fired = client.post("/alerts", json=payload(firing), headers=bearer())
        run_id = UUID(fired.json()["alerts"][0]["flow_run_id"])
        resolved = client.post(
            "/alerts",
            json=payload({**firing, "status": "resolved"}, status="resolved"),
            headers=bearer(),
        )
    answer = resolved.json()["alerts"][0]
    assert answer["outcome"] == "cancelled"  # it never ran: nothing to review
    assert "post-incident" not in answer["detail"]
    assert tagged(f"incident:alert:{fingerprint}") == []
    state = read_run(run_id).state
    assert state is not None and state.is_cancelled()


def test_a_checklist_form_nobody_answers_leaves_the_items_open(incident: Incident) -> None:
    params = PostIncidentParams(incident=f"alert:{incident.fingerprint}", form_timeout_s=10)
    state = post_incident(params, return_state=True)
    # Not Failed by Prefect's "never resumed": the run ends as the flow decides.
    assert state.is_completed(), state
    record: PostIncidentRecord = state.result()
    assert record.mode == "final" and not any(i.done for i in record.checklist.items)
    assert record.metrics.recovered  # the timeline is there all the same
    (md,) = flow_run_artifacts(state.state_details.flow_run_id, "post-incident")
    assert "no answer within 10 s" in md and md.count("| open |") == 6


def test_each_runbook_is_dry_or_acting_by_its_own_dry_run_field(prefect_api: None) -> None:
    """pool-threshold plans or acts through `remediation.dry_run`; it has no `dry_run`."""
    tag = "pi-dry-" + uuid4().hex[:8]
    runs: dict[str, tuple[Any, dict[str, Any]]] = {
        "pool-threshold acting": (
            pool_threshold,
            {"start_remediation": True, "remediation": {"dry_run": False}},
        ),
        "pool-threshold planning": (
            pool_threshold,
            {"start_remediation": True, "remediation": {"dry_run": True}},
        ),
        "high-latency acting": (high_latency, {"dry_run": False}),
        "high-latency planning": (high_latency, {"dry_run": True}),
    }
    ids: dict[str, UUID] = {}
    with get_client(sync_client=True) as client:
        for what, (flow, params) in runs.items():
            run = client.create_flow_run(flow, parameters={"params": params}, tags=[tag])
            client.set_flow_run_state(run.id, Completed(), force=True)
            ids[what] = run.id
        key = IncidentKey.parse(f"tag:{tag}")
        record = build_record(key, collect(client, key), mode="draft")
    dry = {r.id: r.dry_run for r in record.runs}
    assert {what: dry[run_id] for what, run_id in ids.items()} == {
        "pool-threshold acting": False,
        "pool-threshold planning": True,
        "high-latency acting": False,
        "high-latency planning": True,
    }


def test_a_verified_vote_is_named_with_its_channel_in_the_record(prefect_api: None) -> None:
    """A run approved through a signed link: the record names the approver and the link,
    once (the receiver's wake-up answer is not a second vote), timed by the vote."""
    flags = redis.Redis(host="127.0.0.1", port=6379, decode_responses=True)
    flag = f"runbooks-test:post-incident:{uuid4().hex}"
    flags.set(flag, "stale")
    tag = f"pi-verified-{uuid4().hex[:12]}"

    def run() -> Any:
        with tags(tag):
            return stale_flag(StaleFlagParams(key=flag, dry_run=False, approval_timeout_s=120))

    try:
        before = set(paused_runs("stale-flag"))
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(run)
            run_id = wait_for_paused_run("stale-flag", ignore=before)
            decided = vote(run_id, "on-call", reason="INC-20 plan read")
            assert decided.outcome == "recorded", decided
            assert future.result(timeout=120)["outcome"] == "acted"
        assert read_flag(flag) == "ok"
    finally:
        flags.delete(flag)
    facts = api_facts([run_id])
    (decision,) = facts["decisions"][run_id]
    (row,) = decision["approvers"]
    assert (row["approver"], row["channel"], row["counted"]) == ("on-call", "link", True)
    voted = datetime.fromtimestamp(row["at"], UTC)
    # The receiver woke the paused run with a Resume-form answer: there, and not a vote.
    (wake,) = facts["inputs"][run_id]
    assert json.loads(wake.value)["reason"].startswith(WAKE)
    key = IncidentKey.parse(f"tag:{tag}")
    with get_client(sync_client=True) as client:
        record = build_record(key, collect(client, key), mode="draft")
    (approval,) = [e for e in record.timeline if e.kind == "approval"]
    assert approval.step == "approved" and approval.at == voted
    assert approval.detail == (
        "approved by on-call (signed link); counted; reason: INC-20 plan read"
    )
    m = record.metrics
    assert m.approval_at == voted and m.approval_by == "on-call (signed link)"
    # Table cells are escaped (approver names are typed by humans): the escaped text.
    assert md_escape("(by on-call (signed link))") in record_markdown(record)
