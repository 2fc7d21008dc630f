"""The one action of `payment-failure`: retry the failed payments pinned when planned.

Ids are pinned at plan time; the approval covers exactly them. Under the lock the runbook
keeps only those approved AND still failed (`narrowed`); a payment that failed since is
reported and left for the next run. `apply` re-reads them, runs the engine
(`tasks.payments.retry`) with each batch as a Prefect task, and keeps its result for verify.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import cast
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from pydantic import PrivateAttr

from flows.payments.params import amounts_text
from flows.spec import Action, ActionRecord
from tasks.clients import payments_http
from tasks.payments.api import Payment, get_payments
from tasks.payments.retry import (
    Engine,
    RetryCaps,
    RetryOutcome,
    RetryProgress,
    RetryRun,
    retry_batch,
    retry_payments,
)

#: Payment ids the plan, the approval form and the page show (the rest: counted).
SHOWN_IDS = 5


class RetryPaymentsAction(Action):
    """Retry the pinned failed payments through the API, one pinned key each, within caps."""

    kind: str = "retry-payments"
    payment_ids: list[str]
    amounts: dict[str, int]
    oldest: datetime | None = None
    caps: RetryCaps
    _result: RetryRun | None = PrivateAttr(None)
    _on_progress: Callable[[RetryProgress], None] | None = PrivateAttr(None)

    @classmethod
    def planned(cls, target: str, payments: list[Payment], caps: RetryCaps) -> RetryPaymentsAction:
        """The action for these failed payments (nothing written)."""
        amounts: dict[str, int] = {}
        for p in payments:
            amounts[p.currency] = amounts.get(p.currency, 0) + p.amount
        times = [p.failed_at for p in payments if p.failed_at]
        action = cls(
            target=target,
            summary="",
            payment_ids=[p.id for p in payments],
            amounts=amounts,
            oldest=min(times) if times else None,
            caps=caps,
        )
        action.summary = action.describe_plan()
        return action

    def describe_plan(self) -> str:
        """Count, amount by currency, the oldest, the first ids, the caps."""
        ids = self.payment_ids
        first = ", ".join(ids[:SHOWN_IDS]) + (
            f" and {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else ""
        )
        oldest = f"{self.oldest:%Y-%m-%d %H:%M:%S} UTC" if self.oldest else "unknown"
        return (
            f"retry {len(ids)} failed payment(s), {amounts_text(self.amounts)}; oldest failure "
            f"{oldest}; ids {first}; caps: {self.caps.max_payments} payment(s), "
            f"{self.caps.max_amount:,} minor units, stop at {self.caps.failure_rate_max:.0%} "
            "gateway failures; one idempotency key per payment, pinned before the call"
        )

    def narrowed(self, still_failed: set[str]) -> RetryPaymentsAction:
        """This action with only the payments still failed (the approval covers no others)."""
        kept = [pid for pid in self.payment_ids if pid in still_failed]
        action = self.model_copy(update={"payment_ids": kept})
        action.summary = action.describe_plan()
        return action

    def try_dry_run(self) -> str:
        return (
            f"nothing sent: {len(self.payment_ids)} payment(s) would be retried, each with the "
            "key pinned in the ledger (a key left open by an earlier run is re-used)"
        )

    def undo(self) -> str:
        return (
            "a charge cannot be un-sent: refunds stay with the payments team; each payment's "
            "idempotency key is in the ledger and the run's outcomes (see Verify)"
        )

    def same_as(self, approved: Action) -> bool:
        """Same kind and target; which payments it covers is narrowed by the runbook."""
        return isinstance(approved, RetryPaymentsAction) and super().same_as(approved)

    @property
    def result(self) -> RetryRun | None:
        """The engine's run, once applied."""
        return self._result

    def on_progress(self, hook: Callable[[RetryProgress], None]) -> None:
        """Call `hook` after each batch (the runbook's RTO watch)."""
        self._on_progress = hook

    def apply(self) -> ActionRecord:
        with payments_http() as api:
            now = {p.id: p for p in get_payments(api, self.payment_ids)}
        # The plan's order (oldest first); only those still failed are sent.
        still = [now[pid] for pid in self.payment_ids if pid in now and now[pid].status == "failed"]
        artifact = cast(
            UUID,
            create_progress_artifact(
                progress=0.0,
                key="payment-failure-retry",
                description=f"Retrying {len(still)} failed payment(s)",
            ),
        )

        def progress(p: RetryProgress) -> None:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(p.counts.items()))
            update_progress_artifact(
                artifact,
                progress=round(100 * p.done / max(1, p.total), 1),
                description=f"batch {p.batch}/{p.batches}: {counts}"
                + (f"; stopped: {p.stopped}" if p.stopped else ""),
            )
            if self._on_progress is not None:
                self._on_progress(p)

        def batch_task(engine: Engine, index: int, batch: Sequence[Payment]) -> list[RetryOutcome]:
            return retry_batch(engine, index, batch)

        run = retry_payments(still, self.caps, progress=progress, run_batch=batch_task)
        self._result = run
        counts = ", ".join(f"{k} {v}" for k, v in sorted(run.counts.items())) or "none"
        return ActionRecord(
            kind=self.kind,
            target=self.target,
            before=f"{len(still)} failed ({len(self.payment_ids) - len(still)} no longer failed)",
            after=counts,
            message=(
                f"stopped early: {run.stopped}" if run.stopped else "every approved payment tried"
            )
            + f"; {run.calls} call(s) in {run.elapsed_s:.1f} s",
        )
