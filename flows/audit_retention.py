"""Flow `audit-retention`: export old flow runs (JSON lines, with artifacts), then delete them.

Why: Prefect OSS keeps every run forever; the 5-minute `pool-threshold` alone makes ~105,000
runs a year, and the UI's run list slows down with them.

Trigger: daily (catalog schedule, 03:30 UTC) and by hand from the UI.

Age: a run's `expected_start_time`, the time it was due to start (its schedule, or its
creation for a run started at once), set on every run whether it started or not, and moved
only when the run is scheduled again (a retry makes it young). Candidates are final runs due
more than `older_than_days` ago.

May change: deletes those runs (their task runs, states and inputs go with them in Prefect's
database; their logs are removed by Prefect's own background job) and those runs'
artifacts, through Prefect's API, after writing each batch to the export file and syncing
it to disk.

Never touched (an open incident, see docs/post-incident.md):

1. a run not in a final state (Scheduled, Pending, Running, Paused, Cancelling), whatever its
   age: only Completed, Failed, Cancelled and Crashed runs due before the cutoff are
   candidates, and the delete request itself repeats that filter (the guard is re-evaluated
   by the server in the same transaction);
2. a run of an incident still in progress: its `alert:<fp>` (or `incident:alert:<fp>`) key is
   carried by a run that is not final (a runbook run still going, a post-incident form
   waiting for answers); re-read before every batch;
3. a run that ran for an alert (`alert:<fp>`) with no post-incident record yet: no Completed
   `post-incident` run tagged `incident:alert:<fp>`. The receiver starts that record (a draft)
   when the alert resolves, so "no record" means the alert is still firing or its review
   has not been made;
4. a subflow whose parent run is still there and not deleted in the same batch (it goes
   with or after its parent).

On the driver (`flows/driver.py`): the check reads the open incidents and walks the
candidates without writing anything (what would go, what is kept and why); the plan is one
action, `delete-old-runs`, when any run can go; a dry run ends `planned`. The delete asks for
an approval in the run's own pause (Prefect UI) unless `auto_approve` is set: a scheduled run
deletes unattended only when the deployment's parameters say both `dry_run: false` and
`auto_approve: true` (without it, it waits `approval_timeout_s` and deletes nothing). Once
approved it counts again, then exports and deletes (outcome `acted`); nothing deletable is
`nothing to do`.

Safety limits: dry run by default (counts only, nothing written or deleted); `older_than_days`
at least 1; at most `max_runs` deleted per run; a batch (up to 200 runs, the API's page
limit) is deleted only once its lines are on disk (fsync; the export file's name too: its
folder is fsync'd when the file is created), 50 runs per delete call (Prefect's bulk-delete
limit); the export file is created mode 0600 whatever the umask. Undo: the export file holds
every deleted run, its task runs, artifacts, pause answers (approval, checklist) and approval
records (request, sealed votes, decision) as the API returned them.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self

import httpx
from prefect import get_run_logger, task
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterExpectedStartTime,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
    TaskRunFilter,
    TaskRunFilterId,
)
from prefect.client.schemas.objects import FlowRun, FlowRunInput, StateType
from pydantic import BaseModel, Field, model_validator

from flows.common import Report, md_code, table
from flows.driver import Held, Runbook, drive
from flows.spec import Action, ActionRecord, Outcome, RunbookParams, RunbookSpec, runbook_flow
from tasks.errors import PermanentError
from tasks.retry import RETRY_READ
from tasks.run_history import (
    PAGE,
    approval_records,
    artifacts_of,
    classified,
    every_run,
    incident_keys,
    page_of_runs,
    run_answers,
    task_runs_of,
)
from tasks.run_tags import alert_tag, parse_run_tags

RUNBOOK = "audit-retention"
POST_INCIDENT = "post-incident"
FINAL = [StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED]
NOT_FINAL = [
    StateType.SCHEDULED,
    StateType.PENDING,
    StateType.RUNNING,
    StateType.PAUSED,
    StateType.CANCELLING,
]
#: Prefect's `POST /flow_runs/bulk_delete` takes at most 50 runs per call.
BULK_LIMIT = 50


class RetentionParams(RunbookParams):
    """Parameters of the audit-retention flow (the form in the UI's Run dialog)."""

    older_than_days: float = Field(
        90, ge=1, le=36_500, description="Final runs due to start more than this many days ago."
    )
    export_dir: str = Field(
        ".prefect/audit-export",
        min_length=1,
        max_length=500,
        description="Folder of the JSON-lines export (one file per run of this flow).",
    )
    max_runs: int = Field(
        20_000, ge=1, le=1_000_000, description="Delete at most this many runs in one run."
    )
    batch_size: int = Field(
        PAGE,
        ge=1,
        le=PAGE,
        description="Runs read, exported and synced per batch (deleted 50 per API call).",
    )

    @model_validator(mode="after")
    def _export_dir_is_a_folder(self) -> Self:
        path = Path(self.export_dir).expanduser()
        if path.exists() and not path.is_dir():
            raise ValueError(f"export_dir {path} exists and is not a folder")
        return self


class RetentionOutcome(BaseModel):
    """What the run found and did."""

    outcome: Outcome = "nothing to do"
    dry_run: bool
    cutoff: datetime
    candidates: int = Field(description="Final runs due before the cutoff, seen.")
    exported: int = 0
    deleted: int = 0
    artifacts_deleted: int = 0
    kept: dict[str, int] = Field(default_factory=dict, description="Kept runs, by reason.")
    export_file: str | None = None
    elapsed_s: float = 0.0


class Protection(BaseModel):
    """Which incident keys are open, and which have a post-incident record."""

    open_keys: set[str] = Field(default_factory=set)
    recorded: set[str] = Field(default_factory=set)


def open_keys(client: SyncPrefectClient) -> set[str]:
    """Incident keys carried by a run that is not final: the incident is still going."""
    not_final = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=NOT_FINAL)))
    return {k for run in every_run(client, not_final) for k in incident_keys(run.tags)}


def recorded_keys(client: SyncPrefectClient) -> set[str]:
    """Incident keys with a finished post-incident record (draft or final)."""
    done = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED])),
        tags=FlowRunFilterTags(is_null_=False),
    )
    runs = every_run(client, done, FlowFilter(name=FlowFilterName(any_=[POST_INCIDENT])))
    return {key for r in runs for key in parse_run_tags(r.tags).incidents}


def keep_reason(run: FlowRun, protection: Protection) -> str | None:
    """Why this old, final run must stay (rules 2 and 3 of the module docstring), or None."""
    keys = incident_keys(run.tags)
    if keys & protection.open_keys:
        return "incident still open"
    alert_keys = {alert_tag(fp) for fp in parse_run_tags(run.tags).alerts}
    # run_count counts Running transitions: 0 for a run cancelled before it started (Prefect
    # sets start_time on that run too, so start_time cannot tell).
    if run.run_count > 0 and alert_keys - protection.recorded:
        return "no post-incident record yet"
    return None


def _candidates(cutoff: datetime) -> FlowRunFilter:
    return FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=FINAL)),
        expected_start_time=FlowRunFilterExpectedStartTime(before_=cutoff),
    )


def _parents_kept(client: SyncPrefectClient, runs: list[FlowRun], going: set[Any]) -> set[Any]:
    """Subflows whose parent run still exists and is not deleted in this batch (rule 4)."""
    children = {r.id: r.parent_task_run_id for r in runs if r.parent_task_run_id}
    if not children:
        return set()
    parents = client.read_task_runs(
        task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=list(set(children.values())))),
        limit=len(children) + 1,
    )
    owner = {t.id: t.flow_run_id for t in parents}
    return {
        child
        for child, task_run in children.items()
        if task_run in owner and owner[task_run] not in going
    }


def _line(
    run: FlowRun,
    flows: dict[Any, str],
    tasks: list[Any],
    artifacts: list[Any],
    answers: list[FlowRunInput],
) -> str:
    return json.dumps(
        {
            "flow_run": run.model_dump(mode="json"),
            "flow": flows.get(run.flow_id),
            "task_runs": [t.model_dump(mode="json") for t in tasks],
            "artifacts": [a.model_dump(mode="json") for a in artifacts],
            # Who approved and why (the Resume-form answers, and the approval request,
            # sealed votes and decision), and the checklist answers: Prefect deletes a
            # run's inputs with it, so the export is the only copy left.
            "inputs": [a.model_dump(mode="json") for a in answers],
        },
        separators=(",", ":"),
    )


def _bulk_delete(client: SyncPrefectClient, ids: list[Any], cutoff: datetime) -> list[str]:
    """Delete these runs, still final and still older than the cutoff (checked by the server)."""
    guard = FlowRunFilter(
        id=FlowRunFilterId(any_=ids),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=FINAL)),
        expected_start_time=FlowRunFilterExpectedStartTime(before_=cutoff),
    )
    # Prefect 3.9's client has no method for this endpoint: its own HTTP client, same auth.
    response = client._client.post(
        "/flow_runs/bulk_delete",
        json={"flow_runs": guard.model_dump(mode="json", exclude_unset=True), "limit": len(ids)},
    )
    response.raise_for_status()
    return [str(x) for x in response.json().get("deleted", [])]


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so the names created in it survive a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_export_file(folder: Path, name: str) -> Path:
    """Create `folder/name` empty, mode 0600, its name (and any new folder's) on disk.

    The file holds approvers' names, reasons and every deleted run: readable by its owner
    only, whatever the umask (`os.open` applies the umask to its mode, `fchmod` does not).
    The file's own fsync (per batch) does not make its directory entry durable: without
    the folder's fsync a crash after the delete could leave runs deleted and no export.
    """
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.fsync(fd)
    finally:
        os.close(fd)
    _sync_folder(folder)
    for created in missing:  # a new folder's own name is an entry of its parent
        _sync_folder(created.parent)
    return path


class Batch(BaseModel):
    """One batch's result."""

    seen: int
    exported: int = 0
    deleted: int = 0
    artifacts_deleted: int = 0
    kept: dict[str, int] = Field(default_factory=dict)


@task(**RETRY_READ)
def read_protection() -> Protection:
    """Read which incident keys are open and which have a post-incident record."""
    try:
        with get_client(sync_client=True) as client:
            return Protection(open_keys=open_keys(client), recorded=recorded_keys(client))
    except httpx.HTTPError as exc:
        raise classified(exc, "reading open incidents") from None


def process_batch(
    client: SyncPrefectClient,
    params: RetentionParams,
    cutoff: datetime,
    offset: int,
    limit: int,
    protection: Protection,
    out: Any,
) -> Batch:
    """Read one page of candidates; unless a dry run, export then delete the deletable ones."""
    page = page_of_runs(client, _candidates(cutoff), limit=limit, offset=offset)
    batch = Batch(seen=len(page))
    if not page:
        return batch
    if not params.dry_run:
        # Rule 2 re-read just before acting: an alert may have fired again meanwhile.
        protection = protection.model_copy(update={"open_keys": open_keys(client)})
    kept: Counter[str] = Counter()
    going = []
    for run in page:
        reason = keep_reason(run, protection)
        if reason:
            kept[reason] += 1
        else:
            going.append(run)
    sub = _parents_kept(client, going, {r.id for r in going})
    if sub:
        kept["parent run kept"] += len(sub)
        going = [r for r in going if r.id not in sub]
    batch.kept = dict(kept)
    if params.dry_run or not going:
        batch.exported = len(going) if params.dry_run else 0
        return batch
    ids = [r.id for r in going]
    task_runs = task_runs_of(client, ids)
    artifacts = artifacts_of(client, ids)
    flows = {f: client.read_flow(f).name for f in {r.flow_id for r in going}}
    for run in going:
        out.write(
            _line(
                run,
                flows,
                [t for t in task_runs if t.flow_run_id == run.id],
                [a for a in artifacts if a.flow_run_id == run.id],
                run_answers(client, run.id) + approval_records(client, run.id),
            )
            + "\n"
        )
    # On disk before anything is deleted: the export is the undo.
    out.flush()
    os.fsync(out.fileno())
    batch.exported = len(going)
    deleted: set[str] = set()
    for start in range(0, len(ids), BULK_LIMIT):
        deleted |= set(_bulk_delete(client, ids[start : start + BULK_LIMIT], cutoff))
    batch.deleted = len(deleted)
    for art in artifacts:
        if str(art.flow_run_id) in deleted:
            client.delete_artifact(art.id)
            batch.artifacts_deleted += 1
    return batch


@task(task_run_name="export-and-delete")
def export_and_delete(
    params: RetentionParams, cutoff: datetime, protection: Protection, path: Path | None
) -> RetentionOutcome:
    """Export then delete old runs batch by batch (no retry: a delete is not repeated)."""
    logger = get_run_logger()
    started = time.perf_counter()
    outcome = RetentionOutcome(
        dry_run=params.dry_run,
        cutoff=cutoff,
        candidates=0,
        export_file=str(path) if path else None,
    )
    kept: Counter[str] = Counter()
    offset = batches = 0
    out = path.open("a", encoding="utf-8") if path else open(os.devnull, "w")  # noqa: SIM115
    try:
        with get_client(sync_client=True) as client:
            while outcome.deleted < params.max_runs and outcome.exported < params.max_runs:
                limit = min(params.batch_size, params.max_runs - outcome.exported)
                batch = process_batch(client, params, cutoff, offset, limit, protection, out)
                if not batch.seen:
                    break
                outcome.candidates += batch.seen
                outcome.exported += batch.exported
                outcome.deleted += batch.deleted
                outcome.artifacts_deleted += batch.artifacts_deleted
                kept.update(batch.kept)
                # Deleted runs leave the list: the next page starts after what stayed.
                offset += batch.seen - batch.deleted
                batches += 1
                if batches % 25 == 0:  # a long first run shows where it is
                    logger.info(
                        "%d candidate(s) seen, %d exported, %d deleted",
                        outcome.candidates,
                        outcome.exported,
                        outcome.deleted,
                    )
                if batch.exported != batch.deleted and not params.dry_run:
                    logger.warning(
                        "%d exported run(s) not deleted (changed since read): kept",
                        batch.exported - batch.deleted,
                    )
    finally:
        out.close()
        outcome.kept = dict(kept)
        outcome.elapsed_s = round(time.perf_counter() - started, 3)
    return outcome


SPEC: RunbookSpec[RetentionParams] = RunbookSpec(
    name=RUNBOOK,
    title="Audit retention",
    severity=None,
)


class Found(BaseModel):
    """The check: the cutoff, the open incidents, and the old runs counted against them."""

    cutoff: datetime
    protection: Protection
    counted: RetentionOutcome = Field(description="A dry pass: candidates, deletable, kept.")


class RetentionRecord(ActionRecord):
    """What the export and delete did, in full."""

    done: RetentionOutcome


class DeleteOldRuns(Action):
    """Export the deletable old runs batch by batch, each batch synced, then delete them."""

    params: RetentionParams
    cutoff: datetime
    protection: Protection
    file_name: str

    def _folder(self) -> Path:
        return Path(self.params.export_dir).expanduser()

    def try_dry_run(self) -> str:
        folder = self._folder()
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermanentError(f"export folder {folder}: {existing} is not writable")
        return "export folder writable" if existing == folder else "export folder can be created"

    def undo(self) -> str:
        return (
            f"Each batch is written to {md_code(self._folder() / self.file_name)} (mode 0600)"
            " and synced before it is deleted: every deleted run, its task runs, artifacts"
            " and pause answers, as the API returned them."
        )

    def apply(self) -> ActionRecord:
        path = create_export_file(self._folder(), self.file_name)
        done = export_and_delete(self.params, self.cutoff, self.protection, path)
        return RetentionRecord(
            kind=self.kind,
            target=self.target,
            before=f"{done.candidates} candidate(s)",
            after=f"{done.deleted} deleted",
            message=f"exported {done.exported} run(s) to {path}, deleted {done.deleted} run(s)"
            f" and {done.artifacts_deleted} artifact(s) in {done.elapsed_s:.1f} s",
            done=done,
        )


class AuditRetention(Runbook[RetentionParams, Found]):
    """Count the old runs no open incident needs; export, then delete them once approved."""

    spec = SPEC

    def title(self, params: RetentionParams) -> str:
        return f"Audit retention: runs older than {params.older_than_days:g} days"

    def check(self, params: RetentionParams, report: Report) -> Found:
        cutoff = datetime.now(UTC) - timedelta(days=params.older_than_days)
        protection = read_protection()
        report.add(
            "Open incidents",
            f"{len(protection.open_keys)} open incident key(s), "
            f"{len(protection.recorded)} with a post-incident record.\n\n"
            + table(["open incident key"], [[k] for k in sorted(protection.open_keys)[:50]]),
        )
        # The same pass as the delete's, writing and deleting nothing.
        count = export_and_delete.with_options(task_run_name="count-old-runs")
        counted = count(params.model_copy(update={"dry_run": True}), cutoff, protection, None)
        report.add(
            "Old runs",
            f"Cutoff {cutoff.isoformat()} (due to start before); at most {params.max_runs}"
            f" run(s). {counted.candidates} candidate(s) seen: **{counted.exported}** can be"
            " exported and deleted."
            + (" Dry run: nothing written, nothing deleted." if params.dry_run else "")
            + "\n\n"
            + table(["kept because", "runs"], sorted(counted.kept.items())),
        )
        return Found(cutoff=cutoff, protection=protection, counted=counted)

    def plan(self, params: RetentionParams, findings: Found) -> list[Action]:
        n = findings.counted.exported
        if not n:
            return []
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        return [
            DeleteOldRuns(
                kind="delete-old-runs",
                target=f"final runs older than {params.older_than_days:g} days",
                summary=f"export then delete {n} run(s) due before"
                f" {findings.cutoff:%Y-%m-%d %H:%M} UTC into {params.export_dir}",
                approval="unless-auto",
                params=params,
                cutoff=findings.cutoff,
                protection=findings.protection,
                file_name=f"flow-runs-before-{findings.cutoff:%Y%m%d}-{stamp}.jsonl",
            )
        ]

    def act(
        self, params: RetentionParams, actions: list[Action], report: Report, held: Held
    ) -> list[ActionRecord]:
        records = super().act(params, actions, report, held)
        for record in records:
            if isinstance(record, RetentionRecord):
                kept = sorted(record.done.kept.items())
                report.add("Kept", table(["kept because", "runs"], kept))
        return records


@runbook_flow(SPEC)
def audit_retention(params: RetentionParams = RetentionParams()) -> RetentionOutcome:  # noqa: B008
    """Export, then delete, flow runs older than N days that no open incident needs."""
    result = drive(AuditRetention(), params)
    for record in result.records:
        if isinstance(record, RetentionRecord):
            return record.done.model_copy(update={"outcome": result.outcome})
    counted = (result.fresh or result.findings).counted
    # Nothing deleted: a dry run says what would go; any other run exported nothing.
    return counted.model_copy(
        update={
            "outcome": result.outcome,
            "dry_run": params.dry_run,
            "exported": counted.exported if params.dry_run else 0,
        }
    )
