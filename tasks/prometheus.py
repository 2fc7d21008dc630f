"""Prometheus HTTP API reads: instant and range queries, and the backend's figures by route.

Every task answers "not configured" (`configured=False`, no figures) when
`RUNBOOKS_PROMETHEUS_URL` is unset: a runbook reports it as a missing source, it does not
fail. Queries select the backend's series with `PrometheusSettings.selector`
(default `job="akig-backend"`) and only its `/api` routes, like the alert rules in
deployments/prometheus/rules.yml.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from tasks.clients import prometheus_http
from tasks.errors import PermanentError, TransientError
from tasks.retry import RETRY_READ
from tasks.settings import PrometheusSettings

#: A Prometheus duration: `30s`, `1m`, `5m`, `1h` ... (no composite units needed here).
_WINDOW = re.compile(r"^[1-9][0-9]{0,4}(ms|s|m|h|d)$")


class Sample(BaseModel):
    """One series of an instant vector (or a scalar, with no labels)."""

    labels: dict[str, str] = Field(default_factory=dict)
    value: float | None = Field(description="None when Prometheus says NaN (e.g. 0/0).")
    timestamp: float


class QueryResult(BaseModel):
    """An instant query's answer."""

    configured: bool = True
    query: str
    result_type: str | None = None
    samples: list[Sample] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)


class Series(BaseModel):
    """One series of a range query: (unix time, value) points."""

    labels: dict[str, str] = Field(default_factory=dict)
    points: list[tuple[float, float | None]] = Field(default_factory=list)


class RangeResult(BaseModel):
    """A range query's answer."""

    configured: bool = True
    query: str
    start: datetime | None = None
    end: datetime | None = None
    step_s: float | None = None
    series: list[Series] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)


class RouteFigures(BaseModel):
    """One figure per /api route plus the overall figure (None where there is no data)."""

    configured: bool = True
    what: str = Field(description="e.g. '5xx ratio', 'requests/s', 'p95 seconds'.")
    window: str
    query: str
    by_route: dict[str, float | None] = Field(default_factory=dict)
    overall: float | None = None


def _number(raw: Any) -> float | None:
    value = float(raw)
    return None if math.isnan(value) else value


def _api(settings: PrometheusSettings, path: str, params: dict[str, Any]) -> dict[str, Any]:
    """GET an /api/v1 endpoint; maps failures to Transient/Permanent errors without secrets."""
    target = settings.url
    try:
        with prometheus_http(settings) as http:
            response = http.get(path, params=params)
    except httpx.TimeoutException:
        raise TransientError(f"Prometheus {target} timed out on {path}") from None
    except httpx.TransportError as exc:
        raise TransientError(f"Prometheus {target} unreachable: {type(exc).__name__}") from None
    try:
        body = response.json()
    except ValueError:
        body = {}
    error = f"{body.get('errorType', '')}: {str(body.get('error', ''))[:300]}".strip(": ")
    if response.status_code in (429,) or response.status_code >= 500:
        # 503 = query queue full / shutting down; 5xx on execution errors (timeout).
        raise TransientError(
            f"Prometheus {target} answered {response.status_code} on {path}: {error}"
        )
    if response.status_code >= 400 or body.get("status") != "success":
        raise PermanentError(
            f"Prometheus {target} refused {path} ({response.status_code}): {error}"
        )
    return dict(body)


def _selector(settings: PrometheusSettings, *extra: str) -> str:
    return "{" + ",".join(m for m in (settings.selector, *extra) if m) + "}"


def _check_window(window: str) -> None:
    if not _WINDOW.match(window):
        raise PermanentError(f"not a Prometheus duration: {window!r} (e.g. 30s, 1m, 5m)")


def run_instant(expr: str, settings: PrometheusSettings, at: datetime | None = None) -> QueryResult:
    """An instant query (plain function; the tasks wrap it)."""
    if not settings.url:
        return QueryResult(configured=False, query=expr)
    params: dict[str, Any] = {"query": expr, "timeout": f"{settings.timeout_s:g}"}
    if at is not None:
        params["time"] = at.timestamp()
    body = _api(settings, "/api/v1/query", params)
    data = body["data"]
    kind = data["resultType"]
    if kind in ("scalar", "string"):
        ts, raw = data["result"]
        samples = [Sample(value=_number(raw) if kind == "scalar" else None, timestamp=float(ts))]
    else:
        samples = [
            Sample(labels=r["metric"], value=_number(r["value"][1]), timestamp=float(r["value"][0]))
            for r in data["result"]
        ]
    return QueryResult(
        query=expr, result_type=kind, samples=samples, warnings=body.get("warnings", [])
    )


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="prometheus-query")
def query_instant(
    expr: str, at: datetime | None = None, settings: PrometheusSettings | None = None
) -> QueryResult:
    """Evaluate a PromQL expression at one instant (default: now)."""
    return run_instant(expr, settings or PrometheusSettings(), at)


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="prometheus-query-range")
def query_range(
    expr: str,
    start: datetime,
    end: datetime | None = None,
    step_s: float = 15.0,
    settings: PrometheusSettings | None = None,
) -> RangeResult:
    """Evaluate a PromQL expression over [start, end] every `step_s` seconds."""
    settings = settings or PrometheusSettings()
    end = end or datetime.now(UTC)
    if not settings.url:
        return RangeResult(configured=False, query=expr, start=start, end=end, step_s=step_s)
    if end <= start or step_s <= 0:
        raise PermanentError("range query needs start < end and a positive step")
    if (end - start).total_seconds() / step_s > 11_000:
        # Prometheus' own limit; say so before it does.
        raise PermanentError("range query would return more than 11000 points per series")
    body = _api(
        settings,
        "/api/v1/query_range",
        {
            "query": expr,
            "start": start.timestamp(),
            "end": end.timestamp(),
            "step": step_s,
            "timeout": f"{settings.timeout_s:g}",
        },
    )
    series = [
        Series(labels=r["metric"], points=[(float(t), _number(v)) for t, v in r["values"]])
        for r in body["data"]["result"]
    ]
    return RangeResult(
        query=expr,
        start=start,
        end=end,
        step_s=step_s,
        series=series,
        warnings=body.get("warnings", []),
    )


def _by_route(
    what: str, window: str, by_route_expr: str, overall_expr: str, settings: PrometheusSettings
) -> RouteFigures:
    if not settings.url:
        return RouteFigures(configured=False, what=what, window=window, query=by_route_expr)
    routes = run_instant(by_route_expr, settings)
    overall = run_instant(overall_expr, settings)
    return RouteFigures(
        what=what,
        window=window,
        query=by_route_expr,
        by_route={s.labels.get("route", ""): s.value for s in routes.samples},
        overall=overall.samples[0].value if overall.samples else None,
    )


def error_rate_queries(settings: PrometheusSettings, window: str = "1m") -> tuple[str, str]:
    """(by route, overall) PromQL for the share of /api requests answered 5xx."""
    _check_window(window)
    all_ = _selector(settings, 'route=~"/api/.*"')
    errors = _selector(settings, 'route=~"/api/.*"', 'status=~"5.."')

    def ratio(by: str) -> str:
        # `or ... * 0`: a route with traffic but no 5xx series yet reads 0, not "no data".
        total = f"sum{by} (rate(http_requests_total{all_}[{window}]))"
        return f"(sum{by} (rate(http_requests_total{errors}[{window}])) or {total} * 0) / {total}"

    return ratio(" by (route)"), ratio("")


#: The backend's containers in cAdvisor's series (its pods are named `akig-...`).
_BACKEND_CONTAINERS = '{container!="",pod=~"akig.*"}'


def requests_total_query(settings: PrometheusSettings) -> str:
    """PromQL: /api requests the backend has counted since its start (a cumulative total)."""
    sel = _selector(settings, 'route=~"/api/.*"')
    return f"sum(http_requests_total{sel})"


def pod_cpu_query() -> str:
    """PromQL: CPU cores each backend pod uses (cAdvisor, over 5 minutes)."""
    return f"sum by (pod) (rate(container_cpu_usage_seconds_total{_BACKEND_CONTAINERS}[5m]))"


def pod_memory_query() -> str:
    """PromQL: working-set bytes of each backend pod (cAdvisor)."""
    return f"sum by (pod) (container_memory_working_set_bytes{_BACKEND_CONTAINERS})"


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="prometheus-5xx-by-route")
def error_rate_by_route(
    window: str = "1m", settings: PrometheusSettings | None = None
) -> RouteFigures:
    """Share (0..1) of /api requests answered 5xx, per route and overall, over `window`."""
    settings = settings or PrometheusSettings()
    by_route, overall = error_rate_queries(settings, window)
    return _by_route("5xx ratio", window, by_route, overall, settings)


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="prometheus-request-rate")
def request_rate(window: str = "1m", settings: PrometheusSettings | None = None) -> RouteFigures:
    """Requests per second on /api, per route and overall, over `window`."""
    settings = settings or PrometheusSettings()
    _check_window(window)
    sel = _selector(settings, 'route=~"/api/.*"')
    return _by_route(
        "requests/s",
        window,
        f"sum by (route) (rate(http_requests_total{sel}[{window}]))",
        f"sum(rate(http_requests_total{sel}[{window}]))",
        settings,
    )


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="prometheus-latency-by-route")
def latency_quantile_by_route(
    quantile: float = 0.95, window: str = "5m", settings: PrometheusSettings | None = None
) -> RouteFigures:
    """The `quantile` (default p95) of /api request duration in seconds, per route and overall."""
    settings = settings or PrometheusSettings()
    _check_window(window)
    if not 0 < quantile < 1:
        raise PermanentError(f"quantile must be between 0 and 1, not {quantile}")
    sel = _selector(settings, 'route=~"/api/.*"')
    rate = f"rate(http_request_duration_seconds_bucket{sel}[{window}])"
    return _by_route(
        f"p{quantile * 100:g} seconds",
        window,
        f"histogram_quantile({quantile}, sum by (route, le) ({rate}))",
        f"histogram_quantile({quantile}, sum by (le) ({rate}))",
        settings,
    )
