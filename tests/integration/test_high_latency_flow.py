"""The `high-latency` runbook against the real sandbox: backend, PostgreSQL (private cluster
with pg_stat_statements), Redis and Prometheus. Faults are switched on through the sandbox's
admin endpoint; nothing is mocked."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
import redis

from flows.high_latency import RUNBOOK, HighLatencyParams, high_latency
from sandbox.db import create_database, drop_database
from sandbox.server import free_port
from tasks.postgres import read_seq_scan_tables
from tasks.settings import PostgresSettings
from tests.fixtures.pg_private import PrivateCluster
from tests.fixtures.prefect_runs import flow_run_artifacts, wait_for_paused_run
from tests.fixtures.prometheus import ScrapedSandbox

DB = "akig_latency"


@pytest.fixture(scope="module")
def latency_db(pg_private: PrivateCluster) -> Iterator[str]:
    """The sandbox database in the private cluster, pg_stat_statements where the runbook reads."""
    dsn = create_database(pg_private.admin_dsn, DB, users=200, orders=20_000)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    yield dsn
    drop_database(pg_private.admin_dsn, DB)


@pytest.fixture
def env(
    latency_db: str,
    scraped_sandbox: Callable[..., ScrapedSandbox],
    monkeypatch: pytest.MonkeyPatch,
) -> ScrapedSandbox:
    """A scraped backend on the private cluster; the runbook's settings point at all of it."""
    scraped = scraped_sandbox(database_dsn=latency_db)
    sb = scraped.sandbox
    monkeypatch.setenv("RUNBOOKS_PG_DSN", latency_db)
    monkeypatch.setenv("RUNBOOKS_BACKEND_URL", sb.url)
    monkeypatch.setenv("RUNBOOKS_REDIS_URL", sb.settings.redis_url)
    monkeypatch.setenv("RUNBOOKS_REDIS_CACHE_KEY_PATTERN", f"{sb.settings.key_prefix}*")
    monkeypatch.setenv("RUNBOOKS_PROMETHEUS_URL", scraped.prometheus.url)
    monkeypatch.setenv("RUNBOOKS_PROMETHEUS_SELECTOR", f'job="{scraped.job}"')
    # No cluster to ask for pod metrics here: the row must say "not available", honestly.
    monkeypatch.setenv("RUNBOOKS_K8S_KUBECONFIG", "/nonexistent/kubeconfig")
    with psycopg.connect(latency_db, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")
    return scraped


def _wait(read: Callable[[], Any], done: Callable[[Any], bool], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.2)
        value = read()
    return value


def _scraped(env: ScrapedSandbox, n: int) -> None:
    """Wait until Prometheus has scraped at least `n` /api requests of this backend."""
    expr = f'sum(http_requests_total{{job="{env.job}",route=~"/api/.*"}})'
    got = _wait(lambda: env.prometheus.value(expr), lambda v: v is not None and v >= n)
    assert got is not None and got >= n


def _row(out: Any, prefix: str) -> Any:
    return next(r for r in out.checks if r.item.startswith(prefix))


def test_checklist_finds_n_plus_one_and_missing_index(env: ScrapedSandbox) -> None:
    sb = env.sandbox
    sb.faults(n_plus_one=True, gzip=False)
    # Distinct users: each request misses the cache and reads its orders (a seq scan of
    # orders, no index on user_id) and then each order's product one by one (the N+1).
    statuses = [sb.traffic(1, "/api/orders", user_id=u)[0] for u in range(1, 31)]
    assert set(statuses) == {200}
    _scraped(env, 30)
    _wait(
        lambda: read_seq_scan_tables(settings=PostgresSettings()),
        lambda r: any(t.table == "orders" and t.seq_scan >= 30 for t in r.tables),
    )

    out = high_latency(HighLatencyParams())

    kinds = {w.kind for w in out.quick_wins}
    n1 = [w for w in out.quick_wins if w.kind == "n+1"]
    assert any("FROM products WHERE id = $1" in w.evidence for w in n1), out.quick_wins
    index = [w for w in out.quick_wins if w.kind == "index"]
    assert any("orders" in w.evidence and "user_id" in w.suggestion for w in index), index
    assert "compression" in kinds
    assert _row(out, "load").verdict == "pass"
    assert _row(out, "p95").verdict in ("pass", "FAIL")
    assert _row(out, "slow queries").verdict in ("pass", "FAIL")
    assert _row(out, "network latency: backend").verdict == "pass"
    assert _row(out, "network latency: postgres").verdict == "pass"
    assert _row(out, "network latency: redis").verdict == "pass"
    pods = _row(out, "pod CPU/memory")
    assert pods.verdict == "not available"
    assert "metrics.k8s.io" in pods.detail and "Prometheus" in pods.detail
    # Dry run (the default): at most a planned cache clear, never an action.
    assert out.cache_action in ("none", "planned")
    assert out.cache_result is None
    md = flow_run_artifacts_latest()
    assert "Checklist" in md and "Quick wins" in md and "n\\+1" in md


def flow_run_artifacts_latest() -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[RUNBOOK])), limit=50
        )
    arts.sort(key=lambda a: a.created or 0)
    return str(arts[-1].data)


def test_down_prometheus_is_a_row_not_a_crash(
    env: ScrapedSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNBOOKS_PROMETHEUS_URL", f"http://127.0.0.1:{free_port()}")
    env.sandbox.traffic(3)
    out = high_latency(HighLatencyParams())
    for prefix in ("load", "p95"):
        row = _row(out, prefix)
        assert row.verdict == "unavailable"
        assert "TransientError" in row.detail and "unreachable" in row.detail
    # The other sources still answered.
    assert _row(out, "cache hit rate").verdict in ("pass", "FAIL")
    assert _row(out, "network latency: backend").verdict == "pass"
    md = flow_run_artifacts_latest()
    assert "unavailable" in md


def _cache_keys(env: ScrapedSandbox) -> list[str]:
    sb = env.sandbox
    r = redis.Redis.from_url(sb.settings.redis_url, decode_responses=True)
    try:
        return sorted(r.scan_iter(match=f"{sb.settings.key_prefix}*", count=1000))
    finally:
        r.close()


def test_dry_run_changes_nothing(env: ScrapedSandbox) -> None:
    env.sandbox.traffic(5, "/api/products")
    env.sandbox.traffic(1, "/api/users/1")
    keys = _cache_keys(env)
    assert keys
    out = high_latency(HighLatencyParams(clear_cache=True))
    assert out.cache_action == "planned"
    assert out.cache_plan is not None and out.cache_plan.matched == len(keys)
    assert _cache_keys(env) == keys


@pytest.mark.parametrize("approved", [True, False])
def test_cache_clear_needs_approval(env: ScrapedSandbox, approved: bool) -> None:
    from prefect.flow_runs import resume_flow_run

    env.sandbox.traffic(3, "/api/products")
    env.sandbox.traffic(1, "/api/users/2")
    keys = _cache_keys(env)
    assert keys
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(high_latency, HighLatencyParams(dry_run=False, clear_cache=True))
        run_id = wait_for_paused_run(RUNBOOK)
        # Nothing happens while the run waits for a human.
        assert _cache_keys(env) == keys
        resume_flow_run(
            run_id, run_input={"approved": approved, "approver": "alice", "reason": "INC-7"}
        )
        out = fut.result(timeout=120)
    (md,) = flow_run_artifacts(run_id, RUNBOOK)
    assert "alice" in md
    assert "INC" in md
    if approved:
        assert out.cache_action == "cleared"
        assert out.cache_result is not None and out.cache_result.deleted >= len(keys)
        assert _cache_keys(env) == []
        assert "Re-measured after approval" in md
    else:
        assert out.cache_action == "refused"
        assert _cache_keys(env) == keys


def test_down_redis_is_a_row_and_its_password_stays_out(
    env: ScrapedSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "hunter2-redis-secret"
    monkeypatch.setenv("RUNBOOKS_REDIS_URL", f"redis://:{secret}@127.0.0.1:{free_port()}/0")
    out = high_latency(HighLatencyParams(dry_run=False, clear_cache=True))
    assert _row(out, "cache hit rate").verdict == "unavailable"
    assert _row(out, "Redis memory").verdict == "unavailable"
    assert _row(out, "network latency: redis").verdict == "unavailable"
    # No cache evidence could be read: nothing is proposed, nobody is asked, nothing changes.
    assert out.cache_action == "none"
    md = flow_run_artifacts_latest()
    assert "cache: not judged" in md
    assert secret not in md
    assert secret not in out.model_dump_json()
