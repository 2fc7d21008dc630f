"""The retry engine and its key ledger against real Redis and an in-memory backend
(`tests/fixtures/payments_fake.py`, MockTransport): keys pinned before the call, re-used
while open, closed only on a definite answer; caps, the failure-rate stop, 429s."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tasks.payments.api import Payment, PaymentsAuthError, get_payments
from tasks.payments.keys import KeyLedger
from tasks.payments.retry import RetryCaps, RetryProgress, RetryRun, retry_payments
from tasks.settings import PaymentsSettings, RedisSettings
from tests.fixtures.payments_fake import FakePayments

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def prefix() -> Iterator[str]:
    """A ledger prefix of this test only; its keys are deleted afterwards."""
    name = f"test:payments:{uuid.uuid4().hex[:10]}:"
    yield name
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    keys = list(client.scan_iter(f"{name}*"))
    if keys:
        client.delete(*keys)


def _ledger(prefix: str) -> KeyLedger:
    return KeyLedger(redis.Redis.from_url(REDIS_URL, decode_responses=True), prefix)


def _run(fake: FakePayments, prefix: str, caps: RetryCaps, **kw: Any) -> RetryRun:
    with fake.client() as client:
        payments = get_payments(client, list(fake.payments))
        return retry_payments(
            payments,
            caps,
            settings=PaymentsSettings(ledger_prefix=prefix),
            redis_settings=RedisSettings(url=REDIS_URL),
            client=client,
            **kw,
        )


FAST = {"same_key_backoff_s": 0.0, "concurrency": 4, "batch_size": 5}


def test_ledger_first_writer_wins_and_open_key_outlives_attempts(prefix: str) -> None:
    ledger = _ledger(prefix)
    first = ledger.pin("pay_a", attempts=1)
    again = ledger.pin("pay_a", attempts=7)  # attempts moved on: the open key still wins
    assert (first.reused, again.reused) == (False, True)
    assert again.key == first.key == ledger.open_key("pay_a")
    assert not ledger.close("pay_a", "some-other-key", "succeeded")  # not the open one
    assert ledger.open_key("pay_a") == first.key
    assert ledger.close("pay_a", first.key, "declined")
    assert ledger.open_key("pay_a") is None
    assert ledger.last_closed("pay_a") == (first.key, "declined")
    # A later failure of the same payment gets a new key, even at the same attempt count.
    later = ledger.pin("pay_a", attempts=1)
    assert not later.reused and later.key != first.key


def test_gateway_ok_each_payment_charged_once(prefix: str) -> None:
    fake = FakePayments()
    fake.seed(12)
    seen: list[RetryProgress] = []
    run = _run(fake, prefix, RetryCaps(**FAST), progress=seen.append)
    assert run.counts == {"succeeded": 12} and run.stopped is None
    assert run.amounts == {"succeeded": {"EUR": 12_000}}
    assert set(fake.charges_per_payment().values()) == {1}
    assert [p.batch for p in seen] == [1, 2, 3] and seen[-1].done == 12


def test_charge_then_5xx_resends_the_same_key(prefix: str) -> None:
    fake = FakePayments(mode="charge_then_5xx", hits=1)
    ids = fake.seed(6)
    run = _run(fake, prefix, RetryCaps(**FAST))
    assert run.counts == {"succeeded": 6}
    assert fake.charges_per_payment() == dict.fromkeys(ids, 1)
    for pid in ids:  # two calls each, one key each
        keys = {k for p, k in fake.calls if p == pid}
        assert len(keys) == 1 and sum(1 for p, _ in fake.calls if p == pid) == 2


def test_unknown_left_open_and_the_next_run_reuses_the_key(prefix: str) -> None:
    fake = FakePayments(mode="charge_then_5xx")  # every call: charged, then 5xx
    ids = fake.seed(3)
    caps = RetryCaps(**{**FAST, "same_key_retries": 1, "failure_min_sample": 100})
    first = _run(fake, prefix, caps)
    assert first.counts == {"unknown": 3}
    ledger = _ledger(prefix)
    open_keys = {pid: ledger.open_key(pid) for pid in ids}
    assert all(open_keys.values())
    # The backend's attempts moved on meanwhile (another path): the open key is still used.
    for p in fake.payments.values():
        p["attempts"] += 3
    fake.mode = "ok"
    second = _run(fake, prefix, caps)
    assert second.counts == {"succeeded": 3}
    assert all(o.reused_key and o.key == open_keys[o.payment_id] for o in second.outcomes)
    assert fake.charges_per_payment() == dict.fromkeys(ids, 1)
    assert all(ledger.open_key(pid) is None for pid in ids)


def test_amount_cap_stops_mid_batch_and_says_so(prefix: str) -> None:
    fake = FakePayments()
    fake.seed(10, amount=1000)
    run = _run(fake, prefix, RetryCaps(**{**FAST, "max_amount": 3500}))
    assert run.counts == {"succeeded": 3, "not_attempted": 7}
    assert run.stopped is not None and run.stopped.startswith("amount cap reached")
    ordered = [o.result for o in run.outcomes]
    assert ordered == ["succeeded"] * 3 + ["not_attempted"] * 7
    assert len(fake.charges_per_payment()) == 3


def test_payments_cap(prefix: str) -> None:
    fake = FakePayments()
    fake.seed(6)
    run = _run(fake, prefix, RetryCaps(**{**FAST, "max_payments": 4}))
    assert run.counts == {"succeeded": 4, "not_attempted": 2}
    assert run.stopped is not None and "payments cap" in run.stopped


def test_gateway_down_stops_after_the_minimum_sample(prefix: str) -> None:
    fake = FakePayments(mode="down")
    fake.seed(40)
    caps = RetryCaps(**{**FAST, "failure_min_sample": 8, "same_key_retries": 0})
    run = _run(fake, prefix, caps)
    assert run.stopped is not None and "gateway failure rate" in run.stopped
    assert run.calls < 20  # stopped early, not 40 calls into a dead gateway
    assert run.counts["not_attempted"] >= 20
    assert sum(run.counts.values()) == 40  # every payment accounted for
    assert not fake.gateway


def test_429_retry_after_honoured_then_charged_once(prefix: str) -> None:
    fake = FakePayments(mode="rate_limit", hits=1, retry_after="1")
    fake.seed(4)
    run = _run(fake, prefix, RetryCaps(**{**FAST, "concurrency": 2}))
    assert run.counts == {"succeeded": 4}
    assert run.elapsed_s >= 1.0  # the engine waited the Retry-After
    assert set(fake.charges_per_payment().values()) == {1}


def test_declined_is_definite(prefix: str) -> None:
    fake = FakePayments()
    ids = fake.seed(2, amount=13)  # the fake declines these customers
    run = _run(fake, prefix, RetryCaps(**FAST))
    assert run.counts == {"declined": 2}
    assert all(_ledger(prefix).open_key(pid) is None for pid in ids)


def test_wrong_token_is_a_clear_error_without_the_token(prefix: str) -> None:
    fake = FakePayments()
    fake.seed(2)
    with fake.client() as good:
        payments: list[Payment] = get_payments(good, list(fake.payments))
    with fake.client(token="wrong-secret-value") as bad, pytest.raises(PaymentsAuthError) as err:
        retry_payments(
            payments,
            RetryCaps(**FAST),
            settings=PaymentsSettings(ledger_prefix=prefix),
            redis_settings=RedisSettings(url=REDIS_URL),
            client=bad,
        )
    assert "401" in str(err.value) and "wrong-secret-value" not in str(err.value)
    assert not fake.gateway
