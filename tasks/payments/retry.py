"""The batch retry engine: failed payments retried through the API, each charged at most once.

`retry_payments` walks the payments in batches; inside a batch, up to `caps.concurrency`
threads share one `httpx.Client`. For each payment: admit it (the payments and amount caps,
checked in order, so a cap stops the run exactly there), pin its key in the ledger
(`tasks.payments.keys`), call, and:

- a definite answer closes the key (succeeded, declined, already succeeded, not found);
- `unknown` (gateway 5xx / timeout) and `in_flight` (409) are asked again with the SAME key,
  at most `caps.same_key_retries` times; still not definite: the key stays open for the
  next run (reported, never forgotten);
- 429: every worker of the engine waits the `Retry-After` (capped), then the same key;
- the gateway failure rate (calls whose payment has no definite answer yet, over all
  calls) at or above `caps.failure_rate_max` after `caps.failure_min_sample` calls stops the
  engine: retrying a gateway that is down only makes it worse.

A batch is re-entrant (a Prefect task retry re-runs it): payments with a definite answer
are skipped, the others re-read their pinned key. The token never leaves the client's
headers. The engine itself runs without Prefect (the bench); the flow runs each batch as
the task `retry_batch` (`run_batch=`).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from tasks.clients import payments_http, redis_client
from tasks.payments.api import AnswerKind, Payment, RetryAnswer, retry_one
from tasks.payments.keys import KeyLedger
from tasks.retry import RETRY_IDEMPOTENT_WRITE
from tasks.settings import PaymentsSettings, RedisSettings

#: What a payment came to in a run: an API answer, or `not_attempted` (a cap or the
#: failure-rate stop came first; no key was pinned, it is left for the next run).
ResultKind = AnswerKind | Literal["not_attempted"]


class RetryCaps(BaseModel):
    """How much one run may do, and how hard it insists."""

    max_payments: int = Field(1000, ge=1, le=1_000_000, description="Payments per run.")
    max_amount: int = Field(
        10_000_000, ge=1, description="Amount per run, minor units summed over currencies."
    )
    failure_rate_max: float = Field(
        0.5, gt=0, le=1, description="Stop when this share of calls has no definite answer."
    )
    failure_min_sample: int = Field(20, ge=1, description="Calls before the rate can stop.")
    # At most httpx's default pool (100 connections): one client serves every worker.
    concurrency: int = Field(8, ge=1, le=100, description="Calls in flight at once.")
    batch_size: int = Field(200, ge=1, le=5000, description="Payments per batch (task).")
    same_key_retries: int = Field(
        3, ge=0, le=20, description="Unknown / in-flight answers asked again, same key."
    )
    same_key_backoff_s: float = Field(0.25, ge=0, le=30, description="First wait, doubled.")
    rate_limit_retries: int = Field(5, ge=0, le=50, description="429s per payment.")
    retry_after_max_s: float = Field(30.0, ge=0, le=600, description="Longest 429 wait.")


class RetryOutcome(BaseModel):
    """One payment's part in the run."""

    payment_id: str
    amount: int
    currency: str
    result: ResultKind
    key: str | None = None
    reused_key: bool = False
    calls: int = 0
    charge: str | None = None
    error: str = ""

    @property
    def definite(self) -> bool:
        """The API decided; the key is closed."""
        return self.result in {"succeeded", "declined", "not_failed", "not_found"}


class RetryProgress(BaseModel):
    """Where the run is, after each batch."""

    batch: int
    batches: int
    done: int
    total: int
    counts: dict[str, int]
    stopped: str | None = None


class RetryRun(BaseModel):
    """What the engine did: every payment's outcome, counts and amounts, why it stopped."""

    outcomes: list[RetryOutcome]
    counts: dict[str, int]
    amounts: dict[str, dict[str, int]] = Field(description="result -> currency -> minor units.")
    stopped: str | None = None
    elapsed_s: float
    calls: int
    failed_calls: int


class Engine:
    """The state every worker of one run shares: caps, the 429 gate, the failure rate."""

    def __init__(
        self,
        caps: RetryCaps,
        client: httpx.Client,
        ledger: KeyLedger,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.caps, self.client, self.ledger, self.sleep = caps, client, ledger, sleep
        self._lock = threading.Lock()
        self.pause_until = 0.0
        self.admitted: set[str] = set()
        self.reserved = 0
        self.calls = 0
        self.failed_calls = 0
        #: Why the run stopped early (a cap: no more admissions; the failure rate: also no
        #: more calls, `halted`).
        self.stopped: str | None = None
        self.halted = False
        self.outcomes: dict[str, RetryOutcome] = {}

    # -- admission and stop, under the lock

    def admit(self, payment: Payment) -> bool:
        """Reserve the payment against the caps (once); False once the run is stopped."""
        caps = self.caps
        with self._lock:
            if payment.id in self.admitted:  # a batch task's retry: admitted already
                return True
            if self.stopped is not None:
                return False
            if len(self.admitted) >= caps.max_payments:
                self.stopped = f"payments cap reached: {caps.max_payments} payment(s) per run"
                return False
            if self.reserved + payment.amount > caps.max_amount:
                self.stopped = (
                    f"amount cap reached: {self.reserved} + {payment.amount} (payment "
                    f"{payment.id}) > {caps.max_amount} minor units per run"
                )
                return False
            self.admitted.add(payment.id)
            self.reserved += payment.amount
            return True

    def _count(self, answer: RetryAnswer, unhealed: int) -> None:
        """One call: an unknown answer counts as failed until its payment gets a definite one."""
        caps = self.caps
        with self._lock:
            self.calls += 1
            if answer.kind == "unknown":
                self.failed_calls += 1
            elif answer.definite:
                self.failed_calls -= unhealed
            rate = self.failed_calls / self.calls
            if (
                self.stopped is None
                and self.calls >= caps.failure_min_sample
                and rate >= caps.failure_rate_max
            ):
                self.halted = True
                self.stopped = (
                    f"gateway failure rate {rate:.0%} >= {caps.failure_rate_max:.0%} after "
                    f"{self.calls} call(s): the gateway is failing, retrying makes it worse"
                )

    def _hold(self, seconds: float) -> None:
        with self._lock:
            until = time.monotonic() + min(seconds, self.caps.retry_after_max_s)
            self.pause_until = max(self.pause_until, until)

    def _wait_gate(self) -> None:
        while (left := self.pause_until - time.monotonic()) > 0:
            self.sleep(left)

    # -- one payment

    def one(self, payment: Payment) -> RetryOutcome:
        """Pin, call, and ask again with the same key until definite or out of tries."""
        base = {"payment_id": payment.id, "amount": payment.amount, "currency": payment.currency}
        if self.halted:
            return RetryOutcome(result="not_attempted", error=self.stopped or "", **base)
        pinned = self.ledger.pin(payment.id, payment.attempts)
        calls, unhealed = 0, 0
        same_key_left, limited_left = self.caps.same_key_retries, self.caps.rate_limit_retries
        backoff = self.caps.same_key_backoff_s
        while True:
            self._wait_gate()
            answer = retry_one(self.client, payment.id, pinned.key)
            calls += 1
            self._count(answer, unhealed)
            again = False
            if answer.definite:
                self.ledger.close(payment.id, pinned.key, answer.kind)
            elif answer.kind == "rate_limited":
                self._hold(answer.retry_after_s or 1.0)
                again, limited_left = limited_left > 0, limited_left - 1
            elif answer.kind in ("unknown", "in_flight"):
                unhealed += answer.kind == "unknown"
                again = same_key_left > 0 and not self.halted
                same_key_left -= 1
                if again:
                    self.sleep(backoff)
                    backoff *= 2
            if not again:
                return RetryOutcome(
                    result=answer.kind,
                    key=pinned.key,
                    reused_key=pinned.reused,
                    calls=calls,
                    charge=answer.charge,
                    error=answer.error,
                    **base,
                )

    def run_batch(self, batch: Sequence[Payment]) -> list[RetryOutcome]:
        """One batch, re-entrant: payments already answered definitely are not called again."""
        todo = [p for p in batch if not (o := self.outcomes.get(p.id)) or not o.definite]
        admitted = [p for p in todo if self.admit(p)]
        refused = [p for p in todo if p.id not in self.admitted]
        for p in refused:
            self.outcomes[p.id] = RetryOutcome(
                payment_id=p.id,
                amount=p.amount,
                currency=p.currency,
                result="not_attempted",
                error=self.stopped or "",
            )
        workers = max(1, min(self.caps.concurrency, len(admitted)))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="payments") as pool:
            for outcome in pool.map(self.one, admitted):
                self.outcomes[outcome.payment_id] = outcome
        return [self.outcomes[p.id] for p in batch if p.id in self.outcomes]


#: Runs one batch: the engine's own method, or a wrapper (the flow's Prefect task).
BatchRunner = Callable[[Engine, int, Sequence[Payment]], list[RetryOutcome]]


def _direct(engine: Engine, index: int, batch: Sequence[Payment]) -> list[RetryOutcome]:
    return engine.run_batch(batch)


def summarize(
    outcomes: Sequence[RetryOutcome],
) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Counts by result, and amounts by result and currency."""
    counts: Counter[str] = Counter(o.result for o in outcomes)
    amounts: dict[str, dict[str, int]] = {}
    for o in outcomes:
        by_currency = amounts.setdefault(o.result, {})
        by_currency[o.currency] = by_currency.get(o.currency, 0) + o.amount
    return dict(counts), amounts


def retry_payments(
    payments: Sequence[Payment],
    caps: RetryCaps,
    *,
    settings: PaymentsSettings | None = None,
    progress: Callable[[RetryProgress], None] | None = None,
    redis_settings: RedisSettings | None = None,
    run_batch: BatchRunner | None = None,
    client: httpx.Client | None = None,
) -> RetryRun:
    """Retry `payments` (each at most once charged) within `caps`; every payment accounted for.

    `run_batch` wraps each batch (the flow: a Prefect task); `client` replaces the API client
    (unit tests); `progress` is called after each batch.
    """
    settings = settings or PaymentsSettings()
    started = time.monotonic()
    ledger = KeyLedger(redis_client(redis_settings), settings.ledger_prefix)
    runner = run_batch or _direct
    size = caps.batch_size
    batches = [payments[i : i + size] for i in range(0, len(payments), size)]
    http = client or payments_http(settings)
    engine = Engine(caps, http, ledger)
    try:
        for index, batch in enumerate(batches, start=1):
            if engine.stopped is None:
                runner(engine, index, batch)
            else:
                engine.run_batch(batch)  # admits nothing: records them not attempted
            if progress is not None:
                counts, _ = summarize(list(engine.outcomes.values()))
                progress(
                    RetryProgress(
                        batch=index,
                        batches=len(batches),
                        done=sum(len(b) for b in batches[:index]),
                        total=len(payments),
                        counts=counts,
                        stopped=engine.stopped,
                    )
                )
    finally:
        if client is None:
            http.close()
    outcomes = [engine.outcomes[p.id] for p in payments if p.id in engine.outcomes]
    counts, amounts = summarize(outcomes)
    return RetryRun(
        outcomes=outcomes,
        counts=counts,
        amounts=amounts,
        stopped=engine.stopped,
        elapsed_s=round(time.monotonic() - started, 3),
        calls=engine.calls,
        failed_calls=engine.failed_calls,
    )


@task(**RETRY_IDEMPOTENT_WRITE, cache_policy=NO_CACHE, task_run_name="retry-batch-{index}")
def retry_batch(engine: Engine, index: int, batch: Sequence[Payment]) -> list[RetryOutcome]:
    """One batch as a Prefect task; a retry is safe: every call re-uses its pinned key."""
    return engine.run_batch(batch)
