"""Runbook `high-error-rate`: the on-call runbook's "High Error Rate" (5xx) runbook.

Trigger: alert `HighErrorRate` (> 5 % of /api answered 5xx over 1 min; route `auto: false`,
so an alert-started run only plans), or by hand from the Prefect UI.

Check (all at once, a source that fails is a row "unavailable", never a crash): the backend
Deployment's log tail (5xx / error lines, those naming the database or the cache), backend
health, pod restarts and OOMKilled, Prometheus' 5xx ratio by route and when it began,
PostgreSQL activity and pool usage, Redis (memory vs maxmemory, evictions, hit rate), and
the rollout history (when the current revision rolled out, whether a previous one exists).

Classify with evidence (more than one may hold): A database, B memory, C cache, D code
(the 5xx began within `rollout_window_minutes` after the current revision became current,
dated by `tasks.kubernetes.revisions.became_current`, not by its ReplicaSet's creation). D
is never claimed, and no rollback planned, when the previous revision is the one the
current revision rolled back from (an undo): that would roll forward onto it.

May change, one action per scenario that holds:
- D: `kubectl rollout undo` of the backend Deployment to the revision pinned when planned
  (at most one undo per run), then waits for the rollout and verifies with Prometheus;
- B: `kubectl rollout restart` of the backend Deployment (skipped when D rolls it back);
- C: the guarded cache clear (SCAN + UNLINK of `RUNBOOKS_REDIS_CACHE_KEY_PATTERN`, never
  FLUSHALL);
- A: a `kubectl rollout restart` of the database StatefulSet (`database_statefulset`).

Safety limits: dry run by default (every action is planned, Kubernetes writes are sent as
server-side dry runs, nothing changes); otherwise an approval in the UI, which
`auto_approve` skips for B, C and D but never for A. Whoever approved, the evidence is
measured again and the plan made again under the remediation lock; only actions both
approved and still justified are taken (none when the 5xx ratio fell below the threshold
while the run waited), and a rollback only to the approved revision. The target lock is
held through the verification. A database restart (A) ends the advisory lock's session:
expected, released quietly, then verified. The cooldown between runs is the alert route's.

Verify: after any action, Prometheus' 5xx ratio must fall below `error_rate_max` within
`verify_timeout_s` (`verify_recovery`); otherwise the run fails and says to escalate.

Undo: the artifact records every previous value before the write that replaces it: the
revision and images before the rollback (undo = roll forward to that revision), the
previous `restartedAt` annotations; a cleared cache refills from the database.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from prefect import Task, get_run_logger
from prefect.futures import PrefectFuture
from pydantic import BaseModel, Field

from flows.common import (
    Decision,
    Report,
    Unavailable,
    alert_resolved,
    collect,
    failure_text,
    md_escape,
    publish_on_exit,
    request_approval,
    table,
    tag_run,
)
from flows.escalate import escalate_incident
from flows.spec import LockTarget, RunbookSpec, runbook_flow
from tasks.backend import HealthResult, backend_health
from tasks.errors import RunbookError, TransientError
from tasks.kubernetes import (
    PodRestarts,
    RestartPlan,
    RestartResult,
    RollbackPlan,
    RollbackResult,
    RolloutHistory,
    StatefulSetRestartPlan,
    StatefulSetRestartResult,
    TailLogsResult,
    apply_restart,
    apply_rollback,
    apply_statefulset_restart,
    current_and_previous,
    plan_restart,
    plan_rollback,
    plan_statefulset_restart,
    pod_restarts,
    rollout_history,
    tail_logs,
    wait_for_rollout,
    wait_for_statefulset,
)
from tasks.locks import LOCK_TIMEOUT_S, kube_lock_target, target_lock
from tasks.postgres import (
    ActivityByDbUser,
    AdvisoryLock,
    PoolUsage,
    activity_by_db_user,
    measure_pool_usage,
    remediation_lock,
)
from tasks.prometheus import (
    RangeResult,
    RouteFigures,
    error_rate_by_route,
    error_rate_queries,
    query_range,
)
from tasks.redis import CacheClearResult, RedisInfo, clear_cache, redis_info
from tasks.settings import KubernetesSettings, PrometheusSettings

RUNBOOK = "high-error-rate"
DNS_1123 = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
WINDOW = r"^[1-9][0-9]{0,3}[smh]$"
#: The step of the 5xx history read to date the onset; a point every 5 s is plenty.
ONSET_STEP_S = 5.0
#: Clock skew allowed between Prometheus and the API server when dating the onset; it also
#: covers the 1 s resolution of the Kubernetes times a revision is dated by.
ONSET_TOLERANCE_S = 15.0
_TOLERANCE = timedelta(seconds=ONSET_TOLERANCE_S)
#: Why a revision just rolled back from is never the target of a rollback.
_NOT_BACK = "never a rollback target: it is the release just undone"

Scenario = Literal["A", "B", "C", "D"]
SCENARIO_NAMES: dict[str, str] = {
    "A": "database",
    "B": "memory (OOMKilled / restarts)",
    "C": "cache (Redis)",
    "D": "code (bad rollout)",
}
Verdict = Literal["ok", "PROBLEM", "not available", "unavailable"]
Action = Literal["none", "planned", "refused", "acted", "skipped"]

# What the sandbox's (and the on-call runbook's) log lines look like:
# `... status=503 ... error="..."`.
_ERROR_LINE = re.compile(r"\bstatus=5\d\d\b|\blevel=error\b", re.IGNORECASE)
_DB_WORDS = re.compile(
    r"psycopg|postgres|database|PoolExhausted|OperationalError|too many connections",
    re.IGNORECASE,
)
_CACHE_WORDS = re.compile(r"redis|cache|JSONDecodeError|UnicodeDecodeError", re.IGNORECASE)


class HighErrorRateParams(BaseModel):
    """Thresholds of the classification, and what the run may do."""

    dry_run: bool = Field(
        True, description="Only check and plan (Kubernetes writes as server dry runs)."
    )
    auto_approve: bool = Field(
        False,
        description="Act on B, C and D without waiting for an approval; a database restart"
        " (A) always waits for one.",
    )
    window: str = Field("1m", pattern=WINDOW, description="Prometheus window of the 5xx ratio.")
    error_rate_max: float = Field(
        0.05, gt=0, lt=1, description="A 5xx ratio above this is a problem (0..1)."
    )
    rollout_window_minutes: float = Field(
        30, ge=1, le=1440, description="D: the 5xx began within this long after the rollout."
    )
    restart_threshold: int = Field(
        3, ge=1, le=1000, description="B: this many container restarts in total is a problem."
    )
    oom_window_minutes: float = Field(
        60, ge=1, le=10_080, description="B: an OOMKill counts when it happened this recently."
    )
    pool_usage_max_percent: float = Field(
        80, gt=0, le=100, description="A: PostgreSQL connection usage at or above this (%)."
    )
    redis_memory_max: float = Field(
        0.9, gt=0, le=1, description="C: Redis used/maxmemory at or above this (0..1)."
    )
    hit_rate_min: float = Field(
        0.5, ge=0, le=1, description="C: a recent hit rate below this is a collapse (0..1)."
    )
    redis_window_s: float = Field(
        1.0, ge=0, le=30, description="Redis hit rate and evictions over this recent window."
    )
    log_lines: int = Field(200, ge=10, le=5000, description="Log lines read per container.")
    database_statefulset: str = Field(
        "akig-postgres", pattern=DNS_1123, description="A: the database StatefulSet."
    )
    verify_window: str = Field(
        "30s", pattern=WINDOW, description="Prometheus window of the 5xx ratio when verifying."
    )
    verify_timeout_s: float = Field(
        180, ge=5, le=3600, description="The 5xx ratio must be below the threshold by then."
    )
    rollout_timeout_s: float = Field(
        300, ge=5, le=3600, description="How long to wait for a rollout to finish."
    )
    approval_timeout_s: int = Field(
        1200, ge=10, le=86_400, description="Without an answer by then, nothing is done."
    )
    requested_by: str = Field("", max_length=200, description="Who asked (name, alert).")
    reason: str = Field("", max_length=2000, description="Why; recorded in the audit artifact.")


class CheckRow(BaseModel):
    """One piece of evidence: its figure and verdict."""

    item: str
    figure: str
    verdict: Verdict
    detail: str = ""


class ScenarioVerdict(BaseModel):
    """A scenario that holds, with the figures that say so."""

    scenario: Scenario
    name: str
    evidence: list[str]


class PlannedAction(BaseModel):
    """One remediation step, planned by a read (the target pinned before any write)."""

    scenario: Scenario
    kind: Literal["rollback", "restart", "cache-clear", "database-restart"]
    target: str
    summary: str
    possible: bool = True
    rollback: RollbackPlan | None = None
    restart: RestartPlan | None = None
    cache: CacheClearResult | None = None
    database: StatefulSetRestartPlan | None = None
    dry_run_result: str = ""


class ActionRecord(BaseModel):
    """What one action did, with the values it replaced."""

    scenario: Scenario
    kind: str
    target: str
    before: str
    after: str
    message: str


class VerifyResult(BaseModel):
    """`verify_recovery`'s answer; not recovered pages critical (`escalate_incident`)."""

    recovered: bool
    threshold: float
    window: str
    before: float | None = Field(description="The overall 5xx ratio when the run began.")
    after: float | None = Field(description="The last ratio read while verifying.")
    waited_s: float
    samples: list[float | None] = Field(default_factory=list)
    reason: str


class HighErrorRateOutcome(BaseModel):
    """What the run found and did."""

    checks: list[CheckRow]
    scenarios: list[ScenarioVerdict]
    plan: list[PlannedAction]
    action: Action
    note: str
    actions: list[ActionRecord] = Field(default_factory=list)
    approval: str | None = None
    error_rate_before: float | None = None
    error_rate_after: float | None = None
    verify: VerifyResult | None = None


class ErrorRateNotRecovered(RunbookError):
    """Verification failed: the 5xx ratio is still above the threshold; escalate."""


# ------------------------------------------------------------------------------ evidence


@dataclass(frozen=True)
class Check:
    """One evidence check: the task and its arguments (the flow submits it, the bench times it)."""

    task: Task[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def submit(self) -> PrefectFuture[Any]:
        """Start it in the flow's task runner."""
        future: PrefectFuture[Any] = self.task.submit(*self.args, **self.kwargs)
        return future

    def call(self) -> Any:
        """Run it here, without Prefect (bench)."""
        return self.task.fn(*self.args, **self.kwargs)


def evidence_checks(params: HighErrorRateParams, now: datetime | None = None) -> dict[str, Check]:
    """Every evidence check of the runbook, by name, with the arguments it runs with."""
    k8s = KubernetesSettings()
    now = now or datetime.now(UTC)
    _, overall = error_rate_queries(PrometheusSettings(), params.window)
    lookback = timedelta(minutes=params.rollout_window_minutes + 10)
    return {
        "logs": Check(
            tail_logs, (k8s.backend_deployment,), {"lines": params.log_lines, "namespace": None}
        ),
        "health": Check(backend_health, (), {}),
        "pods": Check(pod_restarts, (), {}),
        "errors": Check(error_rate_by_route, (params.window,), {}),
        "history": Check(
            query_range, (overall, now - lookback), {"end": now, "step_s": ONSET_STEP_S}
        ),
        "activity": Check(activity_by_db_user, (), {}),
        "pool": Check(measure_pool_usage, (), {}),
        "redis": Check(redis_info, (params.redis_window_s,), {}),
        "rollout": Check(rollout_history, (k8s.backend_deployment, k8s.namespace), {}),
    }


def gather(params: HighErrorRateParams) -> dict[str, Any]:
    """Run every check at once; each result, or `Unavailable` with the reason."""
    futures = {name: check.submit() for name, check in evidence_checks(params).items()}
    return {name: collect(fut) for name, fut in futures.items()}


@dataclass
class LogCounts:
    """Error lines in the log tail, and those naming the database or the cache."""

    lines: int
    errors: int
    database: int
    cache: int
    sample: str


def count_log_errors(logs: TailLogsResult) -> LogCounts:
    """Count 5xx / error lines in the tail, and those that mention the database or cache."""
    lines = [line for p in logs.logs for line in p.lines]
    errors = [line for line in lines if _ERROR_LINE.search(line)]
    return LogCounts(
        lines=len(lines),
        errors=len(errors),
        database=sum(1 for line in errors if _DB_WORDS.search(line)),
        cache=sum(1 for line in errors if _CACHE_WORDS.search(line)),
        sample=errors[-1][:200] if errors else "",
    )


def error_onset(history: RangeResult, threshold: float) -> datetime | None:
    """When the current run of points above `threshold` began (None: not above now).

    Walks back from the newest point while the ratio stays above the threshold; a point
    without data (no traffic) ends the run.
    """
    points = [p for s in history.series for p in s.points]
    if not points:
        return None
    points.sort(key=lambda p: p[0])
    onset: float | None = None
    for ts, value in reversed(points):
        if value is None or value <= threshold:
            break
        onset = ts
    return datetime.fromtimestamp(onset, UTC) if onset is not None else None


def _ago(when: datetime, now: datetime) -> str:
    return f"{when:%H:%M:%S} UTC ({(now - when).total_seconds():.0f} s ago)"


def _pct(value: float | None) -> str:
    return "no data" if value is None else f"{value:.1%}"


@dataclass
class Findings:
    """The evidence table and the scenarios it supports."""

    checks: list[CheckRow]
    scenarios: list[ScenarioVerdict]
    error_rate: float | None
    onset: datetime | None
    #: Actions the evidence rules out, with why (shown in the plan as skipped).
    withheld: list[PlannedAction] = field(default_factory=list)


def classify(params: HighErrorRateParams, got: dict[str, Any], now: datetime) -> Findings:
    """Turn the checks' results into rows with verdicts, and the scenarios they support."""
    rows: list[CheckRow] = []
    evidence: dict[Scenario, list[str]] = {"A": [], "B": [], "C": [], "D": []}

    def unavailable(item: str, u: Unavailable) -> None:
        rows.append(CheckRow(item=item, figure="-", verdict="unavailable", detail=u.reason))

    # Logs -------------------------------------------------------------------------------
    logs = got["logs"]
    if isinstance(logs, Unavailable):
        unavailable("backend logs (tail)", logs)
    else:
        n = count_log_errors(logs)
        rows.append(
            CheckRow(
                item="backend logs (tail)",
                figure=f"{n.errors} of {n.lines} line(s) are 5xx/errors "
                f"({n.database} name the database, {n.cache} the cache)",
                verdict="PROBLEM" if n.errors else "ok",
                detail=n.sample,
            )
        )
        if n.database:
            evidence["A"].append(f"{n.database} error line(s) in the logs name the database")
        if n.cache:
            evidence["C"].append(f"{n.cache} error line(s) in the logs name the cache")
    # Health ------------------------------------------------------------------------------
    health = got["health"]
    if isinstance(health, Unavailable):
        unavailable("backend health", health)
    else:
        assert isinstance(health, HealthResult)
        rows.append(
            CheckRow(
                item="backend health",
                figure=f"HTTP {health.status_code} in {health.timings.total_ms:.0f} ms",
                verdict="ok" if health.ok else "PROBLEM",
                detail=health.summary,
            )
        )
        if "database" in health.failing_checks:
            evidence["A"].append(f"health says the database check fails ({health.summary})")
        if "redis" in health.failing_checks:
            evidence["C"].append(f"health says the Redis check fails ({health.summary})")
    # Pods --------------------------------------------------------------------------------
    pods = got["pods"]
    if isinstance(pods, Unavailable):
        unavailable("pods (restarts, OOMKilled)", pods)
    else:
        _pods_evidence(params, pods, now, rows, evidence["B"])
    # Prometheus: 5xx by route and its onset ------------------------------------------------
    errors = got["errors"]
    ratio: float | None = None
    if isinstance(errors, Unavailable):
        unavailable(f"5xx ratio by route ({params.window})", errors)
    elif not errors.configured:
        rows.append(
            CheckRow(
                item=f"5xx ratio by route ({params.window})",
                figure="-",
                verdict="not available",
                detail="Prometheus not configured (RUNBOOKS_PROMETHEUS_URL)",
            )
        )
    else:
        assert isinstance(errors, RouteFigures)
        ratio = errors.overall
        worst = sorted(
            ((r, v) for r, v in errors.by_route.items() if v is not None), key=lambda x: -x[1]
        )[:4]
        rows.append(
            CheckRow(
                item=f"5xx ratio by route ({params.window})",
                figure=f"overall {_pct(ratio)}",
                verdict="PROBLEM" if (ratio or 0) > params.error_rate_max else "ok",
                detail=", ".join(f"{r}: {v:.1%}" for r, v in worst),
            )
        )
    history = got["history"]
    onset: datetime | None = None
    if isinstance(history, Unavailable):
        unavailable("5xx onset", history)
    elif history.configured:
        onset = error_onset(history, params.error_rate_max)
        rows.append(
            CheckRow(
                item="5xx onset",
                figure=f"above {params.error_rate_max:.0%} since {_ago(onset, now)}"
                if onset
                else f"not above {params.error_rate_max:.0%} now",
                verdict="PROBLEM" if onset else "ok",
                detail=f"{ONSET_STEP_S:g} s steps since {history.start:%H:%M:%S} UTC"
                if history.start
                else "",
            )
        )
    # PostgreSQL -------------------------------------------------------------------------
    _db_evidence(params, got["pool"], got["activity"], rows, evidence["A"])
    # Redis ------------------------------------------------------------------------------
    _redis_evidence(params, got["redis"], rows, evidence["C"])
    # Rollout ----------------------------------------------------------------------------
    withheld: list[PlannedAction] = []
    _rollout_evidence(params, got["rollout"], onset, ratio, now, rows, evidence["D"], withheld)
    scenarios = [
        ScenarioVerdict(scenario=key, name=SCENARIO_NAMES[key], evidence=found)
        for key, found in evidence.items()
        if found
    ]
    return Findings(
        checks=rows, scenarios=scenarios, error_rate=ratio, onset=onset, withheld=withheld
    )


def _pods_evidence(
    params: HighErrorRateParams,
    pods: list[PodRestarts],
    now: datetime,
    rows: list[CheckRow],
    found: list[str],
) -> None:
    recent = now - timedelta(minutes=params.oom_window_minutes)
    restarts = sum(p.restarts for p in pods)
    oom = [
        f"{p.pod}/{c.container}"
        for p in pods
        for c in p.containers
        if c.oom_killed and (c.last_finished_at is None or c.last_finished_at >= recent)
    ]
    waiting = sorted({c.waiting_reason for p in pods for c in p.containers if c.waiting_reason})
    problem = bool(oom) or restarts >= params.restart_threshold
    rows.append(
        CheckRow(
            item="pods (restarts, OOMKilled)",
            figure=f"{len(pods)} pod(s), {restarts} restart(s), {len(oom)} OOMKilled",
            verdict="PROBLEM" if problem else "ok",
            detail=", ".join(oom[:5] + waiting),
        )
    )
    if oom:
        found.append(
            f"{len(oom)} container(s) OOMKilled in the last {params.oom_window_minutes:g} min: "
            + ", ".join(oom[:5])
        )
    if restarts >= params.restart_threshold:
        found.append(f"{restarts} container restart(s) >= {params.restart_threshold}")


def _db_evidence(
    params: HighErrorRateParams,
    pool: PoolUsage | Unavailable,
    activity: ActivityByDbUser | Unavailable,
    rows: list[CheckRow],
    found: list[str],
) -> None:
    if isinstance(pool, Unavailable):
        unavailable = CheckRow(
            item="PostgreSQL connections", figure="-", verdict="unavailable", detail=pool.reason
        )
        rows.append(unavailable)
        if "TransientError" in pool.reason:
            found.append(f"PostgreSQL unreachable ({pool.reason})")
    else:
        high = pool.percent_used >= params.pool_usage_max_percent
        rows.append(
            CheckRow(
                item="PostgreSQL connections",
                figure=f"{pool.client_connections}/{pool.max_connections} "
                f"({pool.percent_used:.1f} %)",
                verdict="PROBLEM" if high else "ok",
                detail=f"threshold {params.pool_usage_max_percent:g} %",
            )
        )
        if high:
            found.append(
                f"connection usage {pool.percent_used:.1f} % >= "
                f"{params.pool_usage_max_percent:g} % ({pool.client_connections}/"
                f"{pool.max_connections})"
            )
    if isinstance(activity, Unavailable):
        rows.append(
            CheckRow(
                item="PostgreSQL activity by database/role",
                figure="-",
                verdict="unavailable",
                detail=activity.reason,
            )
        )
    else:
        waiting = sum(g.waiting for g in activity.groups)
        iit = sum(g.idle_in_transaction for g in activity.groups)
        top = ", ".join(f"{g.datname}/{g.usename}: {g.count}" for g in activity.groups[:3])
        rows.append(
            CheckRow(
                item="PostgreSQL activity by database/role",
                figure=f"{activity.total} connection(s); {waiting} waiting on locks, "
                f"{iit} idle in transaction",
                verdict="ok",
                detail=top,
            )
        )


def _redis_evidence(
    params: HighErrorRateParams,
    info: RedisInfo | Unavailable,
    rows: list[CheckRow],
    found: list[str],
) -> None:
    if isinstance(info, Unavailable):
        rows.append(CheckRow(item="Redis", figure="-", verdict="unavailable", detail=info.reason))
        if "TransientError" in info.reason:
            found.append(f"Redis unreachable ({info.reason})")
        return
    problems: list[str] = []
    if info.memory_ratio is not None and info.memory_ratio >= params.redis_memory_max:
        problems.append(
            f"memory {info.memory_ratio:.1%} of maxmemory >= {params.redis_memory_max:.0%}"
        )
    evicted = info.window_evictions if info.window_evictions is not None else 0
    if evicted > 0:
        problems.append(f"{evicted} key(s) evicted in the last {info.window_s:g} s")
    reads = (info.window_hits or 0) + (info.window_misses or 0)
    rate = info.window_hit_rate
    # A handful of reads says nothing about a collapse.
    if rate is not None and reads >= 20 and rate < params.hit_rate_min:
        problems.append(f"hit rate {rate:.1%} < {params.hit_rate_min:.0%} over {reads} reads")
    rows.append(
        CheckRow(
            item="Redis",
            figure=(
                f"memory {info.memory_ratio:.1%} of maxmemory"
                if info.memory_ratio is not None
                else f"memory {info.used_memory_human or info.used_memory} (no maxmemory)"
            )
            + "; hit rate "
            f"{_pct(rate if rate is not None else info.hit_rate)}; evicted {info.evicted_keys}",
            verdict="PROBLEM" if problems else "ok",
            detail="; ".join(problems) or f"policy {info.maxmemory_policy}",
        )
    )
    found.extend(problems)


def _rollout_evidence(
    params: HighErrorRateParams,
    history: RolloutHistory | Unavailable,
    onset: datetime | None,
    ratio: float | None,
    now: datetime,
    rows: list[CheckRow],
    found: list[str],
    withheld: list[PlannedAction],
) -> None:
    if isinstance(history, Unavailable):
        rows.append(
            CheckRow(
                item="rollout history", figure="-", verdict="unavailable", detail=history.reason
            )
        )
        return
    latest, prev = current_and_previous(history.revisions)
    if latest is None:
        rows.append(
            CheckRow(
                item="rollout history",
                figure=f"revision {history.current_revision}",
                verdict="not available",
                detail="no ReplicaSet matches the current template",
            )
        )
        return
    # Dated from when the revision became current, not from its ReplicaSet's creation: an
    # undo re-uses the old ReplicaSet, whose creation time is the old release's.
    since = latest.became_current
    figure = f"revision {latest.revision} ({', '.join(latest.images)})" + (
        f" current since {_ago(since, now)}" if since else " (when it became current: unknown)"
    )
    if latest.earlier_revisions:
        figure += f", an undo (it was revision {max(latest.earlier_revisions)} before)"
    undone = history.undone  # computed from the same revisions: its revision is `prev`'s
    # Table cells keep 200 characters: the reason first, the previous revision in it.
    if undone is not None:
        details = [f"{undone.describe()}; {_NOT_BACK}"]
    elif prev is not None:
        details = [f"previous: revision {prev.revision} ({', '.join(prev.images)})"]
    else:
        details = ["no previous revision"]
    if onset is not None and since is not None and onset < since - _TOLERANCE:
        details.append(f"5xx since {onset:%H:%M:%S} UTC, before revision {latest.revision}")
    began_after = (
        onset is not None
        and since is not None
        and onset >= since - _TOLERANCE
        and onset - since <= timedelta(minutes=params.rollout_window_minutes)
    )
    suspect = began_after and prev is not None and (ratio or 0) > params.error_rate_max
    rows.append(
        CheckRow(
            item="rollout history",
            figure=figure,
            verdict="PROBLEM" if suspect else "ok",
            detail="; ".join(details),
        )
    )
    if undone is not None and (ratio or 0) > params.error_rate_max:
        # D is not claimed: its only action would go back to the release just undone.
        withheld.append(
            PlannedAction(
                scenario="D",
                kind="rollback",
                target=f"deployment/{history.deployment} in {history.namespace}",
                summary=f"not planned (D not claimed): {undone.describe()}; {_NOT_BACK}",
                possible=False,
            )
        )
        return
    if suspect:
        assert onset is not None and since is not None and prev is not None
        found.append(
            f"5xx at {_pct(ratio)} since {onset:%H:%M:%S} UTC, "
            f"{(onset - since).total_seconds():.0f} s after revision {latest.revision} "
            f"({', '.join(latest.images)}) became current at {since:%H:%M:%S} UTC "
            f"(within {params.rollout_window_minutes:g} min); previous revision "
            f"{prev.revision} ({', '.join(prev.images)})"
        )


# ------------------------------------------------------------------------------ plan


def make_plan(
    params: HighErrorRateParams,
    scenarios: list[ScenarioVerdict],
    withheld: Sequence[PlannedAction] = (),
) -> list[PlannedAction]:
    """One planned action per scenario that holds; targets pinned by reads, nothing written.

    `withheld`: actions the evidence ruled out (`Findings.withheld`), listed as skipped.
    """
    k8s = KubernetesSettings()
    dep, ns = k8s.backend_deployment, k8s.namespace
    held = {s.scenario for s in scenarios}
    plan: list[PlannedAction] = [a.model_copy() for a in withheld]

    def impossible(scenario: Scenario, kind: Any, target: str, exc: Exception) -> PlannedAction:
        return PlannedAction(
            scenario=scenario,
            kind=kind,
            target=target,
            summary=f"not possible: {failure_text(exc)}",
            possible=False,
        )

    if "D" in held:
        target = f"deployment/{dep} in {ns}"
        try:
            rb = plan_rollback(dep, ns)
            summary = (
                f"roll back from revision {rb.from_revision} "
                f"({', '.join(rb.images_before)}) to revision {rb.to_revision} "
                f"({', '.join(rb.images_after)})"
            )
            if rb.target_undone is not None:
                # The Deployment was undone after the evidence was read: the previous
                # revision is now the one just left.
                summary = f"not planned: {rb.target_undone.describe()}; {_NOT_BACK}"
            plan.append(
                PlannedAction(
                    scenario="D",
                    kind="rollback",
                    target=target,
                    summary=summary,
                    possible=not rb.already_current and rb.target_undone is None,
                    rollback=rb,
                )
            )
        except RunbookError as exc:
            plan.append(impossible("D", "rollback", target, exc))
    if "B" in held:
        target = f"deployment/{dep} in {ns}"
        if any(a.kind == "rollback" and a.possible for a in plan):
            plan.append(
                PlannedAction(
                    scenario="B",
                    kind="restart",
                    target=target,
                    summary="no separate restart: the rollback replaces every pod",
                    possible=False,
                )
            )
        else:
            try:
                rs = plan_restart(dep, ns)
                plan.append(
                    PlannedAction(
                        scenario="B",
                        kind="restart",
                        target=target,
                        summary=f"rollout restart (restartedAt {rs.restarted_at}; "
                        f"was {rs.previous_restarted_at or 'never'})",
                        restart=rs,
                    )
                )
            except RunbookError as exc:
                plan.append(impossible("B", "restart", target, exc))
    if "C" in held:
        try:
            cc = clear_cache(dry_run=True)
            plan.append(
                PlannedAction(
                    scenario="C",
                    kind="cache-clear",
                    target=cc.target,
                    summary=f"remove {cc.matched} key(s) matching {cc.pattern!r} ({cc.method})",
                    possible=cc.matched > 0,
                    cache=cc,
                )
            )
        except RunbookError as exc:
            plan.append(impossible("C", "cache-clear", "Redis", exc))
    if "A" in held:
        sts = params.database_statefulset
        target = f"statefulset/{sts} in {ns}"
        try:
            sp = plan_statefulset_restart(sts, ns)
            plan.append(
                PlannedAction(
                    scenario="A",
                    kind="database-restart",
                    target=target,
                    summary=f"rollout restart of the database pods (restartedAt "
                    f"{sp.restarted_at}; was {sp.previous_restarted_at or 'never'}; "
                    f"updateStrategy {sp.update_strategy}); always needs an approval",
                    database=sp,
                )
            )
        except RunbookError as exc:
            plan.append(impossible("A", "database-restart", target, exc))
    return plan


def server_dry_runs(plan: list[PlannedAction]) -> None:
    """Send each planned Kubernetes write as a server-side dry run (validated, not stored)."""
    for action in plan:
        if not action.possible:
            continue
        try:
            if action.rollback is not None:
                action.dry_run_result = apply_rollback(action.rollback, dry_run=True).message
            elif action.restart is not None:
                action.dry_run_result = apply_restart(action.restart, dry_run=True).message
            elif action.database is not None:
                result = apply_statefulset_restart(action.database, dry_run=True)
                action.dry_run_result = result.message
            elif action.cache is not None:
                action.dry_run_result = f"{action.cache.matched} key(s) would be removed"
        except RunbookError as exc:
            action.dry_run_result = f"refused: {failure_text(exc)}"


def still_valid(approved: list[PlannedAction], fresh: list[PlannedAction]) -> list[PlannedAction]:
    """The fresh plan's actions that were approved and still target the same thing."""
    by_kind = {a.kind: a for a in approved if a.possible}
    out = []
    for action in fresh:
        before = by_kind.get(action.kind)
        if before is None or not action.possible:
            continue
        if action.rollback is not None:
            old = before.rollback
            # Only the revision and images a human approved, never a newer "previous".
            if old is None or (old.to_revision, old.images_after) != (
                action.rollback.to_revision,
                action.rollback.images_after,
            ):
                continue
        out.append(action)
    return out


# ------------------------------------------------------------------------------ verify


def errors_ended(params: HighErrorRateParams, before: float | None) -> float | None:
    """The recent 5xx ratio (`verify_window`) when the errors the plan was made for ended.

    None unless the ratio was above the threshold when planned and is measured below it now:
    what another run's remediation (or the incident's own end) looks like to a run that
    waited. Not measurable (no Prometheus, no traffic) is not "ended": the evidence decides.
    """
    if before is None or before <= params.error_rate_max:
        return None
    try:
        figures = error_rate_by_route(params.verify_window)
    except RunbookError:
        return None
    now = figures.overall if figures.configured else None
    return now if now is not None and now < params.error_rate_max else None


def verify_recovery(
    params: HighErrorRateParams,
    before: float | None,
    settings: PrometheusSettings | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> VerifyResult:
    """Poll Prometheus' 5xx ratio until it is below the threshold, or the timeout passes.

    The one place an escalation hooks in: `recovered` False means the remediation did not
    end the errors (or they could not be measured) and a human must take over.
    """
    settings = settings or PrometheusSettings()
    start = time.monotonic()
    samples: list[float | None] = []
    reason = ""
    while True:
        try:
            figures = error_rate_by_route(params.verify_window, settings=settings)
        except RunbookError as exc:
            figures, reason = None, f"Prometheus unavailable: {failure_text(exc)}"
        waited = time.monotonic() - start
        if figures is not None and not figures.configured:
            reason = "Prometheus not configured: the recovery cannot be measured"
            break
        value = figures.overall if figures is not None else None
        if figures is not None:
            samples.append(value)
            reason = ""
        if value is not None and value < params.error_rate_max:
            return VerifyResult(
                recovered=True,
                threshold=params.error_rate_max,
                window=params.verify_window,
                before=before,
                after=value,
                waited_s=round(waited, 1),
                samples=samples[-20:],
                reason=f"5xx ratio {value:.1%} < {params.error_rate_max:.0%} after {waited:.0f} s",
            )
        if waited >= params.verify_timeout_s:
            break
        sleep(min(2.0, max(0.1, params.verify_timeout_s - waited)))
    last = next((s for s in reversed(samples) if s is not None), None)
    return VerifyResult(
        recovered=False,
        threshold=params.error_rate_max,
        window=params.verify_window,
        before=before,
        after=last,
        waited_s=round(time.monotonic() - start, 1),
        samples=samples[-20:],
        reason=reason
        or f"5xx ratio still {_pct(last)} (>= {params.error_rate_max:.0%}) after "
        f"{params.verify_timeout_s:g} s",
    )


# ------------------------------------------------------------------------------ report


def _checks_md(rows: list[CheckRow]) -> str:
    return table(
        ["check", "figure", "verdict", "detail"],
        [[r.item, r.figure, r.verdict, r.detail] for r in rows],
    )


def _scenarios_md(scenarios: list[ScenarioVerdict]) -> str:
    if not scenarios:
        return "_No scenario is supported by the evidence._"
    return "\n".join(
        f"- **{s.scenario}, {md_escape(s.name)}**: " + "; ".join(md_escape(e) for e in s.evidence)
        for s in scenarios
    )


def _plan_md(plan: list[PlannedAction]) -> str:
    rows = [
        [
            a.scenario,
            a.kind if a.possible else f"{a.kind} (skipped)",
            a.target,
            a.summary,
            a.dry_run_result or "-",
        ]
        for a in plan
    ]
    return table(["scenario", "action", "target", "plan", "server dry run"], rows)


def _actions_md(records: list[ActionRecord]) -> str:
    return table(
        ["scenario", "action", "target", "before", "after", "result"],
        [[r.scenario, r.kind, r.target, r.before, r.after, r.message] for r in records],
    )


# ------------------------------------------------------------------------------ the flow


SPEC: RunbookSpec[Any] = RunbookSpec(
    name=RUNBOOK,
    title="High error rate (5xx)",
    severity="critical",
    topic="platform",
    lock=lambda p: LockTarget(target_of(p)),
)


@runbook_flow(SPEC)
def high_error_rate(params: HighErrorRateParams = HighErrorRateParams()) -> HighErrorRateOutcome:  # noqa: B008
    """Gather evidence, classify the 5xx (A-D), plan, approve, remediate and verify."""
    report = Report(RUNBOOK, "High error rate (5xx)")
    outcome: list[HighErrorRateOutcome] = []

    def summary() -> str:
        if not outcome:
            return f"{RUNBOOK}: stopped"
        o = outcome[0]
        held = "".join(s.scenario for s in o.scenarios) or "none"
        return f"{RUNBOOK}: scenarios {held}; {o.action}"

    with publish_on_exit(report, summary):
        result = _run(params, report)
        outcome.append(result)
        if result.verify is not None and not result.verify.recovered:
            message = (
                f"5xx ratio not below {params.error_rate_max:.0%} after remediation "
                f"({result.verify.reason}); escalated to the on-call (see the run's artifact)"
            )
            paged = escalate_incident("critical", "platform", message)
            sent = [d.contact for d in paged.deliveries if d.status == "sent"] if paged else []
            reached = sorted(set(sent))
            report.add(
                "Escalation",
                "**critical** (topic platform): "
                + (f"notified {md_escape(', '.join(reached))}" if reached else "nobody reached")
                + " (see the escalate subflow's artifact).",
            )

            raise ErrorRateNotRecovered(message)
        return result


def _run(params: HighErrorRateParams, report: Report) -> HighErrorRateOutcome:
    logger = get_run_logger()
    source = tag_run(RUNBOOK)
    report.add(
        "Request",
        f"Requested by **{md_escape(params.requested_by or source)}** (source: {source}); "
        f"dry run: **{params.dry_run}**; auto approve: **{params.auto_approve}**."
        + (f"\n\nReason: {md_escape(params.reason)}" if params.reason else ""),
    )
    now = datetime.now(UTC)
    found = classify(params, gather(params), now)
    report.add("Evidence", _checks_md(found.checks))
    report.add("Scenarios", _scenarios_md(found.scenarios))
    logger.info(
        "5xx ratio %s; scenarios: %s",
        _pct(found.error_rate),
        [s.scenario for s in found.scenarios] or "none",
    )
    plan = make_plan(params, found.scenarios, found.withheld)
    if params.dry_run:
        server_dry_runs(plan)
    report.add("Plan", _plan_md(plan))
    decision: Decision | None = None

    def finish(
        action: Action,
        note: str,
        *,
        records: list[ActionRecord] | None = None,
        verify: VerifyResult | None = None,
    ) -> HighErrorRateOutcome:
        report.add("Outcome", f"**{action}**: {md_escape(note)}")
        logger.info("%s: %s", action, note)
        return HighErrorRateOutcome(
            checks=found.checks,
            scenarios=found.scenarios,
            plan=plan,
            action=action,
            note=note,
            actions=records or [],
            approval=decision.line() if decision else None,
            error_rate_before=found.error_rate,
            error_rate_after=verify.after if verify else None,
            verify=verify,
        )

    doable = [a for a in plan if a.possible]
    if not found.scenarios:
        return finish("none", "no scenario holds: nothing to do, nothing changed.")
    if not doable:
        return finish("none", "no action can be taken (see the plan): nothing changed.")
    if params.dry_run:
        return finish("planned", "dry run: nothing changed. Re-run with dry_run off to act.")
    needs_human = not params.auto_approve or any(a.scenario == "A" for a in doable)
    if needs_human:
        decision = request_approval(
            "; ".join(f"{a.scenario}: {a.kind} {a.target}: {a.summary}" for a in doable),
            params.approval_timeout_s,
        )
        report.add("Approval", decision.line())
        if not decision.approved:
            return finish("refused", "not approved: nothing changed.")
    else:
        report.add(
            "Approval", "not asked: `auto_approve` is set and no database restart is planned."
        )
    with _remediation_lock(report, params) as held:
        # Whoever approved (a human, the route or `auto_approve`), the run may have waited:
        # for the approval, or for another run acting on the backend. Measure again, plan
        # again, and act only on what was approved and still holds (a rollback only to the
        # approved revision).
        fresh_found = classify(params, gather(params), datetime.now(UTC))
        fresh = make_plan(params, fresh_found.scenarios, fresh_found.withheld)
        recent = errors_ended(params, found.error_rate)
        acting = [] if recent is not None else still_valid(doable, fresh)
        report.add(
            "Re-measured after approval" if needs_human else "Re-measured under the lock",
            _checks_md(fresh_found.checks)
            + "\n\n"
            + _scenarios_md(fresh_found.scenarios)
            + "\n\n"
            + _plan_md(fresh)
            + f"\n\nApproved and still holding: "
            f"{', '.join(f'{a.scenario} {a.kind}' for a in acting) or 'none'}.",
        )
        if recent is not None:
            return finish(
                "skipped",
                f"the 5xx ratio is now {_pct(recent)} over {params.verify_window} (it was "
                f"{_pct(found.error_rate)} when planned), under {params.error_rate_max:.0%}: "
                f"the errors ended while this run waited ({held.waited_s:.0f} s for the "
                "target lock), another run's remediation or their own end; nothing changed.",
            )
        if not acting:
            return finish(
                "skipped",
                "nothing approved still holds after measuring again under the lock "
                f"(waited {held.waited_s:.0f} s for it): nothing changed.",
            )
        # The run may have waited (approval, another run on the target): the last word.
        stale = alert_resolved(report)
        if stale is not None:
            return finish("skipped", stale)
        records = _act(params, acting, report, held)
        ended = held.release_database()
        if ended:
            report.add("Remediation lock", md_escape(ended))
        # Verified with the target lock still held: a run waiting for it measures the world
        # after this remediation has shown its effect, not halfway through it.
        verify = verify_recovery(params, found.error_rate)
    report.add(
        "Verify",
        f"5xx ratio before **{_pct(found.error_rate)}** -> after **{_pct(verify.after)}** "
        f"({verify.window} window, threshold {verify.threshold:.0%}): "
        + ("**recovered**" if verify.recovered else "**NOT recovered: escalate**")
        + f". {md_escape(verify.reason)}",
    )
    note = f"{len(records)} action(s) taken; " + (
        "the 5xx ratio is back under the threshold."
        if verify.recovered
        else "the 5xx ratio is still high: escalate."
    )
    return finish("acted", note, records=records, verify=verify)


def target_of(params: HighErrorRateParams) -> str:
    """What the runbook changes: the backend Deployment, `k8s:<namespace>/<deployment>`."""
    k8s = KubernetesSettings()
    return kube_lock_target(k8s.namespace, k8s.backend_deployment).key


@dataclass
class HeldLocks:
    """The locks a remediation holds: how long it waited, and the PostgreSQL advisory lock."""

    waited_s: float
    database: AdvisoryLock | None

    def release_database(self) -> str:
        """Release the advisory lock now; a note when its session had ended on purpose."""
        if self.database is None:
            return ""
        done = self.database.release()
        return "" if done == "released" else done


@contextmanager
def _remediation_lock(report: Report, params: HighErrorRateParams) -> Iterator[HeldLocks]:
    """The backend's target lock (`tasks.locks`, waits for another run acting on it), then
    the PostgreSQL advisory lock the other runbooks take.

    When PostgreSQL itself is unreachable (scenario A) the advisory lock cannot be taken:
    the run says so and relies on the target lock alone, rather than never being able to
    restart a dead database. Another run holding the advisory lock refuses (SafetyViolation).
    """
    with ExitStack() as stack:
        target = target_of(params)
        waited = stack.enter_context(target_lock(target, timeout_s=LOCK_TIMEOUT_S))
        report.add("Target lock", f"Held {md_escape(target)} (waited {waited:.1f} s).")
        database: AdvisoryLock | None = None
        try:
            database = stack.enter_context(remediation_lock(RUNBOOK))
        except TransientError as exc:
            report.add(
                "Remediation lock",
                f"not taken, PostgreSQL unreachable ({failure_text(exc)}); relying on the "
                "target lock.",
            )
        yield HeldLocks(waited_s=waited, database=database)


def _act(
    params: HighErrorRateParams, acting: list[PlannedAction], report: Report, held: HeldLocks
) -> list[ActionRecord]:
    records: list[ActionRecord] = []
    for action in acting:
        # The previous values go into the report before the write that replaces them.
        if action.rollback is not None:
            rb = action.rollback
            report.add(
                f"Undo record ({action.scenario})",
                f"{md_escape(action.target)}: revision **{rb.from_revision}**, images "
                f"{md_escape(', '.join(rb.images_before))} (undo: roll back to revision "
                f"{rb.from_revision}).",
            )
            result: RollbackResult = apply_rollback(rb)
            status = wait_for_rollout(
                rb.deployment, rb.namespace, timeout_s=params.rollout_timeout_s
            )
            records.append(
                ActionRecord(
                    scenario=action.scenario,
                    kind=action.kind,
                    target=action.target,
                    before=f"revision {result.from_revision}: {', '.join(result.images_before)}",
                    after=f"revision {status.revision} (template of {result.to_revision}): "
                    f"{', '.join(result.images_after)}",
                    message=f"{result.message}; {status.message}",
                )
            )
        elif action.restart is not None:
            rs = action.restart
            report.add(
                f"Undo record ({action.scenario})",
                f"{md_escape(action.target)}: restartedAt was "
                f"{md_escape(rs.previous_restarted_at or 'never set')}.",
            )
            done: RestartResult = apply_restart(rs)
            status = wait_for_rollout(
                rs.deployment, rs.namespace, timeout_s=params.rollout_timeout_s
            )
            records.append(
                ActionRecord(
                    scenario=action.scenario,
                    kind=action.kind,
                    target=action.target,
                    before=f"restartedAt {rs.previous_restarted_at or 'never'}",
                    after=f"restartedAt {done.restarted_at}",
                    message=f"{done.message}; {status.message}",
                )
            )
        elif action.database is not None:
            sp = action.database
            report.add(
                f"Undo record ({action.scenario})",
                f"{md_escape(action.target)}: restartedAt was "
                f"{md_escape(sp.previous_restarted_at or 'never set')}.",
            )
            if held.database is not None:
                # The advisory lock's session lives on this database: the restart ends it.
                held.database.expect_loss(f"this run's restart of statefulset/{sp.statefulset}")
            sdone: StatefulSetRestartResult = apply_statefulset_restart(sp)
            sstatus = wait_for_statefulset(
                sp.statefulset, sp.namespace, timeout_s=params.rollout_timeout_s
            )
            records.append(
                ActionRecord(
                    scenario=action.scenario,
                    kind=action.kind,
                    target=action.target,
                    before=f"restartedAt {sp.previous_restarted_at or 'never'}",
                    after=f"restartedAt {sdone.restarted_at}",
                    message=f"{sdone.message}; {sstatus.message}",
                )
            )
        elif action.cache is not None:
            cleared = clear_cache(dry_run=False)
            records.append(
                ActionRecord(
                    scenario=action.scenario,
                    kind=action.kind,
                    target=action.target,
                    before=f"{action.cache.matched} key(s) matched when planned",
                    after=f"{cleared.deleted} key(s) removed",
                    message=f"{cleared.method} of {cleared.pattern!r} (no undo: the cache "
                    "refills from the database)",
                )
            )
        report.add(f"Done ({action.scenario})", _actions_md(records[-1:]))
    return records
