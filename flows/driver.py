"""The one safety sequence every acting runbook runs, written once.

    request -> check -> plan -> (empty: nothing to do) -> dry run: planned
      -> refusals before asking (cooldown, thresholds) -> approval per the actions' policies
      -> target lock -> re-measure and re-plan -> still valid? -> alert still firing?
      -> act (undo recorded first) -> verify -> not fixed: escalate -> report on every path

A runbook is a `Runbook` subclass: it supplies `check`, `plan`, `still_valid`, `act` (the
default applies each action in order) and `verify`; the driver owns the order, the
approval, the lock, the audit artifact and the escalation. An empty plan asks nobody.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from prefect import get_run_logger
from prefect.context import FlowRunContext
from pydantic import BaseModel

from flows.approval import Asked, Decision, request_approval
from flows.common import (
    Report,
    alert_resolved,
    md_escape,
    publish_on_exit,
    run_link,
    run_source,
    table,
    tag_run,
)
from flows.escalate import escalate_incident
from flows.spec import (
    Action,
    ActionRecord,
    Check,
    Outcome,
    P,
    RequestParams,
    RunbookParams,
    RunbookSpec,
    Severity,
)
from tasks.errors import RunbookError, SafetyViolation
from tasks.locks import target_lock

F = TypeVar("F")


class PartlyDone(RunbookError):
    """An action refused after earlier ones were applied: the run fails, saying which were."""


class NotFixed(RunbookError):
    """Verification failed after acting (or with nothing left to do): escalated; the run fails."""


class Verification(BaseModel):
    """The check after acting: fixed or not, and the figures that say so."""

    healthy: bool
    summary: str


@dataclass
class Stop:
    """A reason to end the run before acting, with the outcome it ends in."""

    outcome: Outcome
    note: str


@dataclass
class Held:
    """The locks an acting run holds: how long it waited for them, and any extra state."""

    waited_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    #: The actions applied so far (a later one refusing must not read as "nothing changed").
    done: list[ActionRecord] = field(default_factory=list)


@dataclass
class RunResult(Generic[F]):
    """Everything the sequence saw and did, for the flow's return value."""

    outcome: Outcome
    note: str
    findings: F
    plan: list[Action]
    acted_on: list[Action] = field(default_factory=list)
    records: list[ActionRecord] = field(default_factory=list)
    fresh: F | None = None
    verification: Verification | None = None
    approval: Decision | None = None

    @property
    def approval_line(self) -> str | None:
        """The approval as the report says it, or None when nobody was asked."""
        return self.approval.line() if self.approval else None


class Runbook(Generic[P, F]):
    """One runbook: its spec and the steps only it knows. The driver (`drive`) runs them."""

    spec: ClassVar[RunbookSpec[Any]]
    #: What the run fails with when verification says not fixed (a runbook may subclass it).
    not_fixed: ClassVar[type[NotFixed]] = NotFixed

    def title(self, params: P) -> str:
        """The artifact's title."""
        return self.spec.title

    def check(self, params: P, report: Report) -> F:
        """Gather the evidence (read only) and add it to the report."""
        raise NotImplementedError

    def plan(self, params: P, findings: F) -> list[Action]:
        """The actions the evidence calls for, each pinned by a read; nothing written."""
        raise NotImplementedError

    def refuse(self, params: P, findings: F) -> Stop | None:
        """A reason not to act that needs no approval to see (cooldown, below a threshold)."""
        return None

    def remeasure(self, params: P, report: Report) -> F:
        """Under the lock: the evidence again (the full check unless a runbook needs less)."""
        return self.check(params, report)

    def still_valid(
        self, params: P, approved: list[Action], fresh: list[Action], findings: F, now: F
    ) -> list[Action] | Stop:
        """The fresh plan's actions that were approved and still hold, or why none do."""
        acting = [a for a in fresh if a.possible and any(a.same_as(b) for b in approved)]
        if acting:
            return acting
        return Stop("skipped", "nothing approved still holds after measuring again: no change.")

    @contextmanager
    def hold(self, params: P, report: Report) -> Iterator[Held]:
        """The locks an acting run holds: the spec's target lock (override to add more)."""
        lock = self.spec.lock(params) if self.spec.lock else None
        if lock is None:
            yield Held()
            return
        with target_lock(lock.key, within=lock.within, timeout_s=self.spec.lock_timeout_s) as w:
            report.add("Target lock", f"Held {md_escape(lock.key)} (waited {w:.1f} s).")
            yield Held(waited_s=w)

    def act(
        self, params: P, actions: list[Action], report: Report, held: Held
    ) -> list[ActionRecord]:
        """Apply each action in order; its undo goes into the report before its write."""
        records: list[ActionRecord] = []
        for action in actions:
            undo = action.undo()
            if undo:
                report.add(f"Undo record ({action.kind})", undo)
            record = action.apply()
            records.append(record.model_copy(update={"undo": record.undo or undo}))
            held.done.append(records[-1])
            report.add(f"Done ({action.kind})", records_md(records[-1:]))
        return records

    def verify(
        self, params: P, findings: F, records: list[ActionRecord], report: Report
    ) -> Verification | None:
        """After acting (or with nothing to do): fixed? None = nothing to verify."""
        return None

    def not_fixed_message(self, params: P, verification: Verification) -> str:
        """The page's summary when verification fails."""
        return f"{self.spec.name}: not fixed: {verification.summary}"

    def concluded(self, params: P, result: RunResult[F], report: Report) -> None:
        """The sequence ended with an outcome: last words for the report (what stays staged)."""

    def stopped(self, params: P, report: Report) -> str | None:
        """An exception stopped the run: what it may have left behind (None: say nothing)."""
        return None

    def escalation_severity(self, params: P, verification: Verification) -> Severity | None:
        """The severity a failed verification pages with; None = fail without paging."""
        return self.spec.severity


# ------------------------------------------------------------------------------ report text


def checks_md(rows: Sequence[Check]) -> str:
    """The evidence table, the same columns in every runbook."""
    return table(
        ["check", "threshold", "observed", "verdict", "detail"],
        [[r.item, r.threshold or "-", r.observed, r.verdict.value, r.detail] for r in rows],
    )


def plan_md(plan: Sequence[Action]) -> str:
    """The plan table: each action, whether it can run, and its dry run's answer."""
    rows = [
        [
            a.kind if a.possible else f"{a.kind} (not possible)",
            a.target,
            a.summary,
            a.approval,
            a.dry_run_result or "-",
        ]
        for a in plan
    ]
    return table(["action", "target", "plan", "approval", "dry run"], rows)


def records_md(records: Sequence[ActionRecord]) -> str:
    """What was done, with the previous values."""
    return table(
        ["action", "target", "before", "after", "result"],
        [[r.kind, r.target, r.before, r.after, r.message] for r in records],
    )


# ------------------------------------------------------------------------------ the sequence


def drive(runbook: Runbook[P, F], params: P) -> RunResult[F]:
    """Run the sequence; the artifact is published on every path, escalation when not fixed."""
    spec = runbook.spec
    report = Report(spec.name, runbook.title(params))
    done: list[RunResult[F]] = []

    def summary() -> str:
        return f"{spec.name}: {done[0].outcome}" if done else f"{spec.name}: stopped"

    with publish_on_exit(report, summary):
        try:
            result = _sequence(runbook, params, report)
        except Exception:
            left = runbook.stopped(params, report)
            if left:
                report.add("Stopped", left)
            raise
        runbook.concluded(params, result, report)
        done.append(result)
        verification = result.verification
        if verification is not None and not verification.healthy:
            _escalate(runbook, params, verification, report)
            message = runbook.not_fixed_message(params, verification)
            result.outcome, result.note = "failed", message
            _outcome(report, result.outcome, result.note)
            raise runbook.not_fixed(message)
        return result


def _sequence(runbook: Runbook[P, F], params: P, report: Report) -> RunResult[F]:
    source = tag_run(runbook.spec.name)
    _request(report, params, source)
    findings = runbook.check(params, report)
    try:
        plan = runbook.plan(params, findings)
    except SafetyViolation as exc:
        # A plan a guard will not even let us make (e.g. no cache key pattern configured)
        # is a refusal, dry run or not: there is nothing to approve.
        note = f"{exc}. Nothing changed."
        _outcome(report, "refused", note)
        return RunResult("refused", note, findings, [])
    doable = [a for a in plan if a.possible]
    dry_run = is_dry_run(params)
    if dry_run:
        for action in doable:
            action.dry_run_result = _dry_run(action)
    report.add("Plan", plan_md(plan) if plan else "_Nothing to do._")

    def finish(outcome: Outcome, note: str, **kw: Any) -> RunResult[F]:
        if not _failing(kw.get("verification")):  # else `drive` writes the one outcome: failed
            _outcome(report, outcome, note)
        return RunResult(outcome, note, findings, plan, **kw)

    if not doable:
        verification = None if dry_run else runbook.verify(params, findings, [], report)
        return finish(
            "nothing to do",
            "the plan is empty: nobody was asked and nothing changed.",
            verification=verification,
        )
    if dry_run:
        return finish("planned", "dry run: nothing changed. Re-run with dry_run off to act.")
    stop = runbook.refuse(params, findings)
    if stop is not None:
        return finish(stop.outcome, stop.note)
    decision = _approve(runbook, params, doable, report)
    if decision is not None and not decision.approved:
        return finish("refused", "not approved: nothing changed.", approval=decision)
    try:
        return _under_lock(runbook, params, report, findings, plan, doable, decision)
    except SafetyViolation as exc:
        return finish("refused", f"{exc}. Nothing changed.", approval=decision)


def _under_lock(
    runbook: Runbook[P, F],
    params: P,
    report: Report,
    findings: F,
    plan: list[Action],
    doable: list[Action],
    decision: Decision | None,
) -> RunResult[F]:
    with ExitStack() as stack:
        held = stack.enter_context(runbook.hold(params, report))
        # Whoever approved (a human, the route or auto_approve), the run may have waited, for
        # the approval or for another run on the target: measure again, plan again, and act
        # only on what was approved and still holds.
        fresh = runbook.remeasure(params, report)
        replan = runbook.plan(params, fresh)

        def finish(outcome: Outcome, note: str, **kw: Any) -> RunResult[F]:
            if not _failing(kw.get("verification")):
                _outcome(report, outcome, note)
            return RunResult(outcome, note, findings, plan, fresh=fresh, approval=decision, **kw)

        stop = runbook.refuse(params, fresh)
        acting = runbook.still_valid(params, doable, replan, findings, fresh)
        going = ""
        if isinstance(acting, list) and stop is None:
            going = ", ".join(a.kind for a in acting)
        report.add(
            "Re-planned after approval" if decision else "Re-planned under the lock",
            (plan_md(replan) if replan else "_Nothing to do now._")
            + f"\n\nApproved and still holding: {md_escape(going or 'none')}.",
        )
        if stop is None and isinstance(acting, Stop):
            stop = acting
        if stop is not None:
            return finish(stop.outcome, stop.note + f" (waited {held.waited_s:.0f} s for the lock)")
        assert isinstance(acting, list)
        # The run may have waited: the alert that started it has the last word.
        stale = alert_resolved(report)
        if stale is not None:
            return finish("skipped", stale)
        try:
            records = runbook.act(params, acting, report, held)
        except SafetyViolation as exc:
            if not held.done:
                raise  # the first write refused itself: nothing changed (refused)
            kinds = ", ".join(r.kind for r in held.done)
            raise PartlyDone(f"{exc}; already applied: {kinds} (see the Done sections)") from exc
        # Verified with the lock still held: a run waiting for it measures the world after
        # this remediation has shown its effect, not halfway through it.
        verification = runbook.verify(params, findings, records, report)
    note = f"{len(records)} action(s) taken" + (
        f"; {verification.summary}" if verification else "."
    )
    return finish("acted", note, acted_on=acting, records=records, verification=verification)


def is_dry_run(params: RequestParams) -> bool:
    """Plan only? A read-only runbook's params (no `dry_run`) never are: it changes nothing."""
    return isinstance(params, RunbookParams) and params.dry_run


def _request(report: Report, params: RequestParams, source: str) -> None:
    mode = (
        f"; dry run: **{params.dry_run}**; auto approve: **{params.auto_approve}**"
        if isinstance(params, RunbookParams)
        else ""
    )
    report.add(
        "Request",
        f"Requested by **{md_escape(params.requested_by or source)}** (source: {source}){mode}."
        + (f"\n\nReason: {md_escape(params.reason)}" if params.reason else ""),
    )


def _dry_run(action: Action) -> str:
    try:
        return action.try_dry_run()
    except RunbookError as exc:
        return f"refused: {type(exc).__name__}: {str(exc)[:300]}"


def needs_approval(actions: Sequence[Action], auto_approve: bool) -> bool:
    """Whether a human must agree: an `always` action, or an `unless-auto` one without auto."""
    return any(
        a.approval == "always" or (a.approval == "unless-auto" and not auto_approve)
        for a in actions
    )


def _approve(
    runbook: Runbook[P, F], params: P, doable: list[Action], report: Report
) -> Decision | None:
    auto = isinstance(params, RunbookParams) and params.auto_approve
    if not needs_approval(doable, auto):
        report.add("Approval", "not asked: every planned action may run unattended here.")
        return None
    text = "; ".join(a.describe() for a in doable)
    summary = f"{runbook.spec.name}: {text}"[:2000]
    unattended = run_source() in {"alert", "schedule"}
    if unattended:
        _page_for_approval(runbook, summary)
    timeout = params.approval_timeout_s if isinstance(params, RunbookParams) else 1200
    asked = Asked(
        runbook=runbook.spec.name,
        kinds=[a.kind for a in doable],
        actions=[a.describe() for a in doable],
        # What the approver reads on the link's page: the evidence and plan so far.
        evidence="\n".join(report.sections),
        page_links=unattended,
    )
    decision = request_approval(asked, list(doable), timeout)
    report.add("Approval", decision.markdown())
    return decision


def _page_for_approval(runbook: Runbook[Any, Any], summary: str) -> None:
    """An unattended run (alert, schedule) that pauses for approval pages its chain now,
    with the link to this paused run; a run a human started in the UI has its human."""
    if runbook.spec.severity is None:
        return
    ctx = FlowRunContext.get()
    link = run_link(ctx.flow_run.id) if ctx and ctx.flow_run else ""
    escalate_incident(
        runbook.spec.severity,
        runbook.spec.topic,
        f"Approval needed: {summary}\nThe allowed approvers got their own Approve and Refuse"
        " links." + (f"\nThe run: {link}" if link else ""),
    )


def _escalate(
    runbook: Runbook[P, F], params: P, verification: Verification, report: Report
) -> None:
    spec = runbook.spec
    severity = runbook.escalation_severity(params, verification)
    if severity is None:
        return
    paged = escalate_incident(severity, spec.topic, runbook.not_fixed_message(params, verification))
    sent = sorted({d.contact for d in paged.deliveries if d.status == "sent"}) if paged else []
    report.add(
        "Escalation",
        f"**{severity}** (topic {md_escape(spec.topic)}): "
        + (f"notified {md_escape(', '.join(sent))}" if sent else "nobody reached")
        + " (see the escalate subflow's artifact).",
    )


def _failing(verification: Verification | None) -> bool:
    """Verified and not healthy: the run escalates and fails."""
    return verification is not None and not verification.healthy


def _outcome(report: Report, outcome: Outcome, note: str) -> None:
    report.add("Outcome", f"**{outcome}**: {md_escape(note)}")
    get_run_logger().info("%s: %s", outcome, note)
