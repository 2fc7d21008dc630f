"""The `high-latency` runbook against the real sandbox: backend, PostgreSQL (private cluster
with pg_stat_statements), Redis and Prometheus. Faults are switched on through the sandbox's
admin endpoint; nothing is mocked."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest
import redis
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType

from flows.driver import NotFixed
from flows.high_latency import RUNBOOK, HighLatencyOutcome, HighLatencyParams, high_latency
from flows.spec import Verdict
from sandbox.db import create_database, drop_database
from sandbox.server import free_port
from tasks.postgres import read_seq_scan_tables
from tasks.settings import PostgresSettings
from tests.fixtures.cadvisor import ProcessCadvisor, resident_bytes
from tests.fixtures.pg_private import PrivateCluster
from tests.fixtures.prefect_runs import flow_run_artifacts, wait_for_paused_run
from tests.fixtures.prometheus import ScrapedSandbox

DB = "akig_latency"
# Flow runs need an API: the shared session server, not an ephemeral one per process.
pytestmark = pytest.mark.usefixtures("prefect_api")


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
    # No cluster to ask for pod metrics here: the row must say "unavailable", honestly.
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
    assert pods.verdict == "unavailable"
    assert "metrics.k8s.io" in pods.detail and "Prometheus" in pods.detail
    # Dry run (the default): at most a planned cache clear, never an action.
    assert out.outcome in ("nothing to do", "planned")
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
    assert out.outcome == "planned"
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
        assert out.outcome == "acted"
        assert out.cache_result is not None and out.cache_result.deleted >= len(keys)
        assert _cache_keys(env) == []
        assert "Re-measured after approval" in md
        # Verified (p95 again): a fast backend is within 1 s, or was never measurable at all.
        assert out.verification is not None and out.verification.healthy, out.verification
        assert "## Verify" in md
    else:
        assert out.outcome == "refused"
        assert _cache_keys(env) == keys


def test_an_empty_cache_clear_plan_asks_nobody(
    env: ScrapedSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    env.sandbox.traffic(3, "/api/products")
    keys = _cache_keys(env)
    assert keys
    # Redis answers, the clear is asked for, but no key matches the configured pattern.
    monkeypatch.setenv(
        "RUNBOOKS_REDIS_CACHE_KEY_PATTERN", f"{env.sandbox.settings.key_prefix}no-such-key:*"
    )
    state = high_latency(
        HighLatencyParams(dry_run=False, clear_cache=True, approval_timeout_s=10),
        return_state=True,
    )
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    out = state.result()
    assert out.outcome == "nothing to do"
    assert "nobody was asked" in out.note
    assert out.cache_plan is not None and out.cache_plan.matched == 0
    assert out.cache_result is None
    with get_client(sync_client=True) as client:
        history = [s.type for s in client.read_flow_run_states(run_id)]
    assert StateType.PAUSED not in history  # nobody was asked
    (md,) = flow_run_artifacts(run_id, RUNBOOK)
    assert "## Approval" not in md and "nothing to do" in md
    assert _cache_keys(env) == keys


def test_no_cache_pattern_configured_is_a_refusal_even_in_a_dry_run(
    env: ScrapedSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    env.sandbox.traffic(3, "/api/products")
    keys = _cache_keys(env)
    monkeypatch.delenv("RUNBOOKS_REDIS_CACHE_KEY_PATTERN")
    out = high_latency(HighLatencyParams(clear_cache=True))
    assert out.outcome == "refused"
    assert "cache clear not planned" in out.note and "SafetyViolation" in out.note
    assert out.cache_plan is None and out.cache_result is None
    assert _cache_keys(env) == keys


def _p95_now(env: ScrapedSandbox) -> float | None:
    """This backend's p95 over 5m, as Prometheus has it now (None: not measurable yet)."""
    rate = f'rate(http_request_duration_seconds_bucket{{job="{env.job}",route=~"/api/.*"}}[5m])'
    value = env.prometheus.value(f"histogram_quantile(0.95, sum by (le) ({rate}))")
    return None if value is None or math.isnan(value) else value


def _measured_p95(env: ScrapedSandbox, done: Callable[[float], bool], what: str) -> float:
    """Traffic across several scrapes until p95 is measurable and `done` with it."""
    with env.sandbox.background_traffic(("/api/products", "/api/users/4"), workers=2):
        p95 = env.prometheus.wait_for(
            lambda: (v := _p95_now(env)) is not None and done(v) and v, timeout=60, what=what
        )
    assert isinstance(p95, float)
    return p95


def _run_approved(
    params: HighLatencyParams, before_resume: Callable[[], None] = lambda: None
) -> tuple[UUID, HighLatencyOutcome | BaseException]:
    """The run, paused for its cache clear, approved by alice; its outcome or its failure."""
    from prefect.flow_runs import resume_flow_run

    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(high_latency, params)
        run_id = wait_for_paused_run(RUNBOOK)
        before_resume()
        resume_flow_run(run_id, run_input={"approved": True, "approver": "alice", "reason": "x"})
        try:
            return run_id, fut.result(timeout=180)
        except Exception as exc:  # the test looks at it
            return run_id, exc


def _run_type(run_id: UUID) -> StateType:
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
    assert state is not None
    return state.type


def test_a_clear_is_verified_by_p95_before_and_after(env: ScrapedSandbox, world_env: Any) -> None:
    world = world_env()
    assert _measured_p95(env, lambda v: v < 1.0, "a p95 below 1 s") < 1.0
    run_id, out = _run_approved(HighLatencyParams(dry_run=False, clear_cache=True))
    assert isinstance(out, HighLatencyOutcome), out
    assert out.outcome == "acted"
    assert out.cache_result is not None and out.cache_result.deleted >= 1
    v = out.verification
    assert v is not None and v.healthy, v
    assert (v.before.verdict, v.after.verdict) == (Verdict.PASS, Verdict.PASS)
    assert v.after.observed.startswith("overall ") and "s" in v.after.observed
    assert "p95 within the threshold after the cache clear" in out.note
    (md,) = flow_run_artifacts(run_id, RUNBOOK)
    assert "## Verify" in md and "before the clear" in md and "after the clear" in md
    assert "## Escalation" not in md
    assert world.counts() == {}
    assert _run_type(run_id) == StateType.COMPLETED


def test_p95_still_above_the_threshold_after_the_clear_escalates_and_fails(
    env: ScrapedSandbox, world_env: Any
) -> None:
    world = world_env()
    # Every /api request takes 400 ms whatever the cache holds: a clear cannot fix it.
    env.sandbox.faults(latency_ms=400)
    _measured_p95(env, lambda v: v > 0.3, "a p95 above 0.3 s")
    params = HighLatencyParams(dry_run=False, clear_cache=True, p95_max_s=0.3)
    run_id, out = _run_approved(params)
    assert isinstance(out, NotFixed), out
    assert "p95 still above the threshold after the cache clear" in str(out)
    assert _cache_keys(env) == []  # it did clear, then measured
    (md,) = flow_run_artifacts(run_id, RUNBOOK)
    assert "## Verify" in md and "**failed**" in md
    assert "## Escalation" in md and "**high** (topic platform)" in md
    # High, topic platform: the team lead and the incidents channel, once each.
    assert world.counts() == {"team-lead": 1, "incidents": 1}
    assert _run_type(run_id) == StateType.FAILED


def test_p95_measured_before_but_not_after_the_clear_is_not_called_fixed(
    env: ScrapedSandbox, world_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = world_env()
    _measured_p95(env, lambda v: v < 1.0, "a p95 below 1 s")

    def prometheus_goes_away() -> None:
        monkeypatch.setenv("RUNBOOKS_PROMETHEUS_URL", f"http://127.0.0.1:{free_port()}")

    params = HighLatencyParams(dry_run=False, clear_cache=True)
    run_id, out = _run_approved(params, before_resume=prometheus_goes_away)
    assert isinstance(out, NotFixed), out
    assert "not measurable after the cache clear" in str(out)
    (md,) = flow_run_artifacts(run_id, RUNBOOK)
    assert "## Escalation" in md
    assert world.counts() == {"team-lead": 1, "incidents": 1}


def test_p95_never_measurable_says_so_and_does_not_escalate(
    env: ScrapedSandbox, world_env: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = world_env()
    monkeypatch.delenv("RUNBOOKS_PROMETHEUS_URL")
    env.sandbox.traffic(3, "/api/products")
    run_id, out = _run_approved(HighLatencyParams(dry_run=False, clear_cache=True))
    assert isinstance(out, HighLatencyOutcome), out
    assert out.outcome == "acted" and _cache_keys(env) == []
    v = out.verification
    assert v is not None and v.healthy
    assert v.after.verdict == Verdict.NOT_CONFIGURED
    assert "not measurable, before" in v.summary and "could not be verified" in v.summary
    (md,) = flow_run_artifacts(run_id, RUNBOOK)
    assert "could not be verified" in md and "## Escalation" not in md
    assert world.counts() == {}


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
    assert out.outcome == "nothing to do"
    md = flow_run_artifacts_latest()
    assert "cache: not judged" in md
    assert secret not in md
    assert secret not in out.model_dump_json()


@pytest.fixture
def backend_process(env: ScrapedSandbox) -> Iterator[tuple[int, str]]:
    """The sandbox backend as a process of its own (a pod's container): its pid and URL."""
    port = free_port()
    s = env.sandbox.settings
    proc_env = {
        **os.environ,
        "SANDBOX_DATABASE_DSN": s.database_dsn,
        "SANDBOX_REDIS_URL": s.redis_url,
        "SANDBOX_KEY_PREFIX": s.key_prefix,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox.backend", "--port", str(port)],
        env=proc_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        up = _wait(lambda: _status(f"{url}/api/health"), lambda code: code == 200)
        assert up == 200, "the backend process did not come up"
        yield proc.pid, url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.TransportError:
        return 0


def test_pod_cpu_and_memory_row_from_real_container_metrics(
    env: ScrapedSandbox, backend_process: tuple[int, str]
) -> None:
    """No metrics.k8s.io here: the row falls back to Prometheus' cAdvisor series of a real
    process, so its figures are that process's measured CPU and memory."""
    pid, url = backend_process
    pod = f"akig-backend-{uuid.uuid4().hex[:6]}"
    job = f"cadvisor-{pod}"
    with ProcessCadvisor("default", {pod: pid}) as cadvisor:
        env.prometheus.scrape(cadvisor.url, job)
        try:
            env.prometheus.wait_up(job)
            with httpx.Client(base_url=url, timeout=10) as c:  # load: CPU the row must see
                for i in range(300):
                    assert c.get("/api/products", params={"page": i % 5}).status_code == 200
            cpu_expr = f'rate(container_cpu_usage_seconds_total{{pod="{pod}"}}[5m])'
            env.prometheus.wait_for(
                lambda: (env.prometheus.value(cpu_expr) or 0) > 0, what="a CPU rate above 0"
            )
            out = high_latency(HighLatencyParams())
            row = _row(out, "pod CPU/memory")
            assert row.verdict == "pass", row
            assert "Prometheus container metrics" in row.detail
            assert "metrics.k8s.io" in row.detail  # why the first source was not used
            assert f"({pod})" in row.observed
            mib = float(row.observed.split("max memory ")[1].split(" MiB")[0])
            rss_mib = resident_bytes(pid) / 2**20
            assert abs(mib - rss_mib) <= max(5.0, 0.2 * rss_mib), (row.observed, rss_mib)
            # The same measured CPU against a threshold it exceeds: the row fails.
            strict = high_latency(HighLatencyParams(pod_cpu_max_cores=1e-6))
            assert _row(strict, "pod CPU/memory").verdict == "FAIL"
        finally:
            env.prometheus.forget(job)
