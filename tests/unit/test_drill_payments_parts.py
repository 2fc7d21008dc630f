"""The payments drill's pieces: its verdict on the ledgers, its checkout's same-key retries."""

from __future__ import annotations

import time
from pathlib import Path
from typing import cast

import httpx
import pytest
import yaml

from drills.__main__ import DRILLS
from drills.monitoring import compressed_hold
from drills.payments import STEPS, PaymentFailures
from drills.payments_ledger import PaymentView, Verdict
from drills.payments_pages import first_delivery, topic_blocks
from drills.payments_parts import PaymentsSandbox
from drills.payments_recovery import Recovery
from drills.payments_traffic import KEY_PREFIX, Checkout
from drills.release_parts import Pages
from tests.fixtures.sinks import CONTACTS, Sink
from tests.fixtures.sinks import Request as SinkRequest


def view(
    pid: str, status: str, gateway: int, backend: int, error: str | None = None, mine: bool = False
) -> PaymentView:
    return PaymentView(pid, status, error, 1999, gateway, backend, by_checkout=mine)


def test_charged_once_or_failed_with_a_reason_is_clean() -> None:
    v = Verdict(
        [
            view("pay_a", "succeeded", 1, 1),
            view("pay_b", "failed", 0, 0, "card_declined"),
            view("pay_c", "succeeded", 1, 1, mine=True),
        ]
    )
    assert v.problems() == []
    assert v.by_status == {"succeeded": 2, "failed": 1}
    assert v.amount("succeeded") == 2 * 1999
    assert v.by_retry == 1  # pay_c was charged under the checkout's own key
    assert v.most_charges == 1


def test_every_breach_is_named() -> None:
    v = Verdict(
        [
            view("pay_twice", "succeeded", 2, 1),
            view("pay_none", "succeeded", 0, 0),
            view("pay_charged", "failed", 1, 0, "gateway_outcome_unknown"),
            view("pay_silent", "failed", 0, 0),
            view("pay_stuck", "pending", 0, 0),
        ],
        doubles={"pay_twice": 2},
        gateway_only=["ch_1"],
        backend_only=["ch_2"],
        missing=["pay_lost"],
    )
    problems = v.problems()
    assert problems == [
        "pay_twice charged 2 times at the gateway",
        "gateway charge ch_1 unknown to the backend",
        "backend charge ch_2 unknown to the gateway",
        "pay_lost is gone from the payments table",
        "pay_twice succeeded with 2 gateway / 1 backend charges",
        "pay_none succeeded with 0 gateway / 0 backend charges",
        "pay_charged failed but charged 1 time(s)",
        "pay_silent failed without a reason",
        "pay_stuck ended pending",
    ]
    assert v.most_charges == 2


def checkout_answering(*statuses: int) -> tuple[Checkout, list[httpx.Request]]:
    seen: list[httpx.Request] = []
    answers = iter(statuses)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(next(answers), json={})

    def client() -> httpx.Client:
        return httpx.Client(base_url="http://sandbox", transport=httpx.MockTransport(handler))

    return Checkout(client, same_key_retries=2), seen


def test_an_unknown_outcome_is_retried_with_the_same_key_until_definite() -> None:
    checkout, seen = checkout_answering(504, 502, 201)
    with checkout.client() as api:
        assert checkout.pay(api, "cus_drill_1", 1999) == "201"
    keys = {r.headers["Idempotency-Key"] for r in seen}
    assert len(seen) == 3 and len(keys) == 1
    assert next(iter(keys)).startswith(KEY_PREFIX)
    assert checkout.answers == {"201": 1}


def test_a_definite_answer_is_never_retried_and_retries_are_bounded() -> None:
    checkout, seen = checkout_answering(402, 502, 502, 502)
    with checkout.client() as api:
        assert checkout.pay(api, "cus_decline_1", 1999) == "402"
        assert checkout.pay(api, "cus_drill_2", 1999) == "502"
    assert len(seen) == 4  # 1 declined, then 1 + 2 same-key retries
    assert seen[1].headers["Idempotency-Key"] != seen[0].headers["Idempotency-Key"]


def test_the_drill_is_registered_with_its_steps_in_order() -> None:
    assert DRILLS["payments"] is PaymentFailures
    names = [s.name for s in STEPS]
    assert names[:4] == ["fault injected", "alert firing", "webhook received", "first task"]
    after = {s.name: s.after for s in STEPS}
    assert after["gateway flaky"] == ("alert firing",)
    assert after["gateway ok"] == ("gateway flaky",)
    assert after["verify passed"] == ("action done",)
    assert PaymentFailures.mttr == ("fault injected", "verify passed")


def test_the_hold_is_the_shipped_one_compressed_60x() -> None:
    rules = "groups: [{name: p, rules: [{alert: PaymentFailuresHigh, for: %s}]}]"
    assert compressed_hold("PaymentFailuresHigh", rules_text=rules % "2m") == "2s"
    assert compressed_hold("PaymentFailuresHigh", rules_text=rules % "5m") == "5s"
    assert compressed_hold("PaymentFailuresHigh", rules_text=rules % "30s") == "1s"
    assert compressed_hold("Absent", rules_text=rules % "2m") == "1s"  # as the other drills


class FakeGateway:
    """The sandbox as the recovery sees it: behaviour switches, the retry-unknown counter."""

    def __init__(self, unknown_after: int) -> None:
        self.dsn = "unused"
        self.modes: list[tuple[str, float]] = []
        self.reads_at_switch: list[int] = []
        self.reads = 0
        self.unknown_after = unknown_after

    def behaviour(self, mode: str, share: float = 1.0) -> dict[str, object]:
        self.modes.append((mode, share))
        self.reads_at_switch.append(self.reads)
        return {}

    def attempts(self, kind: str, result: str) -> float:
        assert (kind, result) == ("retry", "unknown")
        self.reads += 1
        return 5.0 if self.reads <= self.unknown_after else 7.0


def test_the_gateway_is_flaky_until_the_run_met_it_then_ok(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("drills.payments_recovery.failed_now", lambda dsn: ["pay_a", "pay_b"])
    gateway = FakeGateway(unknown_after=3)
    checkout = Checkout(lambda: httpx.Client())
    recovery = Recovery(cast(PaymentsSandbox, gateway), checkout, share=0.5, wait_s=10)
    recovery.begin()
    assert recovery.failed_at_alert == ["pay_a", "pay_b"]
    assert recovery.flaky_at is not None
    deadline = time.monotonic() + 10
    while recovery.ok_at is None and time.monotonic() < deadline:  # the counter rose: ok
        time.sleep(0.01)
    recovery.finish()
    assert gateway.modes == [("charge_then_timeout", 0.5), ("ok", 1.0)]
    assert gateway.reads_at_switch == [1, 4]  # ok only once the counter rose (4th read)
    assert recovery.ok_at is not None and recovery.ok_at >= recovery.flaky_at
    assert recovery.unknown_met() == 2
    assert recovery.error is None


def test_the_gateway_is_ok_again_even_when_the_run_never_met_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("drills.payments_recovery.failed_now", lambda dsn: [])
    gateway = FakeGateway(unknown_after=10**6)
    recovery = Recovery(cast(PaymentsSandbox, gateway), Checkout(httpx.Client), wait_s=0.2)
    recovery.begin()
    recovery.finish()
    assert gateway.modes[-1] == ("ok", 1.0)
    assert recovery.unknown_met() == 0


def test_the_page_is_looked_for_at_the_payments_contact(tmp_path: Path) -> None:
    assert topic_blocks({}) == ("payments-team", ["payments-team-slack"])
    other = tmp_path / "escalation.yaml"
    other.write_text(
        yaml.safe_dump(
            {
                "contacts": {c: {"channels": [f"custom-webhook/test-{c}"]} for c in CONTACTS},
                "topics": {"database": "db-team"},
                "default_topic_contact": "incidents",
            }
        )
    )
    env = {"RUNBOOKS_ESCALATION_CONFIG_FILE": str(other)}
    assert topic_blocks(env) == ("incidents", ["test-incidents"])  # the topic's default


def test_the_first_page_delivered_to_those_blocks_counts() -> None:
    pages = Pages()
    sink = Sink("slack", "s3cret")
    other = Sink("slack", "s3cret")
    pages.by_block = {"payments-team-slack": sink, "team-lead-slack": other}
    assert first_delivery(pages, ["payments-team-slack"]) is None
    other.requests.append(SinkRequest("/x", {}, delivered=True, answered=200, at=100.0))
    sink.requests.append(SinkRequest("/x", {}, delivered=False, answered=500, at=101.0))
    assert first_delivery(pages, ["payments-team-slack"]) is None  # refused, another's
    sink.requests.append(SinkRequest("/x", {}, delivered=True, answered=200, at=102.5))
    found = first_delivery(pages, ["payments-team-slack"])
    assert found is not None and found[0] == "payments-team-slack"
    assert found[1].timestamp() == 102.5
