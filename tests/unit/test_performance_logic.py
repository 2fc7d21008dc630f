"""performance-report's pure parts: log lines to requests, per-endpoint figures, the audit
query's identifiers, the diff between two reports, the chart, finding the previous report."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from PIL import Image
from psycopg import sql

from flows.performance.chart import latency_chart
from flows.performance.diff import changes_md, compare
from flows.performance.snapshot import PerformanceSnapshot, previous_snapshot, stamp_of
from tasks.backend import Timings
from tasks.errors import PermanentError
from tasks.kubernetes.models import PodLogs, TailLogsResult
from tasks.performance import (
    EndpointStats,
    HealthTimings,
    SlowUsers,
    UserLatency,
    audit_table_identifier,
    endpoint_stats,
    median_timings,
    parse_request_line,
    parse_request_lines,
    slow_users_sql,
    slowest_requests,
)
from tasks.postgres import StatementStat, TopStatements
from tasks.settings import PerformanceSettings

LINE = (
    "2026-12-07T01:33:14.468Z level=info method=GET path=/api/users/7?x=1"
    " route=/api/users/{user_id} status=200 duration=603.6ms release=v1 ip=127.0.0.1"
)


def test_parse_the_backend_line():
    got = parse_request_line("pod-a", LINE)
    assert got is not None
    assert got.endpoint == "GET /api/users/{user_id}"
    assert (got.duration_ms, got.status, got.at) == (603.6, 200, "2026-12-07T01:33:14.468Z")


@pytest.mark.parametrize(
    ("line", "endpoint", "ms"),
    [
        ("GET path=/api/x?user=3 duration=1.5s", "/api/x", 1500.0),  # no method=, seconds
        ("something took duration=12ms", "?", 12.0),
        ("method=POST route=/api/pay duration=7.25ms status=502", "POST /api/pay", 7.25),
    ],
)
def test_parse_other_shapes(line: str, endpoint: str, ms: float):
    got = parse_request_line("p", line)
    assert got is not None and (got.endpoint, got.duration_ms) == (endpoint, ms)


@pytest.mark.parametrize("line", ["duration=ms", "no figure here", "duration=12mss", ""])
def test_lines_without_a_duration_are_skipped(line: str):
    assert parse_request_line("p", line) is None


def test_every_pod_is_read_and_an_unreadable_one_named():
    logs = TailLogsResult(
        deployment="akig-backend",
        namespace="ns",
        lines=100,
        grep=None,
        logs=[
            PodLogs(pod="a", container="app", lines=[LINE, "route=/api/x duration=2ms"]),
            PodLogs(pod="b", container="app", lines=["route=/api/x duration=4ms", "noise"]),
            PodLogs(pod="c", container="app", lines=[], error="not scheduled"),
        ],
    )
    parsed = parse_request_lines(logs)
    assert parsed.pods == ["a", "b"] and parsed.errors == ["c/app: not scheduled"]
    assert [r.pod for r in parsed.requests] == ["a", "a", "b"]


def _req(endpoint: str, ms: float) -> str:
    return f"method=GET route={endpoint} duration={ms}ms"


def test_endpoint_stats_slowest_p95_first_nearest_rank():
    lines = [_req("/fast", 1.0 + i) for i in range(100)] + [_req("/slow", 300.0)] * 3
    reqs = [r for r in (parse_request_line("p", x) for x in lines) if r]
    stats = endpoint_stats(reqs)
    assert [s.endpoint for s in stats] == ["GET /slow", "GET /fast"]
    fast = stats[1]
    assert (fast.requests, fast.p50_ms, fast.p95_ms, fast.max_ms) == (100, 50.0, 95.0, 100.0)
    slowest = slowest_requests(reqs, 4)
    assert [r.duration_ms for r in slowest] == [300.0, 300.0, 300.0, 100.0]


def test_median_per_phase_keeps_unmeasured_phases_empty():
    runs = [
        Timings(connect_ms=1.0, first_byte_ms=5.0, total_ms=6.0),
        Timings(connect_ms=3.0, first_byte_ms=9.0, total_ms=10.0),
        Timings(connect_ms=2.0, first_byte_ms=7.0, total_ms=50.0),
    ]
    m = median_timings(runs)
    assert m is not None
    assert (m.dns_ms, m.connect_ms, m.tls_ms, m.first_byte_ms, m.total_ms) == (
        None,
        2.0,
        None,
        7.0,
        10.0,
    )
    assert median_timings([]) is None


def test_audit_names_are_quoted_identifiers():
    assert audit_table_identifier("audit.logs") == sql.Identifier("audit", "logs")
    assert audit_table_identifier('x"; DROP TABLE y') == sql.Identifier('x"; DROP TABLE y')
    for bad in ("a.b.c", "", ".logs", "audit.", " . "):
        with pytest.raises(PermanentError, match=r"schema\.table"):
            audit_table_identifier(bad)
    with pytest.raises(PermanentError, match="USER_COLUMN"):
        slow_users_sql(PerformanceSettings(user_column=" "))
    text = repr(slow_users_sql(PerformanceSettings(created_at_column='at"; --')))
    assert "Identifier('at\"; --')" in text


# ------------------------------------------------------------------------------ the diff

T0 = datetime(2026, 12, 7, 6, 15, tzinfo=UTC)


def _stat(query: str, mean: float, qid: int) -> StatementStat:
    return StatementStat(
        queryid=qid,
        datname="db",
        usename="app",
        query=query,
        calls=10,
        total_ms=mean * 10,
        mean_ms=mean,
        max_ms=mean,
        rows=10,
        rows_per_call=1.0,
        shared_blks_hit=0,
        shared_blks_read=0,
    )


def _snap(
    endpoints: dict[str, float],
    users: dict[str, float],
    statements: list[StatementStat],
    total_ms: float,
    at: datetime = T0,
) -> PerformanceSnapshot:
    return PerformanceSnapshot(
        taken_at=at,
        endpoints=[
            EndpointStats(endpoint=e, requests=10, p50_ms=p / 2, p95_ms=p, max_ms=p)
            for e, p in endpoints.items()
        ],
        users=SlowUsers(
            target="t",
            table="audit_logs",
            window_minutes=60,
            status="ok",
            users=[UserLatency(user=u, requests=3, avg_ms=a, max_ms=a) for u, a in users.items()],
        ),
        statements=TopStatements(
            target="t", status="ok", detail="", database=None, by_mean=statements
        ),
        health=HealthTimings(
            url="http://b/api/health",
            via="backend",
            samples=1,
            errors=0,
            runs=[Timings(total_ms=total_ms)],
            median=Timings(total_ms=total_ms),
        ),
    )


def test_the_diff_names_what_moved_and_ignores_the_wobble():
    s1 = _stat("SELECT 1", 5.0, 1)
    before = _snap(
        {"GET /a": 100.0, "GET /b": 10.0, "GET /gone": 3.0},
        {"7": 50.0, "8": 20.0},
        [s1],
        20.0,
    )
    after = _snap(
        {"GET /a": 110.0, "GET /b": 40.0, "GET /new": 5.0},  # /a: +10 %, the wobble
        {"7": 51.0, "8": 90.0, "11": 800.0},
        [s1, _stat("SELECT slow", 300.0, 2)],
        60.0,
        T0 + timedelta(days=1),
    )
    got = {(c.kind, c.subject): c.change for c in compare(before, after)}
    assert got == {
        ("endpoint", "GET /b"): "p95 up 300%",
        ("endpoint", "GET /new"): "new endpoint (p95)",
        ("endpoint", "GET /gone"): "no longer in the logs",
        ("user", "8"): "average up 350%",
        ("user", "11"): "new among the slowest users (average)",
        ("statement", "SELECT slow"): "new in the top 10 by mean",
        ("health", "http://b/api/health"): "median total up 200%",
    }
    assert compare(after, after) == []
    md = changes_md(compare(before, after), "yesterday")
    assert md.startswith("Compared with the report of yesterday:") and "p95 up 300%" in md
    assert "no change" in changes_md([], "yesterday")


def test_a_source_missing_on_either_side_is_not_a_change():
    before = _snap({"GET /a": 10.0}, {"7": 50.0}, [], 20.0)
    after = before.model_copy(update={"users": None, "statements": None, "health": None})
    assert compare(before, after) == []
    # Back again: every user and statement would read "new" against nothing: not said.
    assert compare(after, before) == []


# ------------------------------------------------------------------------------ chart, files


def test_the_chart_is_a_png_one_row_per_endpoint():
    few = [EndpointStats(endpoint="GET /x", requests=1, p50_ms=1, p95_ms=2, max_ms=3)]
    many = [
        EndpointStats(endpoint=f"GET /{i}" * 30, requests=1, p50_ms=i, p95_ms=2 * i, max_ms=3 * i)
        for i in range(40)
    ]
    sizes = []
    for rows in ([], few, many):
        with Image.open(io.BytesIO(latency_chart(rows, "t"))) as img:
            assert img.format == "PNG" and img.width == 960
            sizes.append(img.height)
    assert sizes[0] == sizes[1] < sizes[2] == 56 + 40 + 34 * 15  # capped at 15 rows


def test_previous_report_is_the_newest_readable_one_before(tmp_path: Path):
    assert previous_snapshot(tmp_path / "absent", "z") is None
    older, newer = T0, T0 + timedelta(hours=1)
    for at in (older, newer):
        snap = _snap({"GET /a": 1.0}, {}, [], 1.0, at)
        (tmp_path / f"{stamp_of(at)}.json").write_text(snap.model_dump_json())
    torn = stamp_of(newer + timedelta(minutes=1))
    (tmp_path / f"{torn}.json").write_text('{"version": 1, "taken_')
    (tmp_path / "notes.txt").write_text("x")
    now = stamp_of(newer + timedelta(minutes=2))
    found = previous_snapshot(tmp_path, now)
    assert found is not None and found[0].stem == stamp_of(newer)
    found = previous_snapshot(tmp_path, stamp_of(newer))  # never itself
    assert found is not None and found[0].stem == stamp_of(older)


# ------------------------------------------------------------------------------ sandbox faults


def test_sandbox_delays_add_up_per_route_and_user():
    from pydantic import ValidationError

    from sandbox.app import _delay_ms, create_backend, request_user
    from sandbox.faults import FaultPatch, FaultState
    from sandbox.settings import SandboxSettings

    state = FaultState(
        latency_ms=5, route_latency_ms={"/api/orders": 250}, user_latency_ms={"7": 600}
    )
    assert _delay_ms(state, "/api/orders", "7") == 855
    assert _delay_ms(state, "/api/orders", None) == 255
    assert _delay_ms(state, "/api/products", "8") == 5
    with pytest.raises(ValidationError):
        FaultPatch(route_latency_ms={"/api/orders": -1})
    with pytest.raises(ValidationError):
        FaultPatch(user_latency_ms={"7": 60_001})
    # Nothing is connected to: the pool and the Redis client connect on first use.
    backend = create_backend(SandboxSettings(database_dsn="postgresql://x@127.0.0.1:1/x"))
    routes = backend.app.router.routes
    backend.close()

    def scope(path: str, query: bytes = b"") -> dict[str, object]:
        return {"type": "http", "method": "GET", "path": path, "query_string": query}

    assert request_user(routes, scope("/api/users/7")) == "7"
    assert request_user(routes, scope("/api/orders", b"user_id=5&x=1")) == "5"
    assert request_user(routes, scope("/api/products")) is None


def test_the_health_url_is_the_users_path_when_configured(monkeypatch: pytest.MonkeyPatch):
    from tasks.endpoint import shown_url
    from tasks.performance import health_target

    monkeypatch.setenv("RUNBOOKS_BACKEND_URL", "http://backend:4000/")
    monkeypatch.delenv("RUNBOOKS_OUTAGE_ENDPOINT_URL", raising=False)
    assert health_target()[:2] == ("http://backend:4000/api/health", "backend")
    monkeypatch.setenv("RUNBOOKS_OUTAGE_ENDPOINT_URL", "https://akig.example/api/health")
    monkeypatch.setenv("RUNBOOKS_OUTAGE_ENDPOINT_TIMEOUT_S", "2.5")
    assert health_target()[:3] == ("https://akig.example/api/health", "endpoint", 2.5)
    # What a report shows of a URL: never its credentials or query.
    shown = shown_url("https://u:s3cret@h.example:8443/api/health?token=t0k#x")
    assert shown == "https://h.example:8443/api/health"
