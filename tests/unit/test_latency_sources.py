"""The high-latency runbook's PromQL and dependency addresses, built in tasks/ from settings."""

from __future__ import annotations

import pytest

from tasks.network import dependency_addresses
from tasks.prometheus import pod_cpu_query, pod_memory_query, requests_total_query
from tasks.settings import PrometheusSettings


def test_the_request_total_selects_the_backend_and_its_api_routes() -> None:
    settings = PrometheusSettings(selector='job="shop"')
    assert requests_total_query(settings) == 'sum(http_requests_total{job="shop",route=~"/api/.*"})'


def test_without_a_selector_only_the_routes_are_selected() -> None:
    settings = PrometheusSettings(selector="")
    assert requests_total_query(settings) == 'sum(http_requests_total{route=~"/api/.*"})'


def test_pod_queries_read_the_backend_containers() -> None:
    assert pod_cpu_query() == (
        'sum by (pod) (rate(container_cpu_usage_seconds_total{container!="",pod=~"akig.*"}[5m]))'
    )
    assert pod_memory_query() == (
        'sum by (pod) (container_memory_working_set_bytes{container!="",pod=~"akig.*"})'
    )


def test_addresses_are_host_and_port_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBOOKS_BACKEND_URL", "https://user:pw@api.internal/health")
    monkeypatch.setenv("RUNBOOKS_PG_DSN", "postgresql://app:s3cret@db.internal:6432/orders")
    monkeypatch.delenv("RUNBOOKS_PG_DSN_SECRET_BLOCK", raising=False)
    monkeypatch.setenv("RUNBOOKS_REDIS_URL", "redis://:hunter2@cache.internal:6380/2")
    monkeypatch.delenv("RUNBOOKS_REDIS_URL_SECRET_BLOCK", raising=False)
    assert dependency_addresses() == {
        "backend": ("api.internal", 443),
        "postgres": ("db.internal", 6432),
        "redis": ("cache.internal", 6380),
    }


def test_a_socket_dsn_has_no_tcp_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBOOKS_BACKEND_URL", "http://backend:8080")
    monkeypatch.setenv("RUNBOOKS_PG_DSN", "host=/var/run/postgresql dbname=x")
    monkeypatch.setenv("RUNBOOKS_REDIS_URL", "unix:///tmp/redis.sock")
    assert dependency_addresses() == {"backend": ("backend", 8080)}
