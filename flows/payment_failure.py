"""Runbook `payment-failure`: the on-call runbook's "Payment Processing Failure".

Trigger: alert `PaymentFailuresHigh` (failed-payment ratio or failed-queue depth; route
`mode: approve`), or by hand from the Prefect UI.

Check (all at once, a source that fails is a row "unavailable", never a crash), after one
cheap authenticated read of the payments API (a missing or wrong token fails the run here,
clearly, with nothing retried and nothing leaked): the failed payments (API), the gateway's
status and a timed probe, the failed-transactions queue's depth and oldest entry (SQL view
and Redis stream), the payment lines of the backend's logs (error classes, credentials
scrubbed), and recent rollouts, flagged when one became current shortly before the first
failure (`tasks.kubernetes.began_after_rollout`, the dating rule of high-error-rate).
Finding failed payments pages the payments on-call as critical at once, with the run's
link; every later page of the run is a follow-up on the same incident (`escalate_update`:
`gateway-down`, `rto-at-risk`, `reconciliation-anomaly`, `rto-missed`), each sent once.

May change: one action, `retry-payments` (`flows/payments/actions.py`), on target
`payments:<api>`: the failed payments pinned when planned, retried through
`POST /api/payments/{id}/retry`, one idempotency key per payment and failed attempt
recorded in the key ledger before the call (`tasks/payments/keys.py`), re-used by task
retries and re-runs while its outcome is unknown. So no customer is charged twice.

Safety limits: dry run by default (the plan lists count, amounts by currency, the oldest
failure and the first ids); otherwise an approval (`unless-auto`). Under the target lock the
failed payments are read again: only those approved AND still failed are retried (failures
since are reported and left for the next run). Caps per run: payments, amount (minor units),
and a stop when the gateway's failure rate in this run passes `failure_rate_max`; 429 and
`Retry-After` are honoured engine-wide; bounded concurrency; batches are Prefect tasks with
a progress artifact.

Verify: reconcile every payment the run touched (API status and charges against the
gateway's charges): counts and amounts recovered, still failed with reason, anomalies, and
the time against the RTO (`rto_s`, 5 min). An anomaly, the gateway stop or a missed RTO
fails the run (`PaymentsNotRecovered`) after its follow-up pages.

Undo: a charge cannot be un-sent; refunds stay with the payments team. The artifact lists
every payment's outcome and key.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import get_run_logger
from prefect.context import FlowRunContext
from pydantic import BaseModel, Field

from flows.common import Report, md_escape, run_link, table
from flows.driver import Held, NotFixed, Runbook, RunResult, Stop, Verification, checks_md, drive
from flows.escalate import escalate_incident, escalate_update
from flows.payments.actions import RetryPaymentsAction
from flows.payments.evidence import Findings, measure
from flows.payments.params import RUNBOOK, PaymentFailureParams, amounts_text
from flows.payments.verify import PaymentVerification, verification_md, verify_payments
from flows.spec import (
    Action,
    ActionRecord,
    Check,
    LockTarget,
    Outcome,
    RunbookSpec,
    Severity,
    runbook_flow,
)
from tasks.payments.retry import RetryOutcome, RetryProgress, RetryRun
from tasks.settings import PaymentsSettings

__all__ = [
    "RUNBOOK",
    "SPEC",
    "PaymentFailure",
    "PaymentFailureOutcome",
    "PaymentFailureParams",
    "PaymentsNotRecovered",
    "payment_failure",
    "target_of",
]

TOPIC = "payments"


def target_of(params: PaymentFailureParams) -> str:
    """What the runbook changes: the payments API, `payments:<api url>`."""
    return f"payments:{PaymentsSettings().url}"


SPEC: RunbookSpec[PaymentFailureParams] = RunbookSpec(
    name=RUNBOOK,
    title="Payment processing failure",
    severity="critical",
    topic=TOPIC,
    lock=lambda p: LockTarget(target_of(p)),
    lock_timeout_s=600.0,
)


class PaymentsNotRecovered(NotFixed):
    """Reconciliation found an anomaly, the gateway stop fired, or the RTO was missed."""


class PaymentFailureOutcome(BaseModel):
    """What the run found and did."""

    outcome: Outcome
    note: str
    checks: list[Check]
    failed_found: int
    plan: list[RetryPaymentsAction]
    actions: list[ActionRecord] = Field(default_factory=list)
    approval: str | None = None
    retry: RetryRun | None = None
    verify: PaymentVerification | None = None
    new_since_approval: list[str] = Field(default_factory=list)


def _run_id() -> str | None:
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else None


class PaymentFailure(Runbook[PaymentFailureParams, Findings]):
    """Checks at once, page, retry the failed payments once each, reconcile against the RTO."""

    spec = SPEC
    not_fixed = PaymentsNotRecovered

    def __init__(self) -> None:
        self.paged = False
        self.updates: list[str] = []
        self.new_since_approval: list[str] = []
        self.retry: RetryRun | None = None
        self._onset: datetime | None = None

    def check(self, params: PaymentFailureParams, report: Report) -> Findings:
        found = self._measure(params, report, "")
        self._onset = found.onset
        if found.failed and not self.paged:
            self._page(params, found, report)
        if found.gateway_down:
            self._update("gateway-down", "the payment gateway is down (status/probe)", report)
        return found

    def remeasure(self, params: PaymentFailureParams, report: Report) -> Findings:
        return self._measure(params, report, " (re-measured under the lock)")

    def _measure(self, params: PaymentFailureParams, report: Report, when: str) -> Findings:
        found = measure(params)
        report.add("Evidence" + when, checks_md(found.checks))
        get_run_logger().info(
            "%d failed payment(s), %s; gateway down: %s",
            len(found.failed),
            amounts_text(found.amounts()),
            found.gateway_down,
        )
        return found

    def _page(self, params: PaymentFailureParams, found: Findings, report: Report) -> None:
        """The payments on-call, critical, at the start: one incident (this run) for every page."""
        run = _run_id()
        link = run_link(run) if run else ""
        summary = (
            f"{len(found.failed)} failed payment(s) ({amounts_text(found.amounts())}); "
            f"queue depth {found.queue_depth if found.queue_depth is not None else 'unknown'}. "
            f"The run: {link}"
        )
        paged = escalate_incident("critical", TOPIC, f"Payment processing failure: {summary}")
        self.paged = True
        sent = sorted({d.contact for d in paged.deliveries if d.status == "sent"}) if paged else []
        report.add(
            "Paged",
            f"**critical** (topic {TOPIC}): "
            + (md_escape(", ".join(sent)) if sent else "nobody newly reached")
            + ". Later pages of this run are follow-ups on the same incident.",
        )

    def _update(self, reason: str, summary: str, report: Report) -> None:
        """A follow-up on this run's incident, once per reason."""
        if reason in self.updates:
            return
        self.updates.append(reason)
        escalate_update(reason, TOPIC, summary)
        report.add(f"Follow-up page ({reason})", md_escape(summary))

    def plan(self, params: PaymentFailureParams, findings: Findings) -> list[Action]:
        if not findings.failed:
            return []
        return [RetryPaymentsAction.planned(target_of(params), findings.failed, params.caps())]

    def still_valid(
        self,
        params: PaymentFailureParams,
        approved: list[Action],
        fresh: list[Action],
        findings: Findings,
        now: Findings,
    ) -> list[Action] | Stop:
        """The approved payments that are still failed; those failed since wait for the next run."""
        still = {p.id for p in now.failed}
        acting: list[Action] = []
        for action in approved:
            if isinstance(action, RetryPaymentsAction):
                kept = action.narrowed(still)
                self.new_since_approval = sorted(still - set(action.payment_ids))
                if kept.payment_ids:
                    acting.append(kept)
        if acting:
            return acting
        return Stop("skipped", "none of the approved payments is still failed: nothing retried.")

    def act(
        self, params: PaymentFailureParams, actions: list[Action], report: Report, held: Held
    ) -> list[ActionRecord]:
        if self.new_since_approval:
            ids = self.new_since_approval
            report.add(
                "Failed since the approval",
                f"{len(ids)} payment(s) not approved, left for the next run: "
                + md_escape(", ".join(ids[:10]) + (" ..." if len(ids) > 10 else "")),
            )
        started = params.incident_started_at

        def watch(progress: RetryProgress) -> None:
            # Pages once when most of the RTO is gone and payments are still to go.
            begun = started or self._onset
            if begun is None or progress.done >= progress.total:
                return
            gone = (datetime.now(UTC) - begun).total_seconds()
            if gone >= params.rto_at_risk_share * params.rto_s:
                self._update(
                    "rto-at-risk",
                    f"{gone:.0f} s of the {params.rto_s:g} s RTO gone with "
                    f"{progress.total - progress.done} payment(s) still to retry",
                    report,
                )

        for action in actions:
            if isinstance(action, RetryPaymentsAction):
                action.on_progress(watch)
        records = super().act(params, actions, report, held)
        runs = [a.result for a in actions if isinstance(a, RetryPaymentsAction) and a.result]
        self.retry = runs[0] if runs else None
        if self.retry is not None:
            report.add("Retry outcomes", _outcomes_md(self.retry.outcomes))
        return records

    def verify(
        self,
        params: PaymentFailureParams,
        findings: Findings,
        records: list[ActionRecord],
        report: Report,
    ) -> Verification | None:
        if self.retry is None:
            return None
        result = verify_payments(params, self.retry, params.incident_started_at or findings.onset)
        report.add("Verify (reconciliation)", verification_md(result))
        rec = result.reconciliation
        if rec is None:
            self._update("reconciliation-unavailable", result.summary, report)
        elif rec.anomalies or rec.missing:
            self._update(
                "reconciliation-anomaly",
                f"{len(rec.anomalies) + len(rec.missing)} payment(s) whose backend and gateway"
                " views disagree; see the run's Verify section",
                report,
            )
        if result.gateway_stop:
            self._update("gateway-down", result.stopped or "gateway failure-rate stop", report)
        if not result.rto_met:
            self._update("rto-missed", result.summary, report)
        return result

    def escalation_severity(
        self, params: PaymentFailureParams, verification: Verification
    ) -> Severity | None:
        """None: the incident was paged at the start; `verify` sent its follow-ups (a second
        critical page on the same incident would be deduplicated away)."""
        return None

    def not_fixed_message(self, params: PaymentFailureParams, verification: Verification) -> str:
        return (
            f"payments not recovered cleanly ({verification.summary}); the payments on-call"
            " was paged (see the run's artifact)"
        )


def _outcomes_md(outcomes: list[RetryOutcome]) -> str:
    rows = [
        [o.payment_id, f"{o.currency} {o.amount}", o.result, o.calls, o.key or "-", o.error]
        for o in outcomes[:200]
    ]
    more = (
        f"\n\n_{len(outcomes) - 200} more in the flow's return value._"
        if len(outcomes) > 200
        else ""
    )
    return table(["payment", "amount", "result", "calls", "idempotency key", "error"], rows) + more


def outcome_of(result: RunResult[Findings], runbook: PaymentFailure) -> PaymentFailureOutcome:
    """The flow's return value from the driver's result."""
    verify = result.verification if isinstance(result.verification, PaymentVerification) else None
    return PaymentFailureOutcome(
        outcome=result.outcome,
        note=result.note,
        checks=result.findings.checks,
        failed_found=len(result.findings.failed),
        plan=[a for a in result.plan if isinstance(a, RetryPaymentsAction)],
        actions=result.records,
        approval=result.approval_line,
        retry=runbook.retry,
        verify=verify,
        new_since_approval=runbook.new_since_approval,
    )


@runbook_flow(SPEC)
def payment_failure(
    params: PaymentFailureParams = PaymentFailureParams(),  # noqa: B008
) -> PaymentFailureOutcome:
    """Check, page, retry the failed payments (each charged at most once) and reconcile."""
    runbook = PaymentFailure()
    return outcome_of(drive(runbook, params), runbook)
