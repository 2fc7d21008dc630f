"""The performance report's reads: the health call's phases, request durations from the
backend's log lines, and the slowest users from the audit table. All read only.

- `health_timings`: a few GETs of the health URL (through the load balancer when
  `RUNBOOKS_OUTAGE_ENDPOINT_URL` is set, else the backend's own), each split by
  `tasks.backend.timed_url` into DNS, connect, TLS, first byte and total; the median per phase.
- `parse_request_lines` / `endpoint_stats` / `slowest_requests`: the `duration=…ms` lines of
  every backend pod (read by `tasks.kubernetes.tail_logs`), per endpoint p50/p95/max.
- `slow_users`: the on-call runbook's audit query over a window, every name from
  `PerformanceSettings` composed as a SQL identifier; a missing table or column is a result.
"""

from __future__ import annotations

import re
import ssl
import statistics
from typing import Literal

import httpx
import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql
from pydantic import BaseModel, Field

from tasks.backend import Timings, percentile, timed_url
from tasks.clients import pg_connect, pg_target
from tasks.endpoint import Via, endpoint_verify, health_url, shown_url
from tasks.errors import PermanentError, TransientError
from tasks.kubernetes.models import TailLogsResult
from tasks.logs import run_logger
from tasks.retry import RETRY_READ
from tasks.settings import (
    BackendSettings,
    OutageSettings,
    PerformanceSettings,
    PostgresSettings,
)

#: The grep a backend log line must match to be read at all (the on-call runbook's
#: `grep "duration.*ms"`, anchored on the field).
DURATION_GREP = r"\bduration=[0-9.]+m?s\b"

_DURATION = re.compile(r"\bduration=([0-9]+(?:\.[0-9]+)?)(ms|s)\b")
_ROUTE = re.compile(r"\broute=(\S+)")
_PATH = re.compile(r"\bpath=(\S+)")
_METHOD = re.compile(r"\bmethod=([A-Z]{3,7})\b")
_STATUS = re.compile(r"\bstatus=([1-5][0-9]{2})\b")
# An ISO-8601 timestamp at the start of the line (the backend's and most loggers' shape).
_STAMP = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?)")
#: How much of a log line a result keeps.
LINE_PREVIEW = 240


# ------------------------------------------------------------------------------ slow overall


class HealthTimings(BaseModel):
    """`samples` timed GETs of the health URL: each one's phases, and the median per phase."""

    url: str
    via: Via = Field(
        description="`endpoint`: through the load balancer (a user's path); `backend`: direct."
    )
    samples: int
    errors: int = Field(description="GETs that got no response (refused, timed out).")
    last_error: str | None = None
    status_codes: list[int] = Field(default_factory=list)
    runs: list[Timings] = Field(default_factory=list)
    median: Timings | None = Field(None, description="The median of each phase over the runs.")


def health_target() -> tuple[str, Via, float, ssl.SSLContext | bool]:
    """The health URL a user reaches (the outage endpoint when configured, else the
    backend's), how it was chosen, its timeout and how its TLS is checked."""
    outage, backend = OutageSettings(), BackendSettings()
    url, via = health_url(outage, backend)
    if via == "endpoint":
        return url, via, outage.endpoint_timeout_s, endpoint_verify(outage)
    return url, via, backend.timeout_s, True


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 2) if known else None


def median_timings(runs: list[Timings]) -> Timings | None:
    """The median of each phase (a phase not measured in any run stays None)."""
    if not runs:
        return None
    return Timings(
        dns_ms=_median([r.dns_ms for r in runs]),
        connect_ms=_median([r.connect_ms for r in runs]),
        tls_ms=_median([r.tls_ms for r in runs]),
        first_byte_ms=_median([r.first_byte_ms for r in runs]),
        total_ms=_median([r.total_ms for r in runs]) or 0.0,
    )


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="health-timings")
def health_timings(samples: int = 5) -> HealthTimings:
    """GET the health URL `samples` times, each split into DNS/connect/TLS/first byte/total."""
    if not 1 <= samples <= 50:
        raise PermanentError(f"samples must be between 1 and 50, not {samples}")
    url, via, timeout_s, verify = health_target()
    runs: list[Timings] = []
    codes: list[int] = []
    errors, last = 0, None
    for _ in range(samples):
        try:
            response, timings = timed_url(url, timeout_s=timeout_s, verify=verify)
        except httpx.TransportError as exc:
            errors, last = errors + 1, type(exc).__name__
            continue
        runs.append(timings)
        codes.append(response.status_code)
    if not runs:
        # The URL may hold a password: only its scheme and host go into the message.
        parts = httpx.URL(url)
        raise TransientError(f"health {parts.scheme}://{parts.host} unreachable: {last}")
    return HealthTimings(
        url=shown_url(url),
        via=via,
        samples=samples,
        errors=errors,
        last_error=last,
        status_codes=codes,
        runs=runs,
        median=median_timings(runs),
    )


# ------------------------------------------------------------------------------ endpoints


class RequestTiming(BaseModel):
    """One request as a `duration=…ms` log line tells it."""

    pod: str
    endpoint: str = Field(description="`METHOD route` (the route template when logged).")
    duration_ms: float
    status: int | None = None
    at: str | None = Field(None, description="The line's timestamp, as logged.")
    line: str = Field(description="The line (secrets masked by tail_logs), truncated.")


class EndpointStats(BaseModel):
    """Nearest-rank p50 / p95 and the max of one endpoint's logged durations."""

    endpoint: str
    requests: int
    p50_ms: float
    p95_ms: float
    max_ms: float


class ParsedLogs(BaseModel):
    """The requests read from every backend pod's log tail."""

    deployment: str
    namespace: str
    pods: list[str] = Field(description="Pods whose log was read.")
    errors: list[str] = Field(default_factory=list, description="`pod/container: why`.")
    lines_per_pod: int
    requests: list[RequestTiming]


def parse_request_line(pod: str, line: str) -> RequestTiming | None:
    """One `duration=…ms` line as a request; None when it holds no duration."""
    found = _DURATION.search(line)
    if found is None:
        return None
    value = float(found[1]) * (1000 if found[2] == "s" else 1)
    route = _ROUTE.search(line)
    path = _PATH.search(line)
    where = route[1] if route else (path[1].split("?", 1)[0] if path else "?")
    method = _METHOD.search(line)
    status = _STATUS.search(line)
    stamp = _STAMP.search(line)
    return RequestTiming(
        pod=pod,
        endpoint=f"{method[1]} {where}" if method else where,
        duration_ms=round(value, 3),
        status=int(status[1]) if status else None,
        at=stamp[1] if stamp else None,
        line=line[:LINE_PREVIEW],
    )


def parse_request_lines(logs: TailLogsResult) -> ParsedLogs:
    """Every pod's `duration=…ms` lines as requests; a pod that could not be read is named."""
    requests: list[RequestTiming] = []
    pods: list[str] = []
    errors: list[str] = []
    for entry in logs.logs:
        if entry.error:
            errors.append(f"{entry.pod}/{entry.container}: {entry.error[:200]}")
            continue
        if entry.pod not in pods:
            pods.append(entry.pod)
        for line in entry.lines:
            got = parse_request_line(entry.pod, line)
            if got is not None:
                requests.append(got)
    return ParsedLogs(
        deployment=logs.deployment,
        namespace=logs.namespace,
        pods=pods,
        errors=errors,
        lines_per_pod=logs.lines,
        requests=requests,
    )


def endpoint_stats(requests: list[RequestTiming]) -> list[EndpointStats]:
    """p50 / p95 / max per endpoint, the slowest p95 first (then the slowest max)."""
    by: dict[str, list[float]] = {}
    for r in requests:
        by.setdefault(r.endpoint, []).append(r.duration_ms)
    stats = [
        EndpointStats(
            endpoint=name,
            requests=len(values),
            p50_ms=percentile(values, 50) or 0.0,
            p95_ms=percentile(values, 95) or 0.0,
            max_ms=max(values),
        )
        for name, values in by.items()
    ]
    return sorted(stats, key=lambda s: (-s.p95_ms, -s.max_ms, s.endpoint))


def slowest_requests(requests: list[RequestTiming], n: int = 20) -> list[RequestTiming]:
    """The `n` slowest requests, slowest first."""
    return sorted(requests, key=lambda r: -r.duration_ms)[:n]


# ------------------------------------------------------------------------------ users

UsersStatus = Literal["ok", "table missing", "column missing", "permission denied"]


class UserLatency(BaseModel):
    """One user's requests in the window: how many, their average and slowest time."""

    user: str = Field(description="The user column's value as text; `(none)` for NULL.")
    requests: int
    avg_ms: float
    max_ms: float


class SlowUsers(BaseModel):
    """The audit query's answer, slowest average first, or why there is none."""

    target: str
    table: str
    window_minutes: int
    status: UsersStatus
    detail: str = ""
    users: list[UserLatency] = Field(default_factory=list)


def audit_table_identifier(
    name: str, setting: str = "RUNBOOKS_PERFORMANCE_AUDIT_TABLE"
) -> sql.Identifier:
    """`table` or `schema.table` as one SQL identifier (each part quoted); else a clear error."""
    parts = name.split(".")
    if not 1 <= len(parts) <= 2 or not all(p.strip() for p in parts):
        raise PermanentError(f"{setting} must be `table` or `schema.table`, not {name!r}")
    return sql.Identifier(*parts)


def slow_users_sql(settings: PerformanceSettings) -> sql.Composed:
    """The on-call runbook's audit query, names from settings as identifiers, bounded."""
    for field in ("user_column", "response_time_column", "created_at_column"):
        if not getattr(settings, field).strip():
            raise PermanentError(f"RUNBOOKS_PERFORMANCE_{field.upper()} must not be empty")
    return sql.SQL(
        """
        SELECT {user}::text AS user_key, COUNT(*) AS request_count,
               AVG({rt})::float8 AS avg_time, MAX({rt})::float8 AS max_time
          FROM {table}
         WHERE {created} > now() - make_interval(mins => %(minutes)s)
         GROUP BY {user}
         ORDER BY avg_time DESC NULLS LAST
         LIMIT %(limit)s
        """
    ).format(
        user=sql.Identifier(settings.user_column),
        rt=sql.Identifier(settings.response_time_column),
        created=sql.Identifier(settings.created_at_column),
        table=audit_table_identifier(settings.audit_table),
    )


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="slow-users")
def slow_users(
    window_minutes: int | None = None,
    limit: int = 20,
    settings: PerformanceSettings | None = None,
    pg: PostgresSettings | None = None,
) -> SlowUsers:
    """The audit table's users by average response time over the window (slowest first)."""
    settings = settings or PerformanceSettings()
    minutes = window_minutes or settings.window_minutes
    if not 1 <= minutes <= 7 * 24 * 60:
        raise PermanentError(f"window must be 1 .. 10080 minutes, not {minutes}")
    if not 1 <= limit <= 500:
        raise PermanentError(f"limit must be 1 .. 500, not {limit}")
    query = slow_users_sql(settings)
    pg = pg or PostgresSettings()
    target = pg_target(pg)
    base = {"target": target, "table": settings.audit_table, "window_minutes": minutes}
    with pg_connect(pg) as conn:
        try:
            rows = conn.execute(query, {"minutes": minutes, "limit": limit}).fetchall()
        except psycopg.errors.UndefinedTable:
            return SlowUsers(
                **base,
                status="table missing",
                detail=f"no table {settings.audit_table!r} in {target}"
                " (RUNBOOKS_PERFORMANCE_AUDIT_TABLE)",
            )
        except psycopg.errors.UndefinedColumn:
            cols = ", ".join(
                [settings.user_column, settings.response_time_column, settings.created_at_column]
            )
            return SlowUsers(
                **base,
                status="column missing",
                detail=f"{settings.audit_table!r} lacks one of the columns {cols}"
                " (RUNBOOKS_PERFORMANCE_*_COLUMN)",
            )
        except psycopg.errors.InsufficientPrivilege:
            return SlowUsers(
                **base,
                status="permission denied",
                detail=f"the runbook's role may not read {settings.audit_table!r}: GRANT SELECT",
            )
    users = [
        UserLatency(
            user="(none)" if r["user_key"] is None else str(r["user_key"])[:100],
            requests=int(r["request_count"]),
            avg_ms=round(float(r["avg_time"] or 0.0), 3),
            max_ms=round(float(r["max_time"] or 0.0), 3),
        )
        for r in rows
    ]
    if users:
        run_logger().info(
            "%s: slowest user %s averages %.1f ms over %d request(s) in %d min",
            target,
            users[0].user,
            users[0].avg_ms,
            users[0].requests,
            minutes,
        )
    return SlowUsers(**base, status="ok", users=users)
