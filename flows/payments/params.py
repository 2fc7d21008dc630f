"""The parameters of `payment-failure`: the caps of a run, the RTO, the evidence windows."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from flows.spec import RunbookParams
from tasks.payments.retry import RetryCaps

RUNBOOK = "payment-failure"


class PaymentFailureParams(RunbookParams):
    """Caps of the retry (a run never exceeds them) and what the run is judged against."""

    max_payments: int = Field(1000, ge=1, le=100_000, description="Payments retried per run.")
    max_amount: int = Field(
        5_000_000,
        ge=1,
        description="Amount retried per run, minor units summed over currencies; the run"
        " stops at the first payment that would pass it.",
    )
    failure_rate_max: float = Field(
        0.5, gt=0, le=1, description="Stop when this share of calls to the gateway fails."
    )
    failure_min_sample: int = Field(20, ge=1, le=10_000, description="Calls before that stop.")
    concurrency: int = Field(8, ge=1, le=100, description="Calls in flight at once.")
    batch_size: int = Field(200, ge=1, le=5000, description="Payments per batch (one task).")
    rto_s: float = Field(300, gt=0, le=86_400, description="Recovery time objective, seconds.")
    rto_at_risk_share: float = Field(
        0.6, gt=0, lt=1, description="Page `rto-at-risk` once this share of the RTO is gone."
    )
    incident_started_at: datetime | None = Field(
        None, description="The alert's start; unset: the oldest failed payment's time."
    )
    rollout_window_minutes: float = Field(
        30, ge=1, le=1440, description="A rollout this long before the first failure is flagged."
    )
    log_lines: int = Field(200, ge=10, le=5000, description="Log lines read per container.")

    def caps(self) -> RetryCaps:
        """The engine's caps from these parameters."""
        return RetryCaps(
            max_payments=self.max_payments,
            max_amount=self.max_amount,
            failure_rate_max=self.failure_rate_max,
            failure_min_sample=self.failure_min_sample,
            concurrency=self.concurrency,
            batch_size=self.batch_size,
        )


def amounts_text(amounts: dict[str, int]) -> str:
    """Amounts by currency as the report says them (minor units, exact)."""
    if not amounts:
        return "0"
    return ", ".join(f"{cur} {value:,} (minor)" for cur, value in sorted(amounts.items()))
