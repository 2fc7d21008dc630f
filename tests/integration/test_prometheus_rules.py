"""The shipped alert rules: promtool checks and unit tests, then the real thing end to end."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.prometheus import PROMTOOL, RULES, missing_prometheus

ROOT = Path(__file__).resolve().parents[2]
UNIT_TESTS = sorted((ROOT / "tests" / "prometheus").glob("*.test.yml"))
SEED_ALERTS = {
    "HighErrorRate",
    "HighLatency",
    "DatabaseConnectionPoolExhausted",
    "DatabaseConnectionPoolHigh",
    "CertificateExpiringInDays",
    "PaymentFailuresHigh",
    "AkigUnreachable",
}


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def promtool() -> str:
    reason = missing_prometheus()
    if reason:
        pytest.skip(reason)
    return PROMTOOL


def test_promtool_check_rules(promtool):
    out = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules())} rules found" in out.stdout


def test_promtool_unit_tests(promtool):
    assert len(UNIT_TESTS) >= 4
    out = subprocess.run(
        [promtool, "test", "rules", *map(str, UNIT_TESTS)], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SUCCESS") == len(UNIT_TESTS)


def test_unit_tests_cover_every_alert_firing_and_not():
    covered: dict[str, set[bool]] = {}
    for path in UNIT_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                covered.setdefault(case["alertname"], set()).add(bool(case["exp_alerts"]))
    assert set(covered) == SEED_ALERTS
    assert all(v == {True, False} for v in covered.values()), covered


def test_rules_follow_the_conventions():
    assert {r["alert"] for r in rules()} == SEED_ALERTS
    for rule in rules():
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"])


def high_error_rate_expr() -> str:
    (rule,) = [r for r in rules() if r["alert"] == "HighErrorRate"]
    return str(rule["expr"])


def test_high_error_rate_fires_on_real_30_percent_5xx(scraped_sandbox):
    scraped = scraped_sandbox()
    sb, job, prom = scraped.sandbox, scraped.job, scraped.prometheus
    sb.faults(error_rate_pct=30)
    stop = threading.Event()

    def load() -> None:
        with sb.client() as c:
            while not stop.is_set():
                for path in ("/api/products", "/api/users/3", "/api/orders?user_id=3"):
                    c.get(path)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        # The rule's own expression (read from rules.yml), evaluated by Prometheus on real scrapes.
        expr = f"({high_error_rate_expr().strip()})"
        seen = f'sum(increase(http_requests_total{{job="{job}",route=~"/api/.*"}}[1m]))'

        def expression_true():
            # Enough requests in the window that 30 % is not a coin toss over a few.
            if (prom.value(seen) or 0) < 150:
                return None
            return [r for r in prom.query(expr) if r["metric"].get("job") == job]

        rows = prom.wait_for(expression_true, timeout=30, what="HighErrorRate expression true")
        ratio = float(rows[0]["value"][1])
        assert 0.05 < ratio < 0.6, ratio
        # ... and the rule itself went active (pending: its `for: 1m` has not elapsed).
        alert = prom.wait_for_alert("HighErrorRate", job, timeout=15)
        assert alert["state"] in {"pending", "firing"}
        assert alert["labels"]["severity"] == "critical"
    finally:
        stop.set()
        worker.join(timeout=10)


def test_high_error_rate_stays_quiet_on_a_healthy_backend(scraped_sandbox):
    scraped = scraped_sandbox()
    sb, job, prom = scraped.sandbox, scraped.job, scraped.prometheus
    rate = f'sum(rate(http_requests_total{{job="{job}",route=~"/api/.*"}}[1m]))'

    def traffic_seen():
        sb.traffic(10)  # keep the counters moving between scrapes
        return prom.value(rate)

    # Traffic on /api is there (the denominator), yet the rule's expression yields nothing.
    assert prom.wait_for(traffic_seen, what="/api traffic rate") > 0
    assert not [r for r in prom.query(high_error_rate_expr()) if r["metric"].get("job") == job]
    assert not [a for a in prom.alerts() if a["labels"].get("job") == job]


def test_high_latency_expression_on_real_injected_latency(scraped_sandbox):
    scraped = scraped_sandbox()
    sb, job, prom = scraped.sandbox, scraped.job, scraped.prometheus
    (rule,) = [r for r in rules() if r["alert"] == "HighLatency"]
    sb.faults(latency_ms=1100)
    with sb.background_traffic(("/api/products", "/api/users/8"), workers=4):
        rows = prom.wait_for(
            lambda: [r for r in prom.query(str(rule["expr"])) if r["metric"].get("job") == job],
            timeout=30,
            what="HighLatency expression true",
        )
    assert float(rows[0]["value"][1]) > 1.0
