"""The `performance-report` runbook on the sandbox platform: a backend on its own seeded
database (its audit_logs table; in the private cluster, where pg_stat_statements is loaded),
its log lines served as the pods' logs of Deployment `akig-backend` on the test Kubernetes
API (two pods, read through `pods/log`), PostgreSQL for real. Faults inject a slow endpoint
and a slow user; they must head their tables. Nothing is mocked."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kubernetes import client as k8s
from PIL import Image
from pydantic import SecretStr

from flows.performance_report import (
    PerformanceReport,
    PerformanceReportParams,
    performance_report,
)
from flows.spec import Verdict
from sandbox.db import create_database, drop_database
from tasks.errors import PermanentError
from tasks.performance import health_timings, slow_users
from tasks.settings import PerformanceSettings, PostgresSettings
from tests.fixtures.kube import KubeCluster
from tests.fixtures.outage import NginxFactory
from tests.fixtures.pg_private import PrivateCluster
from tests.fixtures.prefect_runs import flow_run_artifacts
from tests.fixtures.sandbox import ADMIN_DSN, Sandbox, SandboxFactory
from tests.integration.kube_helpers import deployment_body, rolled_out, wait_until

pytestmark = pytest.mark.usefixtures("prefect_api")
DEPLOYMENT = "akig-backend"
#: The second pod's log: an endpoint only that pod served (proof every pod is read).
OTHER_POD_LINE = (
    "2026-12-07T01:00:00.000Z level=info method=GET path=/api/export route=/api/export"
    " status=200 duration=120.0ms release=v1 ip=10.0.0.9"
)


@pytest.fixture(scope="module")
def perf_db() -> Iterator[str]:
    """A small seeded database of this module's own: its audit_logs holds only our traffic."""
    name = f"rb_perf_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    dsn = create_database(ADMIN_DSN, name, users=50, products=20, orders=500)
    yield dsn
    drop_database(ADMIN_DSN, name)


@pytest.fixture(scope="module")
def stmt_db(pg_private: PrivateCluster) -> Iterator[str]:
    """The same in the private cluster, where pg_stat_statements is preloaded and created."""
    name = f"rb_perf_stmt_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    dsn = create_database(pg_private.admin_dsn, name, users=50, products=20, orders=500)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    yield dsn
    drop_database(pg_private.admin_dsn, name)


def fresh_backend(make: SandboxFactory, dsn: str) -> Sandbox:
    """A sandbox backend on `dsn`, its audit table emptied first."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE audit_logs")
    return make(database_dsn=dsn)


@pytest.fixture
def backend(make_sandbox_backend: SandboxFactory, perf_db: str) -> Sandbox:
    """A sandbox backend on the module's database (no pg_stat_statements there)."""
    return fresh_backend(make_sandbox_backend, perf_db)


def audit_rows(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM audit_logs").fetchone()
    return int(row[0]) if row else 0


def send(sb: Sandbox, perf_db: str, requests: list[tuple[str, int]]) -> None:
    """GET each path n times; wait until every audit row is in (written after the answer)."""
    before = audit_rows(perf_db)
    with sb.client() as c:
        for path, n in requests:
            for _ in range(n):
                assert c.get(path).status_code == 200, path
    total = before + sum(n for _, n in requests)
    wait_until(lambda: audit_rows(perf_db) >= total, what=f"{total} audit rows", timeout=15)


def point_at(
    monkeypatch: pytest.MonkeyPatch, sb: Sandbox, dsn: str, report_dir: Path, kubeconfig: Path
) -> None:
    monkeypatch.setenv("RUNBOOKS_PG_DSN", dsn)
    monkeypatch.setenv("RUNBOOKS_BACKEND_URL", sb.url)
    monkeypatch.setenv("RUNBOOKS_PERFORMANCE_REPORT_DIR", str(report_dir))
    monkeypatch.setenv("RUNBOOKS_K8S_KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("RUNBOOKS_OUTAGE_ENDPOINT_URL", raising=False)


def run(params: PerformanceReportParams) -> tuple[PerformanceReport, str]:
    """One run of the flow: its return value and its artifact's markdown."""
    state = performance_report(params, return_state=True)
    result: PerformanceReport = state.result()
    (artifact,) = flow_run_artifacts(state.state_details.flow_run_id, "performance-report")
    return result, artifact


@pytest.mark.kube
def test_slow_endpoint_and_slow_user_head_their_tables_then_the_diff(
    kube_cluster: KubeCluster,
    kube_namespace: str,
    make_sandbox_backend: SandboxFactory,
    stmt_db: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    ns, perf_db = kube_namespace, stmt_db
    sb = fresh_backend(make_sandbox_backend, perf_db)
    apps: Any = k8s.AppsV1Api(kube_cluster.api())
    core: Any = k8s.CoreV1Api(kube_cluster.api())
    apps.create_namespaced_deployment(ns, deployment_body(DEPLOYMENT, replicas=2))
    rolled_out(kube_cluster.settings(ns), ns, DEPLOYMENT)
    pods = sorted(p.metadata.name for p in core.list_namespaced_pod(ns).items)
    assert len(pods) == 2
    # The first pod's log is the backend's own; the second says something only it said.
    core.patch_namespaced_pod(
        pods[1], ns, {"metadata": {"annotations": {"fake-kubelet/logs": OTHER_POD_LINE}}}
    )
    wait_until(
        lambda: "/api/export" in core.read_namespaced_pod_log(pods[1], ns, container="app"),
        what="the second pod's own log",
    )
    point_at(monkeypatch, sb, perf_db, tmp_path / "reports", kube_cluster.kubeconfig)
    monkeypatch.setenv("RUNBOOKS_K8S_NAMESPACE", ns)
    assert kube_cluster.kubelet is not None
    with kube_cluster.kubelet.serve_backend_logs(ns, sb.log_file):
        with psycopg.connect(perf_db, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_statements_reset()")
        sb.faults(route_latency_ms={"/api/orders": 250}, user_latency_ms={"7": 600})
        send(
            sb,
            perf_db,
            [
                ("/api/products", 30),
                ("/api/users/3", 60),
                ("/api/users/7", 2),  # under 5 % of its route: the route's p95 stays fast
                ("/api/orders?user_id=5", 8),
            ],
        )
        first, artifact = run(PerformanceReportParams(samples=3, window_minutes=30))

        snap = first.snapshot
        # Slow for some endpoints? The injected route heads the table, p95 >= its delay.
        head = snap.endpoints[0]
        assert head.endpoint == "GET /api/orders", [e.endpoint for e in snap.endpoints]
        assert head.requests == 8 and head.p95_ms >= 250
        by_name = {e.endpoint: e for e in snap.endpoints}
        assert by_name["GET /api/users/{user_id}"].p95_ms < 250
        assert by_name["GET /api/products"].requests == 30
        # Every pod was read: the second pod's own endpoint is there.
        assert snap.logs is not None and sorted(snap.logs.pods) == pods
        assert by_name["GET /api/export"].requests == 1
        # The 20 slowest: user 7's two requests first, then the slow route's.
        assert len(snap.slowest) == 20
        assert [r.endpoint for r in snap.slowest[:2]] == ["GET /api/users/{user_id}"] * 2
        assert all(r.duration_ms >= 600 for r in snap.slowest[:2])
        assert [r.duration_ms for r in snap.slowest] == sorted(
            (r.duration_ms for r in snap.slowest), reverse=True
        )
        # Slow for some users? User 7 heads the audit query's answer, then user 5.
        assert snap.users is not None and snap.users.status == "ok"
        assert [u.user for u in snap.users.users[:2]] == ["7", "5"]
        assert snap.users.users[0].avg_ms >= 600 and snap.users.users[0].requests == 2
        # Slow overall? The health call's phases (plain HTTP to an IP: no DNS, no TLS).
        assert snap.health is not None and snap.health.median is not None
        assert snap.health.via == "backend" and len(snap.health.runs) == 3
        assert snap.health.median.connect_ms is not None
        assert snap.health.median.first_byte_ms is not None
        assert snap.health.median.dns_ms is None and snap.health.median.tls_ms is None
        # pg_stat_statements, top by mean: the backend's own statements, none slow yet.
        assert snap.statements is not None and snap.statements.status == "ok"
        assert snap.statements.by_mean and "pg_sleep" not in artifact
        assert "### pg_stat_statements, top by mean time" in artifact
        # The artifact answers all three questions; the files are beside each other.
        for heading in ("Slow overall?", "Slow for some endpoints?", "Slow for some users?"):
            assert f"## {heading}" in artifact
        assert "GET /api/orders" in artifact and "No earlier report" in artifact
        assert first.changes is None and first.outcome == "nothing to do"
        files = first.files
        assert files.error is None and files.png and files.json_file and files.markdown
        with Image.open(files.png) as img:
            assert img.format == "PNG" and img.width == 960 and img.height > 100
        assert Path(files.markdown).stem == Path(files.png).stem == Path(files.json_file).stem
        # The chart: inline in the artifact (the UI shows a data: URI image), linked in the file.
        assert "![Latency by endpoint: p50 and p95](data:image/png;base64,iVBOR" in artifact
        exported = Path(files.markdown).read_text()
        assert f"({Path(files.png).name})" in exported and "data:image" not in exported
        assert "## Slow for some users?" in exported

        # Then /api/products slows down and a new user is slow: the second report says so.
        sb.faults(route_latency_ms={"/api/products": 200}, user_latency_ms={"11": 800})
        send(sb, perf_db, [("/api/products", 10), ("/api/orders?user_id=11", 1)])
        with psycopg.connect(perf_db, autocommit=True) as conn:
            conn.execute("SELECT pg_sleep(0.25)")  # a statement slower than any before
        second, artifact2 = run(PerformanceReportParams(samples=1, window_minutes=30))

    assert second.previous == Path(files.json_file).name
    assert second.changes is not None
    changes = {(c.kind, c.subject): c for c in second.changes}
    products = changes[("endpoint", "GET /api/products")]
    assert products.change.startswith("p95 up"), products
    assert changes[("user", "11")].change == "new among the slowest users (average)"
    slow = [c for c in second.changes if c.kind == "statement" and "pg_sleep" in c.subject]
    assert [c.change for c in slow] == ["new in the top 10 by mean"]
    assert second.checks[1].verdict == Verdict.FAIL and "pg_sleep" in second.checks[1].detail
    assert "## Since the last report" in artifact2 and "p95 up" in artifact2
    assert len(list((tmp_path / "reports").glob("*.json"))) == 2


def test_missing_audit_table_is_a_clear_row(
    backend: Sandbox, perf_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A missing table (here a hostile name, quoted as one identifier) is a row; nothing is
    dropped; the run completes with the other questions answered."""
    point_at(monkeypatch, backend, perf_db, tmp_path / "reports", tmp_path / "no.kubeconfig")
    hostile = 'audit_logs"; DROP TABLE users; --'
    monkeypatch.setenv("RUNBOOKS_PERFORMANCE_AUDIT_TABLE", hostile)
    result, artifact = run(PerformanceReportParams(samples=1))

    users = result.snapshot.users
    assert users is not None and users.status == "table missing" and users.users == []
    row = result.checks[3]
    assert row.verdict == Verdict.NOT_CONFIGURED and "table missing" in row.detail
    assert "table missing" in artifact
    with psycopg.connect(perf_db) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (50,)
    # The other questions are still answered; the absent cluster is its own row.
    assert result.snapshot.health is not None and result.snapshot.health.median is not None
    assert result.checks[2].verdict == Verdict.UNAVAILABLE
    # pg_stat_statements is not installed on this server: a clear row, not a crash.
    stmt = result.checks[1]
    assert stmt.verdict == Verdict.NOT_CONFIGURED and "pg_stat_statements" in stmt.detail
    assert result.outcome == "nothing to do" and result.files.error is None


def test_audit_query_names_are_identifiers(perf_db: str, backend: Sandbox):
    """A missing column is a result; a malformed table setting a clear error; a schema works."""
    pg = PostgresSettings(dsn=SecretStr(perf_db))
    send(backend, perf_db, [("/api/users/4", 3)])
    ok = slow_users.fn(30, settings=PerformanceSettings(audit_table="public.audit_logs"), pg=pg)
    assert ok.status == "ok" and ok.users[0].user == "4" and ok.users[0].requests == 3
    col = slow_users.fn(
        30, settings=PerformanceSettings(response_time_column="latency; SELECT 1"), pg=pg
    )
    assert col.status == "column missing" and "latency; SELECT 1" in col.detail
    missing = slow_users.fn(30, settings=PerformanceSettings(audit_table="nope.audit_logs"), pg=pg)
    assert missing.status == "table missing"
    with pytest.raises(PermanentError, match=r"schema\.table"):
        slow_users.fn(30, settings=PerformanceSettings(audit_table="a.b.c"), pg=pg)


def test_health_call_through_the_load_balancer_is_split_in_five(
    sandbox_backend: Sandbox, make_nginx: NginxFactory, monkeypatch: pytest.MonkeyPatch
):
    """Slow overall? Through a TLS load balancer reached by name, as a user's request goes:
    DNS, connect, TLS, first byte and total are each measured, cumulative as `curl -w`."""
    lb = make_nginx(sandbox_backend.url)
    monkeypatch.setenv("RUNBOOKS_OUTAGE_ENDPOINT_URL", lb.url("/api/health"))
    monkeypatch.setenv("RUNBOOKS_OUTAGE_ENDPOINT_CA_FILE", str(lb.ca_file))
    got = health_timings.fn(3)
    assert (got.via, got.url, got.errors, got.status_codes) == (
        "endpoint",
        lb.url("/api/health"),
        0,
        [200, 200, 200],
    )
    assert got.median is not None
    for t in [*got.runs, got.median]:
        phases = [t.dns_ms, t.connect_ms, t.tls_ms, t.first_byte_ms, t.total_ms]
        measured = [v for v in phases if v is not None]
        assert len(measured) == 5 and measured == sorted(measured) and t.total_ms > 0, t
