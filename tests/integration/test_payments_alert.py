"""`PaymentFailuresHigh` on real scrapes of the sandbox payments API: the gateway fails,
payments fail and queue up, the rule's own expression turns true and the rule goes active;
a healthy gateway keeps it quiet."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import yaml

from tests.fixtures.prometheus import RULES


def payment_failures_expr() -> str:
    doc = yaml.safe_load(RULES.read_text())
    (rule,) = [r for g in doc["groups"] for r in g["rules"] if r["alert"] == "PaymentFailuresHigh"]
    return str(rule["expr"]).strip()


def scraped_payments(make_payments_sandbox: Any, prometheus: Any) -> tuple[Any, str]:
    pay = make_payments_sandbox()
    job = f"akig-payments-{uuid.uuid4().hex[:8]}"
    prometheus.scrape(pay.url, job)
    prometheus.wait_up(job)
    return pay, job


def charge_loop(pay: Any, stop: threading.Event) -> None:
    """Customers paying, one after the other (each with its own idempotency key)."""
    with pay.api() as c:
        while not stop.is_set():
            c.post(
                "/api/payments",
                json={"customer": "cus_alert", "amount": 500, "currency": "EUR"},
                headers={"Idempotency-Key": uuid.uuid4().hex},
            )


def test_payment_failures_high_fires_when_the_gateway_fails(
    make_payments_sandbox: Any, prometheus: Any
) -> None:
    pay, job = scraped_payments(make_payments_sandbox, prometheus)
    pay.set_gateway("fails", share=0.5)
    stop = threading.Event()
    worker = threading.Thread(target=charge_loop, args=(pay, stop), daemon=True)
    worker.start()
    try:
        expr = f"({payment_failures_expr()})"
        rows = prometheus.wait_for(
            lambda: [r for r in prometheus.query(expr) if r["metric"].get("job") == job],
            timeout=60,
            what="PaymentFailuresHigh expression true",
        )
        assert float(rows[0]["value"][1]) > 0
        alert = prometheus.wait_for_alert("PaymentFailuresHigh", job, timeout=20)
        assert alert["state"] in {"pending", "firing"}
        assert alert["labels"]["severity"] == "critical"
    finally:
        stop.set()
        worker.join(timeout=10)


def test_payment_failures_high_stays_quiet_on_a_healthy_gateway(
    make_payments_sandbox: Any, prometheus: Any
) -> None:
    pay, job = scraped_payments(make_payments_sandbox, prometheus)
    stop = threading.Event()
    worker = threading.Thread(target=charge_loop, args=(pay, stop), daemon=True)
    worker.start()
    try:
        seen = f'sum(rate(akig_payment_attempts_total{{job="{job}"}}[1m]))'
        assert prometheus.wait_for(lambda: prometheus.value(seen), timeout=60, what="traffic") > 0
        assert not [
            r for r in prometheus.query(payment_failures_expr()) if r["metric"].get("job") == job
        ]
        assert not [a for a in prometheus.alerts() if a["labels"].get("job") == job]
    finally:
        stop.set()
        worker.join(timeout=10)
