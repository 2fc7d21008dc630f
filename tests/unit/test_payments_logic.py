"""The pure parts of the payments runbook: reconciliation's comparison, the log lines'
error classes (scrubbed), the plan's description."""

from __future__ import annotations

from datetime import UTC, datetime

from flows.payments.actions import RetryPaymentsAction
from tasks.kubernetes import PodLogs, TailLogsResult
from tasks.payments.api import GatewayCharge, Payment
from tasks.payments.checks import count_payment_errors, error_class
from tasks.payments.reconcile import OPEN_KEY_NOTE, compare
from tasks.payments.retry import RetryCaps


def pay(
    pid: str, status: str = "succeeded", charges: tuple[str, ...] = (), **kw: object
) -> Payment:
    base: dict[str, object] = {
        "id": pid,
        "customer": "cus_1",
        "amount": 1000,
        "currency": "EUR",
        "status": status,
        "charges": list(charges),
        "last_error": "card_declined" if status == "failed" else None,
    }
    return Payment.model_validate({**base, **kw})


def ch(cid: str, ref: str) -> GatewayCharge:
    return GatewayCharge(id=cid, payment_ref=ref, amount=1000, currency="EUR")


def test_clean_reconciliation_counts_recovered_and_still_failed() -> None:
    ids = ["p1", "p2"]
    rec = compare(ids, [pay("p1", charges=("c1",)), pay("p2", "failed")], {"p1": [ch("c1", "p1")]})
    assert rec.clean and rec.recovered == 1 and rec.recovered_amounts == {"EUR": 1000}
    assert [s.reason for s in rec.still_failed] == ["card_declined"]


def test_every_anomaly_kind_is_found() -> None:
    payments = [
        pay("two", charges=("a",)),  # two gateway charges
        pay("none"),  # succeeded without a charge
        pay("failed-charged", "failed", charges=("f",)),  # failed with one
        pay("no-reason", "failed", last_error=None),  # failed without a reason
        pay("pending", "pending"),
    ]
    charges = {
        "two": [ch("a", "two"), ch("b", "two")],
        "failed-charged": [ch("f", "failed-charged")],
    }
    ids = [p.id for p in payments] + ["ghost"]
    rec = compare(ids, payments, charges, open_keys=frozenset({"failed-charged"}))
    problems = {(a.payment_id, a.problem) for a in rec.anomalies}
    assert ("two", "2 gateway charges") in problems
    assert ("two", "gateway charge(s) ['b'] unknown to the backend") in problems
    assert ("none", "succeeded without a charge") in problems
    assert ("failed-charged", "failed with a charge" + OPEN_KEY_NOTE) in problems
    assert ("no-reason", "ends failed without a reason") in problems
    assert ("pending", "ends pending without a reason") in problems
    assert rec.missing == ["ghost"] and not rec.clean


def test_payment_log_lines_are_classed_and_scrubbed() -> None:
    lines = [
        'payment pay_1 failed error="gateway_outcome_unknown" token=s3cr3t',
        "payment pay_2 succeeded",
        "payment pay_3 declined by issuer Authorization: Bearer abc.def",
        "payment pay_4 request timed out",
    ]
    logs = TailLogsResult(
        deployment="akig-backend",
        namespace="default",
        lines=200,
        grep="payment",
        logs=[PodLogs(pod="p", container="c", lines=lines)],
    )
    n = count_payment_errors(logs)
    assert n.lines == 4 and n.failures == 3
    assert n.classes == {"gateway_outcome_unknown": 1, "card_declined": 1, "timeout": 1}
    assert error_class("payment pay_2 succeeded") is None
    joined = n.sample + str(n.classes)
    assert "s3cr3t" not in joined and "abc.def" not in joined


def test_the_plan_lists_count_amounts_oldest_and_first_ids() -> None:
    payments = [
        pay(f"pay_{i}", "failed", failed_at=datetime(2026, 12, 6, 22, i, tzinfo=UTC), currency=c)
        for i, c in enumerate(["EUR"] * 6 + ["USD"])
    ]
    action = RetryPaymentsAction.planned(
        "payments:http://api", payments, RetryCaps(max_amount=9000)
    )
    text = action.summary
    assert "retry 7 failed payment(s)" in text
    assert "EUR 6,000 (minor), USD 1,000 (minor)" in text
    assert "oldest failure 2026-12-06 22:00:00 UTC" in text
    assert "pay_0, pay_1, pay_2, pay_3, pay_4 and 2 more" in text and "9,000 minor units" in text
    narrowed = action.narrowed({"pay_1", "pay_6", "pay_new"})
    assert narrowed.payment_ids == ["pay_1", "pay_6"] and "retry 2 failed" in narrowed.summary
