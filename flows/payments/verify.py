"""The verify of `payment-failure`: reconcile what the run touched, and time it against the RTO.

Not healthy (the driver fails the run; the runbook sends its follow-up pages) when
reconciliation finds an anomaly or a touched payment the API does not know, when the
gateway failure-rate stop fired, or when the RTO was missed (from the alert's start, or the
oldest failure, to the end of reconciliation).
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import Field

from flows.common import failure_text, md_escape, table
from flows.driver import Verification
from flows.payments.params import PaymentFailureParams, amounts_text
from tasks.errors import RunbookError
from tasks.payments.reconcile import Reconciliation, reconcile
from tasks.payments.retry import RetryRun


class PaymentVerification(Verification):
    """Reconciliation, the engine's stop, and the time against the RTO."""

    reconciliation: Reconciliation | None = Field(
        None, description="None: it could not be read (the reason in `summary`)."
    )
    stopped: str | None = None
    gateway_stop: bool = False
    not_attempted: int = 0
    started_at: datetime | None = None
    elapsed_s: float | None = Field(None, description="From the start to reconcile's end.")
    rto_s: float
    rto_met: bool


def touched_ids(run: RetryRun) -> list[str]:
    """The payments the run sent at least one call for (a key was pinned)."""
    return [o.payment_id for o in run.outcomes if o.calls > 0]


def verify_payments(
    params: PaymentFailureParams, run: RetryRun, onset: datetime | None
) -> PaymentVerification:
    """Reconcile the touched payments, then judge: anomalies, the gateway stop, the RTO."""
    unknown = [o.payment_id for o in run.outcomes if o.calls > 0 and not o.definite]
    try:
        rec: Reconciliation | None = reconcile(touched_ids(run), unknown)
        unreadable = ""
    except RunbookError as exc:
        rec, unreadable = None, failure_text(exc)
    ended = datetime.now(UTC)
    started = params.incident_started_at or onset
    elapsed = (ended - started).total_seconds() if started else None
    rto_met = elapsed is not None and elapsed <= params.rto_s
    gateway_stop = bool(run.stopped and run.stopped.startswith("gateway failure rate"))
    problems = []
    if rec is None:
        problems.append(f"reconciliation unavailable ({unreadable})")
    elif rec.anomalies or rec.missing:
        problems.append(f"{len(rec.anomalies) + len(rec.missing)} reconciliation anomaly(ies)")
    if gateway_stop:
        problems.append(f"stopped: {run.stopped}")
    if not rto_met:
        problems.append(
            f"RTO missed: {elapsed:.0f} s > {params.rto_s:g} s"
            if elapsed is not None
            else "RTO unknown: no start time"
        )
    figures = (
        f"{rec.recovered} of {rec.touched} touched payment(s) recovered "
        f"({amounts_text(rec.recovered_amounts)}), {len(rec.still_failed)} still failed"
        if rec is not None
        else f"{run.counts.get('succeeded', 0)} answered succeeded (not reconciled)"
    )
    summary = figures + (f"; {'; '.join(problems)}" if problems else "; reconciled, within the RTO")
    return PaymentVerification(
        healthy=not problems,
        summary=summary,
        reconciliation=rec,
        stopped=run.stopped,
        gateway_stop=gateway_stop,
        not_attempted=run.counts.get("not_attempted", 0),
        started_at=started,
        elapsed_s=round(elapsed, 1) if elapsed is not None else None,
        rto_s=params.rto_s,
        rto_met=rto_met,
    )


def verification_md(v: PaymentVerification) -> str:
    """The Verify section: counts and amounts, still failed with reasons, anomalies, the RTO."""
    rec = v.reconciliation
    if rec is None:
        return f"**Not reconciled**: {md_escape(v.summary)}."
    rto = (
        f"{v.elapsed_s:.0f} s from {v.started_at:%H:%M:%S} UTC against the {v.rto_s:g} s RTO: "
        + ("**met**" if v.rto_met else "**MISSED**")
        if v.elapsed_s is not None and v.started_at is not None
        else "no start time: the RTO cannot be judged"
    )
    parts = [
        f"Touched **{rec.touched}**; recovered **{rec.recovered}** "
        f"({md_escape(amounts_text(rec.recovered_amounts))}); still failed "
        f"**{len(rec.still_failed)}** ({md_escape(amounts_text(rec.still_failed_amounts))}); "
        f"not attempted (left for the next run) **{v.not_attempted}**.",
        f"Time to recover: {rto}.",
    ]
    if v.stopped:
        parts.append(f"The retry stopped early: {md_escape(v.stopped)}.")
    if rec.still_failed:
        parts.append(
            "Still failed:\n\n"
            + table(
                ["payment", "amount", "reason"],
                [
                    [s.payment_id, f"{s.currency} {s.amount}", s.reason]
                    for s in rec.still_failed[:50]
                ],
            )
        )
    anomalies = [[a.payment_id, a.problem] for a in rec.anomalies] + [
        [pid, "touched, unknown to the payments API"] for pid in rec.missing
    ]
    parts.append(
        "Anomalies:\n\n" + table(["payment", "problem"], anomalies[:100])
        if anomalies
        else "Anomalies: **none** (at most one charge per payment; backend and gateway agree)."
    )
    return "\n\n".join(parts)
