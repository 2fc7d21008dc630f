"""The property above all: no payment charged twice, none forgotten, under any fault.

Hypothesis drives the runbook's own retry engine (`tasks.payments.retry.retry_payments`)
against the real sandbox API and gateway (PostgreSQL, Redis, HTTP) with any sequence of
steps. A step sets a gateway behaviour (each fault mode, on a share of the charges), lists
the payments still failed (as a re-run plans) and runs the engine on them within a payments
cap (a run that stops early) and the gateway failure-rate stop; it may also crash:
after its n-th request the client process "dies": every answer from then on is lost (the
server still processes what was sent) and nothing more is sent. The crash is raised out of
the engine, as a SIGKILL ends a run, and the ledger is left as the dead run left it.

Each step a checkout also creates a payment under the same gateway behaviour with its own
key: one charged, then timed out, is failed at the backend with a charge at the gateway
under a key the runbook never had. A new key would charge it again.

After the steps the gateway recovers and one more run retries what is still failed. Then,
from the gateway's own ledger and the backend's tables:

- no payment has more than one gateway charge;
- every payment ends succeeded with its one charge (the backend agrees), declined by the
  card with none, or (a checkout's charge) failed with its one gateway charge and reported
  `charged_elsewhere` by the last run, for reconciliation by hand;
- nothing else is left failed (nothing forgotten).

The same sequence with a client that mints a new key per call (what the ledger prevents)
double-charges: `test_minting_keys_would_double_charge` shows the check can fail.
"""

from __future__ import annotations

import itertools
import threading
import typing
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox.payments.gateway import Mode
from tasks.payments.api import list_failed
from tasks.payments.retry import RetryCaps, RetryRun, retry_payments
from tasks.settings import RedisSettings
from tests.fixtures.sandbox import PaymentsFactory, PaymentsSandbox

MODES = typing.get_args(Mode)  # every gateway behaviour
# Fast enough for many examples: same-key retries are few and short, a 429 waits 50 ms.
CAPS = RetryCaps(
    concurrency=4,
    batch_size=4,
    same_key_retries=1,
    same_key_backoff_s=0.01,
    retry_after_max_s=0.05,
    rate_limit_retries=2,
    failure_min_sample=4,  # the failure-rate stop fires early on a failing gateway
)


class Crash(BaseException):
    """The client process died (not an Exception: nothing in the engine may swallow it)."""


class DyingTransport(httpx.BaseTransport):
    """Forwards requests until the `after`-th; from then on every answer is lost."""

    def __init__(self, inner: httpx.BaseTransport, after: int | None) -> None:
        self.inner, self.after = inner, after
        self.sent = itertools.count(1)
        self.dead = threading.Event()
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.dead.is_set():
            raise Crash("the client is dead: nothing more is sent")
        with self._lock:
            n = next(self.sent)
        response = self.inner.handle_request(request)
        if self.after is not None and n >= self.after:
            # Sent and processed by the server; the process dies before reading the answer.
            response.close()
            self.dead.set()
            raise Crash(f"killed after request {n}")
        return response


@dataclass(frozen=True)
class Step:
    """One run: the gateway's behaviour during it, its payments cap, and when it crashes."""

    mode: str
    share: float
    max_payments: int
    crash_after: int | None


steps = st.lists(
    st.builds(
        Step,
        mode=st.sampled_from(MODES),
        share=st.sampled_from((0.3, 0.6, 1.0)),
        max_payments=st.integers(1, 8),
        crash_after=st.one_of(st.none(), st.integers(1, 8)),
    ),
    min_size=1,
    max_size=4,
)


@pytest.fixture
def pay(make_payments_sandbox: PaymentsFactory) -> PaymentsSandbox:
    """A sandbox whose gateway times out fast (many examples, each with timeouts)."""
    return make_payments_sandbox(gateway_timeout_s=0.2, gateway_latency_ms=1.0)


@pytest.fixture
def ledger_prefix() -> Iterator[str]:
    """A key-ledger prefix per test in the shared Redis, removed afterwards."""
    import redis

    prefix = f"test:payprop:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def _run(
    pay: PaymentsSandbox, prefix: str, crash_after: int | None, **caps: Any
) -> RetryRun | None:
    """One run over the payments failed now; None when it crashed."""
    settings = pay.payments_settings(ledger_prefix=prefix)
    headers = {"Authorization": f"Bearer {pay.payments_token}"}
    transport = DyingTransport(httpx.HTTPTransport(), crash_after)
    with httpx.Client(base_url=pay.url, headers=headers, timeout=5.0) as reader:
        failed = list_failed(reader, 1000)
    with httpx.Client(
        base_url=pay.url, headers=headers, timeout=5.0, transport=transport
    ) as client:
        try:
            done = retry_payments(
                failed,
                CAPS.model_copy(update=caps),
                settings=settings,
                redis_settings=RedisSettings(),
                client=client,
            )
        except Crash:
            return None
    assert len(done.outcomes) == len(failed), "a payment the run was given has no outcome"
    return done


def _assert_exactly_once(
    pay: PaymentsSandbox,
    ids: list[str],
    declined: set[str],
    elsewhere: frozenset[str] = frozenset(),
) -> None:
    gateway = pay.gateway_charges_per_payment(ids)
    backend = pay.backend_charges_per_payment(ids)
    twice = {p: n for p, n in gateway.items() if n > 1}
    assert not twice, f"charged more than once: {twice}"
    for pid in ids:
        row = pay.payment(pid)
        assert row is not None, f"{pid} vanished"
        if pid in elsewhere:  # a checkout's charge the backend missed: reported, not retried
            assert (row["status"], gateway[pid], backend[pid]) == ("failed", 1, 0), (pid, row)
            continue
        assert backend[pid] == gateway[pid], f"backend and gateway disagree on {pid}"
        if pid in declined:
            assert (row["status"], gateway[pid]) == ("failed", 0), (pid, row)
            assert row["last_error"] == "card_declined", (pid, row)
        else:
            assert (row["status"], gateway[pid]) == ("succeeded", 1), (pid, row)
    left = declined | elsewhere
    assert set(pay.failed_view()) == left, "the failed view holds only the declined (+ reported)"
    assert set(pay.stream_ids()) == left, "the failed stream holds only those too"


def _payments_of(pay: PaymentsSandbox, customer: str) -> list[str]:
    """The ids of a customer's payments, straight from SQL."""
    with psycopg.connect(pay.dsn) as conn:
        rows = conn.execute("SELECT id FROM payments WHERE customer = %s", (customer,)).fetchall()
    return [str(r[0]) for r in rows]


def _declined(pay: PaymentsSandbox, ids: list[str]) -> set[str]:
    out = set()
    for pid in ids:
        row = pay.payment(pid)
        assert row is not None
        if str(row["customer"]).startswith("cus_decline"):
            out.add(pid)
    return out


@settings(
    max_examples=20,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=steps, count=st.integers(2, 8), declined_share=st.sampled_from((0.0, 0.25)))
def test_any_faults_crashes_and_reruns_charge_each_payment_at_most_once(
    pay: PaymentsSandbox, ledger_prefix: str, plan: list[Step], count: int, declined_share: float
) -> None:
    pay.truncate()
    prefix = f"{ledger_prefix}{uuid.uuid4().hex[:8]}:"
    ids = pay.seed(count, declined_share=declined_share)
    declined = _declined(pay, ids)
    for n, step in enumerate(plan):
        pay.set_gateway(step.mode, share=step.share, retry_after_s=1)
        customer = f"cus_checkout{n}"
        pay.create(customer, 1999, key=f"checkout-{uuid.uuid4().hex}")
        ids += _payments_of(pay, customer)  # succeeded, failed, or charged then unknown
        _run(pay, prefix, step.crash_after, max_payments=step.max_payments)
    pay.set_gateway("ok")
    final = _run(pay, prefix, None)
    assert final is not None
    assert final.stopped is None
    elsewhere = frozenset(o.payment_id for o in final.outcomes if o.result == "charged_elsewhere")
    charged = pay.gateway_charges_per_payment(ids)
    missed = {p for p in ids if charged[p] and (pay.payment(p) or {}).get("status") == "failed"}
    assert elsewhere == missed, "every failed payment the gateway charged is reported, only those"
    _assert_exactly_once(pay, ids, declined, elsewhere)


def test_minting_keys_would_double_charge(pay: PaymentsSandbox) -> None:
    """The control: after an unknown outcome a NEW key charges again: the check sees it."""
    [pid] = pay.seed(1)
    pay.set_gateway("charge_then_timeout")
    assert pay.retry(pid, "first-" + uuid.uuid4().hex).status_code in (502, 504)
    pay.set_gateway("ok")
    assert pay.retry(pid, "second-" + uuid.uuid4().hex).status_code == 200
    with pytest.raises(AssertionError, match="charged more than once"):
        _assert_exactly_once(pay, [pid], set())
