"""Flow `post-incident`: one readable record of an incident, from Prefect's own run history.

Trigger: the receiver starts it as a **draft** when an alert resolves whose runbook ran
(`deployments/receiver.py`); by hand from the UI (checklist form); or from a shell:
`python -m flows.post_incident --incident KEY --out DIR` (writes the record, asks nothing).

Incident key (`IncidentKey.parse`):

- `alert:<fingerprint>` (or a bare fingerprint): the runs the receiver tagged `alert:<fp>`,
  with the alerts coalesced with them in a storm (the run that covered it, the runs it
  covered: `covered-by:<run>` tags);
- `tag:<tag>`: every run carrying that tag;
- `<runbook>@<since>..<until>`: the runs of that runbook expected to start in the range.

Gathers, through the Prefect API: every flow run (with its subflows), task run, state change,
artifact, approval and notification (runs of the `escalate` flow) → one ordered timeline
with durations (each approval vote: who, through which channel — signed link, Slack, or
the UI's self-declared form — the decision, and whether it counted; see
`tasks/approvals/record.py`), the times to first action, approval and recovery, and the
on-call runbook's post-incident checklist, filled in a Prefect form (`ChecklistForm`),
each item with who and when. The same record is published as a markdown artifact and can
be exported as markdown and JSON (the JSON loads back into the same `PostIncidentRecord`).

May change: nothing outside this run (it reads the API; its form answers are its own run
inputs). Safety: read-only; human text (approver names, reasons, checklist answers) is
markdown-escaped in the artifact; the form's `filled_by` is self-declared, like the approver.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Self
from uuid import UUID

import httpx
from prefect import get_run_logger, task
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import Artifact, FlowRun, FlowRunInput, TaskRun
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import BaseModel, Field, ValidationError, model_validator

from flows.common import (
    Report,
    _end_expired_pause,
    md_escape,
    publish_on_exit,
    table,
    tag_run,
)
from flows.spec import RunbookSpec, dry_run_of, runbook_flow, spec_of
from tasks.approvals.record import run_approvals
from tasks.errors import PermanentError, TransientError
from tasks.retry import RETRY_READ
from tasks.run_history import (
    PAGE,
    Gathered,
    IncidentKey,
    classified,
    collect,
    created_at,
    run_answers,
)
from tasks.run_tags import incident_tag as incident_tag_of
from tasks.run_tags import parse_run_tags

RUNBOOK = "post-incident"
#: Runs of this flow are notifications (the escalation helper's flow); "none" is fine.
NOTIFY_FLOW = "escalate"

#: How each runbook says "recovered" when it has no `verify*` task: a Completed run whose
#: report (artifact description, `<runbook>: <outcome>`) ends with this outcome.
#: db-pool-exhausted fails its run (PoolStillExhausted) when usage stays above the healthy
#: mark after acting, so a Completed "acted" run is a passed verification. So does
#: high-error-rate (ErrorRateNotRecovered) when the 5xx ratio stays above its threshold,
#: and payment-failure (PaymentsNotRecovered) on a reconciliation anomaly, the gateway stop
#: or a missed RTO; system-outage (OutageNotRecovered) when the endpoint still fails from
#: outside after its restarts.
RECOVERED_WHEN = {
    "db-pool-exhausted": ": acted",
    "high-error-rate": ": acted",
    "payment-failure": ": acted",
    "system-outage": ": acted",
}

ChecklistName = Literal[
    "root_cause",
    "prevention",
    "runbook_update",
    "learning_session",
    "alert_thresholds",
    "customer_communication",
]
CHECKLIST: tuple[ChecklistName, ...] = (
    "root_cause",
    "prevention",
    "runbook_update",
    "learning_session",
    "alert_thresholds",
    "customer_communication",
)
CHECKLIST_TITLES: dict[ChecklistName, str] = {
    "root_cause": "Root cause identified and documented",
    "prevention": "Prevention measures implemented",
    "runbook_update": "Runbook updated with learnings",
    "learning_session": "Team learning session scheduled",
    "alert_thresholds": "Alert thresholds reviewed",
    "customer_communication": "Customer communication sent (if needed)",
}


class RunSummary(BaseModel):
    """One flow run of the incident."""

    id: UUID
    name: str
    flow: str
    parent_run_id: UUID | None = None
    tags: list[str] = Field(default_factory=list)
    state: str
    created: datetime | None = None
    start: datetime | None = None
    end: datetime | None = None
    duration_s: float | None = None
    dry_run: bool | None = None
    notification: bool = False


EventKind = Literal["alert", "state", "task", "artifact", "approval", "notification"]


class TimelineEvent(BaseModel):
    """One line of the timeline: what happened, when, for how long."""

    at: datetime
    offset_s: float = Field(description="Seconds since the incident started.")
    kind: EventKind
    run: str = Field(description="The flow run's name.")
    flow: str
    step: str
    detail: str = ""
    duration_s: float | None = None


class Metrics(BaseModel):
    """The three figures of the review, from the timeline."""

    started_at: datetime | None
    started_by: str = Field(description="What t0 is: the alert's startsAt or the first run.")
    first_action_at: datetime | None = None
    first_action_s: float | None = None
    approval_at: datetime | None = None
    approval_s: float | None = None
    approval_by: str | None = None
    recovered: bool = False
    recovery_at: datetime | None = None
    recovery_s: float | None = None
    recovery_by: str = Field("", description="The step whose success counts as recovery.")
    notifications: int = 0


class ChecklistItem(BaseModel):
    """One item of the on-call runbook's post-incident checklist."""

    item: ChecklistName
    title: str
    answer: str = ""
    by: str | None = None
    at: datetime | None = None

    @property
    def done(self) -> bool:
        return bool(self.answer.strip())


class Checklist(BaseModel):
    """The on-call runbook's six items, open until someone answers them in the form."""

    items: list[ChecklistItem] = Field(
        default_factory=lambda: [
            ChecklistItem(item=n, title=CHECKLIST_TITLES[n]) for n in CHECKLIST
        ]
    )

    @property
    def complete(self) -> bool:
        return all(i.done for i in self.items)

    def answer(self, name: ChecklistName) -> str:
        return next(i.answer for i in self.items if i.item == name)


class PostIncidentRecord(BaseModel):
    """The post-incident record: exported as JSON and markdown, loaded back the same."""

    incident: IncidentKey
    mode: Literal["draft", "final"]
    generated_at: datetime
    runs: list[RunSummary]
    timeline: list[TimelineEvent]
    metrics: Metrics
    checklist: Checklist = Field(default_factory=Checklist)


class ChecklistForm(RunInput):
    """The on-call runbook's post-incident checklist, filled by the on-call in the Prefect UI."""

    filled_by: str = Field(..., min_length=1, max_length=200, description="Your name.")
    root_cause: str = Field(
        "", max_length=4000, description="Root cause identified and documented."
    )
    prevention: str = Field("", max_length=4000, description="Prevention measures implemented.")
    runbook_update: str = Field("", max_length=4000, description="Runbook updated with learnings.")
    learning_session: str = Field("", max_length=4000, description="Learning session scheduled.")
    alert_thresholds: str = Field("", max_length=4000, description="Alert thresholds reviewed.")
    customer_communication: str = Field(
        "", max_length=4000, description="Customer communication sent (or: not needed, why)."
    )
    done: bool = Field(False, description="Tick to close the review; else the form stays open.")


class PostIncidentParams(BaseModel):
    """Parameters of the post-incident flow (the form in the UI's Run dialog)."""

    incident: str = Field(
        ...,
        min_length=1,
        max_length=300,
        description="alert:<fingerprint>, tag:<tag> or <runbook>@<since>..<until> (ISO times).",
    )
    draft: bool = Field(
        False, description="Build the timeline only; the checklist stays open (no form)."
    )
    form_timeout_s: int = Field(
        86_400, ge=10, le=7 * 86_400, description="How long each checklist form waits."
    )
    max_rounds: int = Field(6, ge=1, le=20, description="Forms at most, until all items answered.")
    export_dir: str | None = Field(
        None, max_length=500, description="Also write <key>.md and <key>.json into this folder."
    )

    @model_validator(mode="after")
    def _valid_key(self) -> Self:
        IncidentKey.parse(self.incident)  # a bad key is refused before anything runs
        return self


# --- gathering --------------------------------------------------------------------------


@task(**RETRY_READ, task_run_name="gather-incident")
def gather_incident(key: IncidentKey) -> Gathered:
    """Read every run, state, task run, artifact and form answer of the incident."""
    try:
        with get_client(sync_client=True) as client:
            return collect(client, key)
    except httpx.HTTPError as exc:  # PrefectHTTPStatusError included
        raise classified(exc, f"reading incident {key.label()}") from None


# --- the timeline -----------------------------------------------------------------------


def _secs(a: datetime | None, b: datetime | None) -> float | None:
    return None if a is None or b is None else round((b - a).total_seconds(), 6)


def _fired_at(run: FlowRun) -> datetime | None:
    """The alert's startsAt, from the receiver's idempotency key `<fp>:<startsAt>`."""
    if not parse_run_tags(run.tags).from_alert or not run.idempotency_key:
        return None
    _, _, stamp = run.idempotency_key.partition(":")
    # Alertmanager sends nanoseconds; Python parses microseconds.
    stamp = re.sub(r"(\.\d{6})\d+", r"\1", stamp.replace("Z", "+00:00"))
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return when if when.tzinfo else None


def _dry_run(run: FlowRun, flow_name: str) -> bool | None:
    """The run's dry-run field as its runbook declares it (a flow is named as its runbook)."""
    params = run.parameters.get("params") if run.parameters else None
    return dry_run_of(spec_of(flow_name), params) if isinstance(params, dict) else None


def _decoded(value: FlowRunInput) -> dict[str, Any]:
    try:
        data = json.loads(value.value)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class _Timeline:
    """The events of `build_record` as they are found, and the moments the figures need."""

    raw: list[tuple[datetime, int, dict[str, Any]]] = field(default_factory=list)
    first_action: tuple[datetime, str] | None = None
    approval: tuple[datetime, str, str] | None = None
    recovery: tuple[datetime, str] | None = None
    notifications: int = 0

    def add(self, at: datetime | None, **fields: Any) -> None:
        """An event; the sequence number keeps events of the same instant in found order."""
        if at is not None:
            self.raw.append((at, len(self.raw), fields))


def build_record(
    key: IncidentKey,
    data: Gathered,
    *,
    mode: Literal["draft", "final"],
    checklist: Checklist | None = None,
    now: datetime | None = None,
) -> PostIncidentRecord:
    """The ordered timeline and the figures, from what `collect` read."""
    runs = sorted(
        data.runs,
        key=lambda r: r.created or r.expected_start_time or datetime.max.replace(tzinfo=UTC),
    )
    fired = [t for t in (_fired_at(r) for r in runs) if t is not None]
    tl = _Timeline()
    summaries: list[RunSummary] = []
    owner = {t.id: run_id for run_id, ts in data.task_runs.items() for t in ts}
    if fired:
        tl.add(min(fired), kind="alert", run="", flow="", step="alert fired", detail="startsAt")
    for run in runs:
        flow_name = data.flows.get(run.flow_id, "?")
        notify = flow_name == NOTIFY_FLOW
        tl.notifications += notify
        states = sorted(data.states.get(run.id, []), key=lambda s: s.timestamp)
        summaries.append(_summary(run, flow_name, notify, owner))
        base = {"run": run.name, "flow": flow_name}
        _add_states(tl, states, notify, base)
        _add_tasks(tl, run, data.task_runs.get(run.id, []), notify, base)
        _add_artifacts(tl, run, flow_name, data.artifacts.get(run.id, []), base)
        _add_approvals(
            tl, run, states, data.inputs.get(run.id, []), data.approvals.get(run.id, []), base
        )
    if not runs:
        raise PermanentError(f"no runs found for incident {key.label()}")
    raw = tl.raw
    raw.sort(key=lambda x: (x[0], x[1]))
    t0 = min(fired) if fired else (raw[0][0] if raw else None)
    timeline = [
        TimelineEvent(at=at, offset_s=_secs(t0, at) or 0.0, **fields) for at, _, fields in raw
    ]
    return PostIncidentRecord(
        incident=key,
        mode=mode,
        generated_at=now or datetime.now(UTC),
        runs=summaries,
        timeline=timeline,
        metrics=_metrics(tl, t0, bool(fired)),
        checklist=checklist or Checklist(),
    )


def _summary(run: FlowRun, flow_name: str, notify: bool, owner: dict[UUID, UUID]) -> RunSummary:
    """One run of the incident, as the record lists it."""
    final = run.state.name if run.state else "unknown"
    return RunSummary(
        id=run.id,
        name=run.name,
        flow=flow_name,
        parent_run_id=owner.get(run.parent_task_run_id) if run.parent_task_run_id else None,
        tags=sorted(run.tags or []),
        state=final,
        created=run.created,
        start=run.start_time,
        end=run.end_time,
        duration_s=_secs(run.start_time, run.end_time),
        dry_run=_dry_run(run, flow_name),
        notification=notify,
    )


def _add_states(tl: _Timeline, states: list[Any], notify: bool, base: dict[str, str]) -> None:
    """Each state change of the run, lasting until the next one."""
    for i, state in enumerate(states):
        after = states[i + 1].timestamp if i + 1 < len(states) else None
        tl.add(
            state.timestamp,
            kind="notification" if notify and state.is_final() else "state",
            step=state.name or state.type.value,
            detail=(state.message or "")[:300],
            duration_s=_secs(state.timestamp, after),
            **base,
        )


def _add_tasks(
    tl: _Timeline, run: FlowRun, task_runs: list[TaskRun], notify: bool, base: dict[str, str]
) -> None:
    """Each task run; the first action (a task of a non-notification run) and a passed
    `verify*` task (recovery)."""
    for t in sorted(
        task_runs,
        key=lambda t: (
            t.start_time or t.expected_start_time or run.created or datetime.max.replace(tzinfo=UTC)
        ),
    ):
        at = t.start_time or t.expected_start_time
        tstate = t.state.name if t.state else "unknown"
        attempts = f"; {t.run_count} attempts" if t.run_count > 1 else ""
        tl.add(
            at,
            kind="task",
            step=t.name,
            detail=f"{tstate}{attempts}",
            duration_s=_secs(t.start_time, t.end_time),
            **base,
        )
        if (
            t.start_time is not None
            and not notify
            and (tl.first_action is None or t.start_time < tl.first_action[0])
        ):
            tl.first_action = (t.start_time, f"{run.name} / {t.name}")
        if (
            t.name.startswith("verify")
            and t.state is not None
            and t.state.is_completed()
            and t.end_time is not None
            and (tl.recovery is None or t.end_time < tl.recovery[0])
        ):
            tl.recovery = (t.end_time, f"{run.name} / {t.name}")


def _add_artifacts(
    tl: _Timeline, run: FlowRun, flow_name: str, artifacts: list[Artifact], base: dict[str, str]
) -> None:
    """Each artifact; a Completed run whose report says it recovered (`RECOVERED_WHEN`)."""
    for art in artifacts:
        tl.add(
            art.created,
            kind="artifact",
            step=art.key or art.type or "artifact",
            detail=(art.description or "")[:300],
            **base,
        )
        marker = RECOVERED_WHEN.get(flow_name)
        if (
            marker
            and run.state is not None
            and run.state.is_completed()
            and (art.description or "").endswith(marker)
            and run.end_time is not None
            and (tl.recovery is None or run.end_time < tl.recovery[0])
        ):
            tl.recovery = (run.end_time, f"{run.name} (Completed, {marker.strip(': ')})")


def _add_approvals(
    tl: _Timeline,
    run: FlowRun,
    states: list[Any],
    answers: list[FlowRunInput],
    records: list[FlowRunInput],
    base: dict[str, str],
) -> None:
    """Each vote (who, channel, decision, counted or why not), timed from the pause it
    answered; the moment and the approvers that decided the run's approval."""
    found = run_approvals(answers, records)
    if found is None:
        return
    paused = [s.timestamp for s in states if s.is_paused()]
    for vote in found.votes:
        asked = max((t for t in paused if t <= vote.at), default=None)
        tl.add(
            vote.at,
            kind="approval",
            step="approved" if vote.choice == "approve" else "refused",
            detail=vote.line(),
            duration_s=_secs(asked, vote.at),
            **base,
        )
    if found.approved_at and (tl.approval is None or found.approved_at < tl.approval[0]):
        tl.approval = (found.approved_at, found.by(), run.name)


def _metrics(tl: _Timeline, t0: datetime | None, fired: bool) -> Metrics:
    """Times to first action, approval and recovery, from the incident's start `t0`."""
    metrics = Metrics(
        started_at=t0,
        started_by="alert startsAt" if fired else "first recorded event",
        notifications=tl.notifications,
    )
    if tl.first_action:
        metrics.first_action_at, metrics.first_action_s = (
            tl.first_action[0],
            _secs(t0, tl.first_action[0]),
        )
    if tl.approval:
        metrics.approval_at, metrics.approval_by = tl.approval[0], tl.approval[1]
        metrics.approval_s = _secs(t0, tl.approval[0])
    if tl.recovery:
        metrics.recovered = True
        metrics.recovery_at, metrics.recovery_s = tl.recovery[0], _secs(t0, tl.recovery[0])
        metrics.recovery_by = tl.recovery[1]
    return metrics


# --- the checklist ----------------------------------------------------------------------


def checklist_from_inputs(answers: Iterable[FlowRunInput]) -> Checklist:
    """The checklist from the form answers, oldest first: an item's who/when is the answer
    that last changed its text (a form re-sent with the same text keeps the first author)."""
    checklist = Checklist()
    for answer in sorted(answers, key=created_at):
        value = _decoded(answer)
        if "filled_by" not in value:
            continue  # an approval answer, not a checklist
        try:
            form = ChecklistForm.model_validate(value)
        except ValidationError:
            continue
        for item in checklist.items:
            text = str(getattr(form, item.item)).strip()
            if text and text != item.answer:
                item.answer, item.by, item.at = text, form.filled_by, answer.created
    return checklist


def recorded_checklist(client: SyncPrefectClient, key: IncidentKey) -> Checklist:
    """The checklist as answered in this incident's post-incident runs (tag `incident:<key>`)."""
    runs = client.read_flow_runs(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[RUNBOOK])),
        flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[incident_tag(key)])),
        limit=PAGE,
    )
    answers = [a for r in runs for a in run_answers(client, r.id)]
    return checklist_from_inputs(answers)


def incident_tag(key: IncidentKey) -> str:
    """The tag a post-incident run carries, so retention and the CLI find its record."""
    return incident_tag_of(key.label())[:250]


# --- markdown and export ----------------------------------------------------------------


def _fmt_s(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f} s" if value < 120 else f"{value:.0f} s ({timedelta(seconds=round(value))})"


def _stamp(at: datetime | None) -> str:
    return at.astimezone(UTC).isoformat(timespec="milliseconds") if at else "—"


def record_markdown(record: PostIncidentRecord) -> str:
    """The record as the markdown attached to a ticket (and the run's artifact)."""
    m = record.metrics
    # Plain text: table() escapes every cell (approver names are typed by humans).
    recovery = f"{_fmt_s(m.recovery_s)} ({m.recovery_by})" if m.recovered else "NOT recovered"
    approval = f"{_fmt_s(m.approval_s)} (by {m.approval_by})" if m.approval_at else "no approval"
    lines = [
        f"# Post-incident record: {md_escape(record.incident.label())}",
        "",
        f"_{record.mode} · generated {_stamp(record.generated_at)}_",
        "",
        "## Figures",
        "",
        table(
            ["figure", "value"],
            [
                ["incident start (t0)", f"{_stamp(m.started_at)} ({m.started_by})"],
                ["time to first action", f"{_fmt_s(m.first_action_s)}"],
                ["time to approval", approval],
                ["time to recovery", recovery],
                ["notifications", m.notifications or "none"],
            ],
        ),
        "",
        "## Runs",
        "",
        table(
            ["run", "flow", "state", "dry run", "start", "end", "duration"],
            [
                [
                    r.name,
                    r.flow,
                    r.state,
                    "—" if r.dry_run is None else r.dry_run,
                    _stamp(r.start),
                    _stamp(r.end),
                    _fmt_s(r.duration_s),
                ]
                for r in record.runs
            ],
        ),
        "",
        "## Timeline",
        "",
        table(
            ["t0 +", "at", "kind", "run", "step", "duration", "detail"],
            [
                [
                    _fmt_s(e.offset_s),
                    _stamp(e.at),
                    e.kind,
                    e.run,
                    e.step,
                    _fmt_s(e.duration_s),
                    e.detail,
                ]
                for e in record.timeline
            ],
        ),
        "",
        "## Checklist",
        "",
        table(
            ["item", "answer", "by", "when"],
            [
                [i.title, i.answer or "open", i.by or "—", _stamp(i.at)]
                for i in record.checklist.items
            ],
        ),
        "",
    ]
    return "\n".join(lines)


def _file_stem(key: IncidentKey) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", key.label().lower()).strip("-")[:80]
    return f"post-incident-{slug}"


def export(record: PostIncidentRecord, out_dir: Path) -> tuple[Path, Path]:
    """Write `<stem>.md` and `<stem>.json`; the JSON loads back into the same record."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _file_stem(record.incident)
    md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    md.write_text(record_markdown(record), encoding="utf-8")
    js.write_text(record.model_dump_json(indent=2), encoding="utf-8")
    return md, js


def load(path: Path) -> PostIncidentRecord:
    """A record exported by `export`."""
    return PostIncidentRecord.model_validate_json(path.read_text(encoding="utf-8"))


# --- the flow ---------------------------------------------------------------------------


def _tag_incident(key: IncidentKey) -> None:
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    current = set(ctx.flow_run.tags or [])
    if incident_tag(key) not in current:
        with get_client(sync_client=True) as client:
            client.update_flow_run(ctx.flow_run.id, tags=sorted(current | {incident_tag(key)}))
            ctx.flow_run.tags = sorted(current | {incident_tag(key)})


def _own_answers() -> list[FlowRunInput]:
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return []
    with get_client(sync_client=True) as client:
        return run_answers(client, ctx.flow_run.id)


def _fill_checklist(params: PostIncidentParams, report: Report) -> Checklist:
    """Pause for the checklist form until every item is answered, `done`, or no answer."""
    logger = get_run_logger()
    checklist = checklist_from_inputs(_own_answers())
    for _ in range(params.max_rounds):
        if checklist.complete:
            break
        open_items = [i.title for i in checklist.items if not i.done]
        logger.warning("Post-incident checklist open: %s", "; ".join(open_items))
        prefill = {i.item: i.answer for i in checklist.items}
        try:
            answer = pause_flow_run(
                wait_for_input=ChecklistForm.with_initial_data(
                    description=f"Post-incident checklist for {params.incident}: "
                    + f"{len(open_items)} item(s) open",
                    **prefill,
                ),
                timeout=params.form_timeout_s,
                poll_interval=min(5, max(1, params.form_timeout_s // 4)),
            )
        except FlowPauseTimeout:
            # No answer: the record is kept with its items open, the run ends normally.
            _end_expired_pause()
            report.add(
                "Checklist form", f"no answer within {params.form_timeout_s} s: items stay open."
            )
            break
        checklist = checklist_from_inputs(_own_answers())
        if answer.done:
            break
    return checklist


SPEC: RunbookSpec[Any] = RunbookSpec(
    name=RUNBOOK,
    title="Post-incident record",
    severity=None,
    dry_run_field=None,
)


@runbook_flow(SPEC)
def post_incident(params: PostIncidentParams) -> PostIncidentRecord:
    """Build the incident's timeline and figures; fill the checklist form unless a draft."""
    key = IncidentKey.parse(params.incident)
    report = Report(RUNBOOK, f"Post-incident: {key.label()}")
    done: list[PostIncidentRecord] = []

    def summary() -> str:
        if not done:
            return f"{RUNBOOK} {key.label()}: stopped"
        m = done[0].metrics
        state = "recovered" if m.recovered else "not recovered"
        items = sum(i.done for i in done[0].checklist.items)
        return f"{RUNBOOK} {key.label()}: {done[0].mode}, {state}, checklist {items}/6"

    with publish_on_exit(report, summary):
        tag_run(RUNBOOK)
        _tag_incident(key)
        data = gather_incident(key)
        checklist = Checklist() if params.draft else _fill_checklist(params, report)
        record = build_record(
            key, data, mode="draft" if params.draft else "final", checklist=checklist
        )
        # The artifact is the record itself (the Report's header + the record's sections).
        report.add("Record", record_markdown(record).split("\n", 2)[2])
        if params.export_dir:
            md, js = export(record, Path(params.export_dir))
            report.add("Export", f"`{md.name}` and `{js.name}` in the export folder.")
        done.append(record)
        return record


# --- command line -----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flows.post_incident --incident KEY --out DIR`: write the record, ask nothing."""
    parser = argparse.ArgumentParser(prog="python -m flows.post_incident", description=main.__doc__)
    parser.add_argument(
        "--incident", required=True, help="alert:<fp>, tag:<tag> or <runbook>@<since>..<until>"
    )
    parser.add_argument("--out", required=True, type=Path, help="folder for the .md and .json")
    args = parser.parse_args(argv)
    try:
        key = IncidentKey.parse(args.incident)
        with get_client(sync_client=True) as client:
            data = collect(client, key)
            checklist = recorded_checklist(client, key)
        mode: Literal["draft", "final"] = "final" if checklist.complete else "draft"
        record = build_record(key, data, mode=mode, checklist=checklist)
    except (ValueError, PermanentError, TransientError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    md, js = export(record, args.out)
    print(md)
    print(js)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
