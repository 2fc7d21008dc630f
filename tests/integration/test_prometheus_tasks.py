"""tasks/prometheus.py against a real Prometheus scraping the real sandbox backend."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import SecretStr

from sandbox.server import free_port
from tasks.errors import PermanentError, TransientError
from tasks.prometheus import (
    error_rate_by_route,
    latency_quantile_by_route,
    query_instant,
    query_range,
    request_rate,
)
from tasks.settings import PrometheusSettings


def settings_for(scraped):
    return scraped.prometheus_settings()


def test_not_configured_is_a_result_not_an_error(monkeypatch):
    monkeypatch.delenv("RUNBOOKS_PROMETHEUS_URL", raising=False)
    off = PrometheusSettings()
    assert off.url is None
    assert query_instant.fn("up", settings=off).configured is False
    start = datetime.now(UTC) - timedelta(minutes=5)
    assert query_range.fn("up", start, settings=off).configured is False
    for figures in (
        error_rate_by_route.fn(settings=off),
        request_rate.fn(settings=off),
        latency_quantile_by_route.fn(settings=off),
    ):
        assert figures.configured is False and figures.by_route == {} and figures.overall is None


def test_instant_and_range_queries(scraped_sandbox):
    scraped = scraped_sandbox()
    s = settings_for(scraped)
    up = query_instant.fn(f'up{{job="{scraped.job}"}}', settings=s)
    assert up.result_type == "vector"
    assert [(x.labels["job"], x.value) for x in up.samples] == [(scraped.job, 1.0)]
    scalar = query_instant.fn("scalar(vector(2))", settings=s)
    assert scalar.result_type == "scalar" and scalar.samples[0].value == 2.0
    nan = query_instant.fn("vector(0) / vector(0)", settings=s)
    assert nan.samples[0].value is None  # NaN becomes "no figure", never a fake number
    start = datetime.now(UTC) - timedelta(seconds=30)
    rng = scraped.prometheus.wait_for(
        lambda: (
            r
            if (
                r := query_range.fn(f'up{{job="{scraped.job}"}}', start, step_s=1, settings=s)
            ).series
            and len(r.series[0].points) >= 2
            else None
        ),
        what="two scrapes",
    )
    assert len(rng.series) == 1
    assert all(v in (1.0, None) for _, v in rng.series[0].points)


def test_5xx_rate_request_rate_and_p95_by_route(scraped_sandbox):
    scraped = scraped_sandbox()
    sb, prom, s = scraped.sandbox, scraped.prometheus, settings_for(scraped)
    sb.faults(error_rate_pct=40)
    paths = ("/api/products", "/api/users/4", "/api/health")
    with sb.background_traffic(paths, workers=2):
        seen = (
            f'sum(increase(http_requests_total{{job="{scraped.job}",route="/api/products"}}[30s]))'
        )

        def all_routes_seen():
            # Enough requests in the window that a 40 % share is not a coin toss over a few.
            if (prom.value(seen) or 0) < 100:
                return None
            f = error_rate_by_route.fn(window="30s", settings=s)
            want = {"/api/products", "/api/users/{user_id}", "/api/health"}
            return f if want <= set(f.by_route) and f.overall else None

        errors = prom.wait_for(all_routes_seen, timeout=30, what="5xx ratio by route")
        rates = request_rate.fn(window="30s", settings=s)
        p95 = latency_quantile_by_route.fn(window="30s", settings=s)
    assert errors.configured and errors.what == "5xx ratio"
    assert 0.15 < errors.by_route["/api/products"] < 0.7
    assert 0.15 < errors.by_route["/api/users/{user_id}"] < 0.7
    # Health is never failed by the fault: its ratio is a real 0, not a missing figure.
    assert errors.by_route["/api/health"] == 0
    assert errors.overall is not None and 0.05 < errors.overall < 0.7
    assert (rates.overall or 0) > 0 and all(v and v > 0 for v in rates.by_route.values())
    assert set(p95.by_route) >= {"/api/products", "/api/health"}
    assert all(v is not None and 0 < v < 1 for v in p95.by_route.values())


def test_p95_sees_injected_latency(scraped_sandbox):
    scraped = scraped_sandbox()
    sb, prom, s = scraped.sandbox, scraped.prometheus, settings_for(scraped)
    sb.faults(latency_ms=1100)
    with sb.background_traffic(("/api/products",), workers=4):

        def products_p95():
            f = latency_quantile_by_route.fn(window="30s", settings=s)
            return f if f.by_route.get("/api/products") else None

        p95 = prom.wait_for(products_p95, timeout=30, what="p95 of /api/products")
    assert p95.by_route["/api/products"] > 1.0  # the HighLatency threshold
    assert p95.what == "p95 seconds"


def test_unreachable_prometheus_is_transient():
    s = PrometheusSettings(url=f"http://127.0.0.1:{free_port()}", token=SecretStr("sekrit"))
    with pytest.raises(TransientError) as info:
        query_instant.fn("up", settings=s)
    assert "sekrit" not in str(info.value)


def test_bad_query_is_permanent(prometheus):
    s = PrometheusSettings(url=prometheus.url)
    with pytest.raises(PermanentError, match="bad_data"):
        query_instant.fn("sum(", settings=s)
    with pytest.raises(PermanentError, match="duration"):
        error_rate_by_route.fn(window="1m]) or vector(1", settings=s)


def test_every_task_uses_the_read_retry_policy():
    from tasks.retry import RETRY_READ, retry_only_transient

    for t in (query_instant, query_range, error_rate_by_route, request_rate):
        assert t.retries == RETRY_READ["retries"]
        assert t.retry_condition_fn is retry_only_transient
    assert latency_quantile_by_route.retry_condition_fn is retry_only_transient
