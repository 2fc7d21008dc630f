"""The `high-error-rate` runbook against the real sandbox, without Kubernetes: backend,
PostgreSQL, the private Redis (maxmemory) and a real Prometheus. Faults come from the
sandbox's admin endpoint or a dead dependency; nothing is mocked. The Kubernetes scenarios
(bad rollout, OOMKilled, database restart) are in test_high_error_rate_kube.py."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from prefect.client.schemas.objects import StateType
from prefect.flow_runs import resume_flow_run

from flows.high_error_rate import (
    RUNBOOK,
    CacheClearAction,
    ErrorRateNotRecovered,
    HighErrorRateOutcome,
    HighErrorRateParams,
    high_error_rate,
    target_of,
)
from sandbox.server import free_port
from tasks.locks import target_lock
from tests.fixtures.prefect_runs import (
    flow_run_artifacts,
    runs_in_state,
    task_runs,
    wait_for_paused_run,
)
from tests.fixtures.prometheus import ScrapedSandbox

pytestmark = pytest.mark.usefixtures("prefect_api")


def point_runbook_at(scraped: ScrapedSandbox, monkeypatch: pytest.MonkeyPatch, pg_dsn: str) -> None:
    """Every RUNBOOKS_* setting the runbook reads, pointed at this sandbox."""
    sb = scraped.sandbox
    monkeypatch.setenv("RUNBOOKS_PG_DSN", pg_dsn)
    monkeypatch.setenv("RUNBOOKS_BACKEND_URL", sb.url)
    monkeypatch.setenv("RUNBOOKS_REDIS_URL", sb.settings.redis_url)
    monkeypatch.setenv("RUNBOOKS_REDIS_CACHE_KEY_PATTERN", f"{sb.settings.key_prefix}*")
    monkeypatch.setenv("RUNBOOKS_PROMETHEUS_URL", scraped.prometheus.url)
    monkeypatch.setenv("RUNBOOKS_PROMETHEUS_SELECTOR", f'job="{scraped.job}"')


def wait_ratio(scraped: ScrapedSandbox, done: Callable[[float], bool], what: str) -> float:
    """Poll Prometheus' 1m 5xx ratio of this backend until `done(ratio)`."""
    sel = f'job="{scraped.job}",route=~"/api/.*"'
    expr = (
        f'sum(rate(http_requests_total{{{sel},status=~"5.."}}[1m]) or '
        f"sum(rate(http_requests_total{{{sel}}}[1m])) * 0) / "
        f"sum(rate(http_requests_total{{{sel}}}[1m]))"
    )

    def check() -> list[float] | None:
        value = scraped.prometheus.value(expr)
        # A list, so a ratio of 0.0 still counts as an answer.
        return [value] if value is not None and done(value) else None

    got: list[float] = scraped.prometheus.wait_for(check, timeout=60, what=what)
    return got[0]


@pytest.fixture
def env(
    sandbox_db: str,
    scraped_sandbox: Callable[..., ScrapedSandbox],
    monkeypatch: pytest.MonkeyPatch,
) -> ScrapedSandbox:
    """A scraped healthy backend; no Kubernetes (those rows are 'unavailable')."""
    scraped = scraped_sandbox()
    point_runbook_at(scraped, monkeypatch, sandbox_db)
    monkeypatch.setenv("RUNBOOKS_K8S_KUBECONFIG", "/nonexistent/kubeconfig")
    return scraped


@pytest.fixture
def traffic(env: ScrapedSandbox) -> Iterator[None]:
    """/api traffic all along, so Prometheus' ratios have a denominator."""
    with env.sandbox.background_traffic(("/api/products", "/api/users/7")):
        wait_ratio(env, lambda v: v >= 0, "traffic scraped")
        yield


@pytest.fixture
def filled(env: ScrapedSandbox) -> Iterator[int]:
    """Redis filled to 95 % of maxmemory with the backend's filler keys; their count."""
    env.sandbox.admin("POST", "/admin/redis-fill", json={"fraction": 0.95})
    yield len(cache_keys(env))
    env.sandbox.admin("DELETE", "/admin/redis-fill")


def cache_keys(env: ScrapedSandbox) -> list[str]:
    sb = env.sandbox
    r = redis.Redis.from_url(sb.settings.redis_url, decode_responses=True)
    try:
        return sorted(r.scan_iter(match=f"{sb.settings.key_prefix}*", count=1000))
    finally:
        r.close()


def row(out: HighErrorRateOutcome, prefix: str) -> Any:
    return next(r for r in out.checks if r.item.startswith(prefix))


def held(out: HighErrorRateOutcome) -> set[str]:
    return {s.scenario for s in out.scenarios}


def latest_artifact() -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[RUNBOOK])), limit=50
        )
    arts.sort(key=lambda a: a.created or 0)
    return str(arts[-1].data)


def test_database_down_is_scenario_a(
    sandbox_db: str,
    scraped_sandbox: Callable[..., ScrapedSandbox],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The backend's database is a closed port: its health fails and uncached reads are 500s.
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/akig"
    scraped = scraped_sandbox(database_dsn=dead)
    point_runbook_at(scraped, monkeypatch, sandbox_db)
    monkeypatch.setenv("RUNBOOKS_K8S_KUBECONFIG", "/nonexistent/kubeconfig")
    with scraped.sandbox.background_traffic(("/api/users/11", "/api/products")):
        wait_ratio(scraped, lambda v: v > 0.5, "5xx from the dead database")
        out = high_error_rate(HighErrorRateParams())
    # Every read misses the cache too (nothing can be loaded to cache): C may hold as well.
    assert "A" in held(out) and not held(out) & {"B", "D"}, out.scenarios
    (a,) = [s for s in out.scenarios if s.scenario == "A"]
    assert any("health says the database check fails" in e for e in a.evidence), a.evidence
    assert row(out, "backend health").verdict == "FAIL"
    assert row(out, "5xx ratio").verdict == "FAIL"
    assert out.error_rate_before is not None and out.error_rate_before > 0.5
    # No cluster: its rows say so, and the database restart cannot even be planned.
    for prefix in ("backend logs", "pods", "rollout history"):
        assert row(out, prefix).verdict == "unavailable"
    (restart,) = [p for p in out.plan if p.scenario == "A"]
    assert not restart.possible and "Kubernetes configuration unusable" in restart.summary
    assert out.outcome == "nothing to do"
    md = latest_artifact()
    assert "Scenarios" in md and "database" in md and "Evidence" in md


def test_redis_full_is_scenario_c_and_a_dry_run_changes_nothing(
    env: ScrapedSandbox, traffic: None, filled: int
) -> None:
    keys = cache_keys(env)
    out = high_error_rate(HighErrorRateParams())
    assert "C" in held(out) and "A" not in held(out) and "D" not in held(out)
    (c,) = [s for s in out.scenarios if s.scenario == "C"]
    assert any("of maxmemory" in e for e in c.evidence), c.evidence
    assert out.outcome == "planned"
    (plan,) = out.plan
    assert plan.kind == "cache-clear" and isinstance(plan, CacheClearAction)
    assert plan.planned.matched >= filled and plan.planned.deleted == 0
    # A dry run changes nothing: every key is still there.
    assert set(keys) <= set(cache_keys(env))
    assert row(out, "Redis").verdict == "FAIL"
    assert row(out, "5xx ratio").verdict == "pass"


def test_down_redis_and_prometheus_are_rows_not_a_crash(
    env: ScrapedSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "hunter2-redis-secret"
    monkeypatch.setenv("RUNBOOKS_REDIS_URL", f"redis://:{secret}@127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("RUNBOOKS_PROMETHEUS_URL", f"http://127.0.0.1:{free_port()}")
    out = high_error_rate(HighErrorRateParams(dry_run=False, auto_approve=True))
    redis_row = row(out, "Redis")
    assert redis_row.verdict == "unavailable" and "unavailable" in redis_row.detail
    for prefix in ("5xx ratio", "5xx onset"):
        r = row(out, prefix)
        assert r.verdict == "unavailable" and "unreachable" in r.detail, r
    # Redis down is evidence for the cache scenario; its clear cannot be planned, so
    # nothing is done even though the run may act.
    assert held(out) == {"C"}
    assert [p.possible for p in out.plan] == [False]
    assert out.outcome == "nothing to do" and out.actions == []
    assert row(out, "PostgreSQL connections").verdict == "pass"
    assert row(out, "backend health").verdict == "pass"
    md = latest_artifact()
    assert secret not in md and secret not in out.model_dump_json()


@pytest.mark.parametrize("answer", ["approved", "refused", "timeout"])
def test_cache_clear_waits_for_approval(
    env: ScrapedSandbox, traffic: None, filled: int, answer: str
) -> None:
    keys = cache_keys(env)
    params = HighErrorRateParams(
        dry_run=False, approval_timeout_s=10, verify_window="10s", verify_timeout_s=60
    )
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(high_error_rate, params)
        run_id = wait_for_paused_run(RUNBOOK)
        # Nothing happens while the run waits for a human.
        assert set(keys) <= set(cache_keys(env))
        if answer != "timeout":
            resume_flow_run(
                run_id,
                run_input={"approved": answer == "approved", "approver": "bob", "reason": "INC-9"},
            )
        out = fut.result(timeout=180)
    (md,) = flow_run_artifacts(run_id, RUNBOOK)
    if answer == "approved":
        assert out.outcome == "acted"
        (done,) = out.actions
        assert done.kind == "cache-clear" and done.before.endswith("matched when planned")
        assert len(cache_keys(env)) < filled / 10
        assert "Re-planned after approval" in md and "bob" in md
        assert out.verify is not None and out.verify.recovered
        assert "recovered" in md
    else:
        assert out.outcome == "refused" and out.actions == []
        assert set(keys) <= set(cache_keys(env))
        assert ("nobody" if answer == "timeout" else "bob") in md
        assert "refused" in md


def test_verify_failure_fails_the_run_and_pages_critical(
    env: ScrapedSandbox, traffic: None, filled: int, world_env: Any
) -> None:
    world = world_env()
    # The cache is full (C) but the 5xx come from elsewhere: the clear cannot end them.
    env.sandbox.faults(error_rate_pct=40)
    wait_ratio(env, lambda v: v > 0.2, "5xx from the injected fault")
    params = HighErrorRateParams(
        dry_run=False, auto_approve=True, verify_window="10s", verify_timeout_s=6
    )
    with pytest.raises(ErrorRateNotRecovered, match="escalate"):
        high_error_rate(params)
    md = latest_artifact()
    assert "NOT recovered: escalate" in md
    assert "not asked" in md  # auto_approve: no pause for a cache clear
    assert "cache-clear" in md and "Failed" in md
    assert len(cache_keys(env)) < filled / 10
    # Critical, topic platform (no team of its own: the incidents channel), once each.
    assert world.counts() == {"on-call": 1, "leadership": 1, "incidents": 1}
    (page,) = world.sink["on-call"].delivered
    assert page["payload"]["summary"].startswith("[CRITICAL] platform:")
    assert "notified incidents, leadership, on-call" in md


def test_cache_that_always_misses_is_scenario_c(env: ScrapedSandbox, traffic: None) -> None:
    env.sandbox.faults(cache_miss=True)
    out = high_error_rate(HighErrorRateParams(redis_window_s=3))
    assert "C" in held(out), out.checks
    (c,) = [s for s in out.scenarios if s.scenario == "C"]
    assert any(e.startswith("hit rate 0.0%") for e in c.evidence), c.evidence
    assert out.outcome == "planned"


def run_two_at_once(
    params: HighErrorRateParams, planned: str
) -> list[tuple[Any, HighErrorRateOutcome]]:
    """Start two runs together; (flow run id, outcome) of each. The backend's target is held
    until both ran the task run `planned` (both planned before either may act)."""
    with ThreadPoolExecutor(2) as pool:
        with target_lock(target_of(params)):
            others = set(runs_in_state(RUNBOOK, StateType.RUNNING))  # another test's leftovers
            futures = [pool.submit(high_error_rate, params, return_state=True) for _ in range(2)]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                running = set(runs_in_state(RUNBOOK, StateType.RUNNING)) - others
                if sum(1 for r in running if planned in task_runs(r)) == 2:
                    break
                assert not any(f.done() for f in futures), [f.result() for f in futures]
                time.sleep(0.5)
            else:
                raise AssertionError("the two runs never both planned")
        states = [f.result(timeout=300) for f in futures]
    return [(s.state_details.flow_run_id, s.result()) for s in states]


def one_cleared_one_not(
    runs: list[tuple[Any, HighErrorRateOutcome]],
) -> tuple[HighErrorRateOutcome, Any, HighErrorRateOutcome]:
    """Of two runs, exactly one acted, by clearing the cache: (it, the other's id, the other)."""
    acted = [(rid, o) for rid, o in runs if o.outcome == "acted"]
    others = [(rid, o) for rid, o in runs if o.outcome != "acted"]
    assert len(acted) == 1, [(o.outcome, o.note) for _, o in runs]
    ((_, first),), ((second_id, second),) = acted, others
    assert [a.kind for a in first.actions] == ["cache-clear"]
    return first, second_id, second


def test_two_runs_at_once_the_second_re_measures_under_the_lock_and_changes_nothing(
    env: ScrapedSandbox, traffic: None, filled: int
) -> None:
    """Two `auto_approve` runs on one full Redis, started together: both plan the clear; the
    first to get the target lock clears; the second waited for the lock, measures again,
    finds Redis no longer full and clears nothing."""
    params = HighErrorRateParams(
        dry_run=False, auto_approve=True, verify_window="10s", verify_timeout_s=60
    )
    runs = run_two_at_once(params, planned="redis-cache-clear-True")
    _, second_id, second = one_cleared_one_not(runs)
    assert len(cache_keys(env)) < filled / 10
    # The second planned the same clear before it waited, then did nothing, and says why.
    assert "C" in held(second) and any(a.kind == "cache-clear" for a in second.plan)
    assert second.outcome == "skipped" and second.actions == [] and second.verify is None
    assert "nothing approved still holds after measuring again" in second.note, second.note
    (md,) = flow_run_artifacts(second_id, RUNBOOK)
    assert "Re-planned under the lock" in md and "Approved and still holding: none" in md
