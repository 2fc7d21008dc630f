"""A hypothesis property against the real sandbox payments API and gateway: whatever
sequence of gateway faults the retry engine runs into, and however early its runs stop
(caps, the failure-rate stop), once the gateway recovers each payment has been charged
exactly once and every payment is accounted for."""

from __future__ import annotations

import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from tasks.clients import payments_http
from tasks.payments.api import get_payments, list_failed
from tasks.payments.retry import RetryCaps, retry_payments
from tasks.settings import RedisSettings

MODES = [
    "ok",
    "fails",
    "timeout_before_charge",
    "charge_then_timeout",
    "charge_then_5xx",
    "rate_limit",
    "down",
]
ROUND = st.tuples(
    st.sampled_from(MODES), st.sampled_from([0.3, 1.0]), st.integers(min_value=1, max_value=6)
)


def _run(pay: Any, prefix: str, max_payments: int) -> None:
    """One engine run over every failed payment, within a payments cap."""
    settings = pay.payments_settings(ledger_prefix=prefix)
    redis = RedisSettings(url=SecretStr(pay.settings.redis_url))
    with payments_http(settings) as client:
        failed = list_failed(client, 100)
    caps = RetryCaps(
        max_payments=max_payments,
        concurrency=4,
        batch_size=3,
        same_key_retries=1,
        same_key_backoff_s=0.05,
        rate_limit_retries=1,
        retry_after_max_s=1,
        failure_min_sample=4,
    )
    run = retry_payments(failed, caps, settings=settings, redis_settings=redis)
    assert sum(run.counts.values()) == len(failed)  # every payment has an outcome


@settings(
    max_examples=8,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rounds=st.lists(ROUND, min_size=1, max_size=3))
def test_any_gateway_faults_then_recovery_each_payment_charged_exactly_once(
    payments_sandbox: Any, rounds: list[tuple[str, float, int]]
) -> None:
    pay = payments_sandbox
    pay.truncate()
    prefix = f"test:prop:{uuid.uuid4().hex[:8]}:"
    ids = pay.seed(6)
    for mode, share, cap in rounds:
        pay.set_gateway(mode, share=share, retry_after_s=1)
        _run(pay, prefix, cap)
        assert all(n <= 1 for n in pay.gateway_charges_per_payment(ids).values())
    pay.set_gateway("ok")
    for _ in range(3):
        if not pay.failed_view():
            break
        _run(pay, prefix, 100)
    assert pay.gateway_charges_per_payment(ids) == dict.fromkeys(ids, 1)
    assert pay.backend_charges_per_payment(ids) == dict.fromkeys(ids, 1)
    assert pay.failed_view() == [] and pay.stream_ids() == []
    with payments_http(pay.payments_settings()) as client:
        assert {p.status for p in get_payments(client, ids)} == {"succeeded"}
