"""audit-retention against the real Prefect server, with runs backdated through the client.

Prefect's API sets state timestamps itself, so a run is made old the way the client allows:
created Scheduled for a time 120 days ago (its `expected_start_time`, the age the flow
reads), then moved on through its states.
"""

from __future__ import annotations

import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import flow, task
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import ArtifactCreate
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.flow_runs import resume_flow_run
from prefect.states import Cancelled, Completed, Failed, Paused, Pending, Running, Scheduled
from pydantic import ValidationError

import flows.audit_retention as retention
from flows.approval import Approval
from flows.audit_retention import RetentionParams, audit_retention
from flows.post_incident import ChecklistForm, post_incident
from tasks.approvals.signing import Vote, open_vote
from tasks.approvals.store import ApprovalRequest, record_vote, save_decision, save_request
from tasks.approvals.tally import requirements, tally
from tasks.contacts import EscalationConfig
from tests.fixtures.approvals import KEY
from tests.fixtures.prefect_runs import flow_run_artifacts, wait_for_paused_run

pytestmark = pytest.mark.usefixtures("prefect_api")
OLD = timedelta(days=120)


@flow(name="retention-subject")
def subject() -> None:
    """Never run: its runs are made through the client."""


@task(name="retention-step")
def step() -> None:
    """Never run: a task run record for the export."""


@dataclass
class World:
    deletable: dict[str, UUID] = field(default_factory=dict)
    kept: dict[str, UUID] = field(default_factory=dict)
    artifact: UUID | None = None


def _run(
    client: SyncPrefectClient,
    *,
    tags: list[str] | None = None,
    states: tuple[Any, ...] = (Pending, Running, Completed),
    age: timedelta = OLD,
    of: Any = subject,
) -> UUID:
    due = datetime.now(UTC) - age
    run = client.create_flow_run(of, tags=tags or [], state=Scheduled(scheduled_time=due))
    for state in states:
        client.set_flow_run_state(run.id, state(), force=True)
    return run.id


@pytest.fixture(scope="module")
def world(prefect_api: None) -> World:
    w = World()
    with get_client(sync_client=True) as c:
        # Deletable: old, final, of no open incident.
        w.deletable["plain"] = plain = _run(c)
        c.create_task_run(step, flow_run_id=plain, dynamic_key="0", state=Completed())
        w.artifact = c.create_artifact(
            ArtifactCreate(
                key="retention-subject", type="markdown", data="# report", flow_run_id=plain
            )
        ).id
        w.deletable["failed"] = _run(c, states=(Pending, Running, Failed))
        w.deletable["reviewed"] = _run(c, tags=["alert:fpreviewed", "source:alert"])
        _run(c, tags=["incident:alert:fpreviewed"], of=post_incident, age=timedelta(0))
        # Resolved before it started: no runbook ran, nothing to review.
        w.deletable["never-ran"] = _run(c, tags=["alert:fpnever"], states=(Cancelled,))
        # Kept: an incident still going (another run of the key is Running) ...
        w.kept["open"] = _run(c, tags=["alert:fpopen"])
        _run(c, tags=["alert:fpopen"], states=(Pending, Running), age=timedelta(0))
        # ... a post-incident form still waiting for answers ...
        w.kept["form-open"] = _run(c, tags=["alert:fpform"])
        _run(
            c,
            tags=["incident:alert:fpform"],
            of=post_incident,
            states=(Pending, Running, Paused),
            age=timedelta(0),
        )
        # ... no post-incident record yet (still firing, or not reviewed) ...
        w.kept["unreviewed"] = _run(c, tags=["alert:fpunreviewed"])
        # ... a paused run however old, and a young run.
        w.kept["paused"] = _run(c, states=(Pending, Running, Paused))
        w.kept["young"] = _run(c, age=timedelta(days=10))
    return w


def existing(ids: list[UUID]) -> set[UUID]:
    with get_client(sync_client=True) as c:
        runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    return {r.id for r in runs}


def test_dry_run_counts_and_changes_nothing(world: World, tmp_path: Path) -> None:
    out = audit_retention(RetentionParams(export_dir=str(tmp_path / "x")))
    assert out.dry_run and out.deleted == 0 and out.outcome == "planned"
    assert out.exported == len(world.deletable)  # "would export and delete"
    assert out.kept == {"incident still open": 2, "no post-incident record yet": 1}
    everything = [*world.deletable.values(), *world.kept.values()]
    assert existing(everything) == set(everything)
    assert not (tmp_path / "x").exists()


def test_bad_parameters_are_refused_before_anything_runs(world: World, tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValidationError, match="not a folder"):
        RetentionParams(dry_run=False, export_dir=str(a_file))
    with pytest.raises(ValidationError, match="older_than_days"):
        RetentionParams(dry_run=False, older_than_days=0.5)
    assert existing(list(world.deletable.values())) == set(world.deletable.values())


def _lines(folder: Path) -> list[dict[str, Any]]:
    (path,) = folder.glob("flow-runs-*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cap_then_export_and_delete_keeps_every_open_incident(world: World, tmp_path: Path) -> None:
    # The cap: one run per flow run of retention.
    first = audit_retention(
        RetentionParams(
            dry_run=False, auto_approve=True, export_dir=str(tmp_path / "a"), max_runs=1
        )
    )
    assert (first.exported, first.deleted) == (1, 1)
    (one,) = _lines(tmp_path / "a")
    rest = audit_retention(
        RetentionParams(dry_run=False, auto_approve=True, export_dir=str(tmp_path / "b"))
    )
    assert rest.deleted == rest.exported == len(world.deletable) - 1
    lines = [one, *_lines(tmp_path / "b")]
    exported = {UUID(x["flow_run"]["id"]): x for x in lines}
    # Exactly the deletable runs were exported, and are gone; every kept run is still there.
    assert set(exported) == set(world.deletable.values())
    assert existing(list(world.deletable.values())) == set()
    assert existing(list(world.kept.values())) == set(world.kept.values())
    # The export is the undo: the run, its task runs and its artifacts as the API had them.
    plain = exported[world.deletable["plain"]]
    assert plain["flow"] == "retention-subject"
    assert plain["flow_run"]["state"]["type"] == "COMPLETED"
    (task_run,) = plain["task_runs"]
    assert task_run["flow_run_id"] == str(world.deletable["plain"])
    assert [a["data"] for a in plain["artifacts"]] == ["# report"]
    with get_client(sync_client=True) as c:
        left = c.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[world.deletable["plain"]])
            )
        )
    assert left == []
    assert rest.artifacts_deleted + first.artifacts_deleted == 1
    # Nothing left to do: a second pass deletes nothing.
    again = audit_retention(
        RetentionParams(dry_run=False, auto_approve=True, export_dir=str(tmp_path / "c"))
    )
    assert again.deleted == 0 and again.outcome == "nothing to do"
    assert again.kept == {"incident still open": 2, "no post-incident record yet": 1}


def test_the_report_is_published(world: World) -> None:
    state = audit_retention(RetentionParams(), return_state=True)
    run_id = state.state_details.flow_run_id
    (md,) = flow_run_artifacts(run_id, "audit-retention")
    assert "## Outcome" in md and "Dry run" in md and "kept because" in md


# The tests below make their own old run each, after the world's runs are gone.


@pytest.mark.parametrize("approved", [False, True])
def test_without_auto_approve_the_delete_waits_for_an_approval(
    world: World, tmp_path: Path, approved: bool
) -> None:
    with get_client(sync_client=True) as c:
        run_id = _run(c)
    folder = tmp_path / "ask"
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(audit_retention, RetentionParams(dry_run=False, export_dir=str(folder)))
        paused = wait_for_paused_run("audit-retention")
        # Nothing is written or deleted while the run waits for a human.
        assert existing([run_id]) == {run_id}
        assert not folder.exists()
        resume_flow_run(
            paused, run_input={"approved": approved, "approver": "alice", "reason": "INC-9"}
        )
        out = fut.result(timeout=120)
    (md,) = flow_run_artifacts(paused, "audit-retention")
    assert "alice" in md and "INC-9" in md
    if approved:
        assert out.outcome == "acted" and out.deleted >= 1
        assert existing([run_id]) == set()
    else:
        assert (out.outcome, out.deleted, out.exported) == ("refused", 0, 0)
        assert existing([run_id]) == {run_id}
        assert not folder.exists()


def test_the_export_carries_the_approval_and_checklist_answers(
    world: World, tmp_path: Path
) -> None:
    with get_client(sync_client=True) as c:
        run_id = _run(c)
        # The keys Prefect gives the answers to a run's first and second pause.
        c.create_flow_run_input(
            run_id,
            "paused-1-response",
            Approval(approved=True, approver="alice", reason="INC-7 pool full").model_dump_json(),
        )
        c.create_flow_run_input(
            run_id,
            "paused-2-response",
            ChecklistForm(filled_by="bob", root_cause="a leaking pool").model_dump_json(),
        )
        # The approval records of a verified gate: request, a sealed vote, the decision.
        reqs = requirements(EscalationConfig(), "retention-subject", ["delete-old-runs"])
        save_request(
            c,
            ApprovalRequest(
                run=str(run_id),
                runbook="retention-subject",
                plan="p1",
                actions=["delete old runs"],
                requirements=reqs,
                asked_at=1.0,
                expires_at=2.0,
            ),
        )
        vote = Vote(
            run=str(run_id),
            plan="p1",
            approver="on-call",
            choice="approve",
            channel="link",
            at=1.5,
            recipient="on-call",
        )
        assert record_vote(c, vote, "nonce1", KEY)
        save_decision(c, run_id, "p1", tally(reqs, "p1", [vote]))
    out = audit_retention(
        RetentionParams(dry_run=False, auto_approve=True, export_dir=str(tmp_path / "i"))
    )
    assert out.deleted >= 1
    assert existing([run_id]) == set()
    line = {UUID(x["flow_run"]["id"]): x for x in _lines(tmp_path / "i")}[run_id]
    answers = {i["key"]: json.loads(i["value"]) for i in line["inputs"]}
    assert answers["paused-1-response"] == {
        "approved": True,
        "approver": "alice",
        "reason": "INC-7 pool full",
    }
    assert answers["paused-2-response"]["filled_by"] == "bob"
    assert answers["paused-2-response"]["root_cause"] == "a leaking pool"
    # Who approved, verified: the request, the sealed vote (its seal still holds) and the
    # decision leave with the run.
    assert answers["approval-request-p1"]["actions"] == ["delete old runs"]
    assert open_vote(answers["approval-vote-nonce1"], KEY) == vote
    decision = answers["approval-decision-p1"]
    assert decision["state"] == "approved"
    assert [(a["approver"], a["channel"], a["counted"]) for a in decision["approvers"]] == [
        ("on-call", "link", True)
    ]


def test_the_export_file_is_0600_whatever_the_umask(world: World, tmp_path: Path) -> None:
    with get_client(sync_client=True) as c:
        _run(c)
    before = os.umask(0)  # the most permissive: a plain create would give 0666
    try:
        out = audit_retention(
            RetentionParams(dry_run=False, auto_approve=True, export_dir=str(tmp_path / "m"))
        )
    finally:
        os.umask(before)
    assert out.deleted >= 1 and out.export_file
    assert stat.S_IMODE(os.stat(out.export_file).st_mode) == 0o600


def test_the_export_name_is_synced_before_anything_is_deleted(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash cannot be simulated here: the test watches the calls that make it safe."""
    with get_client(sync_client=True) as c:
        _run(c)
    events: list[tuple[str, str]] = []
    real_fsync, real_delete = os.fsync, retention._bulk_delete

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            events.append(("folder synced", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def bulk_delete(*args: Any) -> list[str]:
        events.append(("delete", ""))
        return real_delete(*args)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(retention, "_bulk_delete", bulk_delete)
    folder = tmp_path / "new" / "export"  # two folders the run creates
    out = audit_retention(RetentionParams(dry_run=False, auto_approve=True, export_dir=str(folder)))
    assert out.deleted >= 1
    first_delete = events.index(("delete", ""))
    synced = {path for kind, path in events[:first_delete] if kind == "folder synced"}
    # The file's name is in `export`, `export`'s in `new`, `new`'s in tmp_path.
    assert {str(folder), str(folder.parent), str(tmp_path)} <= synced
