"""The evidence of `high-error-rate`, gathered all at once, and the scenarios it supports.

A source that fails is a row `unavailable`, never a crash. Scenario D (code) is dated from
when the current revision became current (`tasks.kubernetes.revisions.became_current`) and
never claimed when the previous revision is the one the current revision rolled back from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import Task
from prefect.futures import PrefectFuture
from pydantic import BaseModel

from flows.common import Unavailable, collect, md_escape
from flows.error_rate.actions import NOT_BACK, ErrorRateAction
from flows.error_rate.params import SCENARIO_NAMES, HighErrorRateParams, Scenario, pct
from flows.spec import Check, Verdict
from tasks.backend import HealthResult, backend_health
from tasks.kubernetes import (
    PodRestarts,
    RevisionInfo,
    RolloutHistory,
    TailLogsResult,
    began_after_rollout,
    began_before_rollout,
    current_and_previous,
    pod_restarts,
    rollout_history,
    tail_logs,
)
from tasks.postgres import ActivityByDbUser, PoolUsage, activity_by_db_user, measure_pool_usage
from tasks.prometheus import (
    RangeResult,
    RouteFigures,
    error_rate_by_route,
    error_rate_queries,
    query_range,
)
from tasks.redis import RedisInfo, redis_info
from tasks.settings import KubernetesSettings, PrometheusSettings

#: The step of the 5xx history read to date the onset; a point every 5 s is plenty.
ONSET_STEP_S = 5.0

# What the sandbox's (and the on-call runbook's) log lines look like:
# `... status=503 ... error="..."`.
_ERROR_LINE = re.compile(r"\bstatus=5\d\d\b|\blevel=error\b", re.IGNORECASE)
_DB_WORDS = re.compile(
    r"psycopg|postgres|database|PoolExhausted|OperationalError|too many connections",
    re.IGNORECASE,
)
_CACHE_WORDS = re.compile(r"redis|cache|JSONDecodeError|UnicodeDecodeError", re.IGNORECASE)

PASS, FAIL = Verdict.PASS, Verdict.FAIL


def _verdict(problem: bool) -> Verdict:
    return FAIL if problem else PASS


class ScenarioVerdict(BaseModel):
    """A scenario that holds, with the figures that say so."""

    scenario: Scenario
    name: str
    evidence: list[str]


@dataclass(frozen=True)
class Probe:
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


def evidence_checks(params: HighErrorRateParams, now: datetime | None = None) -> dict[str, Probe]:
    """Every evidence check of the runbook, by name, with the arguments it runs with."""
    k8s = KubernetesSettings()
    now = now or datetime.now(UTC)
    _, overall = error_rate_queries(PrometheusSettings(), params.window)
    lookback = timedelta(minutes=params.rollout_window_minutes + 10)
    return {
        "logs": Probe(
            tail_logs, (k8s.backend_deployment,), {"lines": params.log_lines, "namespace": None}
        ),
        "health": Probe(backend_health, (), {}),
        "pods": Probe(pod_restarts, (), {}),
        "errors": Probe(error_rate_by_route, (params.window,), {}),
        "history": Probe(
            query_range, (overall, now - lookback), {"end": now, "step_s": ONSET_STEP_S}
        ),
        "activity": Probe(activity_by_db_user, (), {}),
        "pool": Probe(measure_pool_usage, (), {}),
        "redis": Probe(redis_info, (params.redis_window_s,), {}),
        "rollout": Probe(rollout_history, (k8s.backend_deployment, k8s.namespace), {}),
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


@dataclass
class Findings:
    """The evidence table and the scenarios it supports."""

    checks: list[Check]
    scenarios: list[ScenarioVerdict]
    error_rate: float | None
    onset: datetime | None
    #: Actions the evidence rules out, with why (shown in the plan as not possible).
    withheld: list[ErrorRateAction] = field(default_factory=list)


@dataclass
class _Sheet:
    """What `classify` builds: the rows, the evidence per scenario, the withheld actions."""

    params: HighErrorRateParams
    now: datetime
    rows: list[Check] = field(default_factory=list)
    evidence: dict[Scenario, list[str]] = field(
        default_factory=lambda: {"A": [], "B": [], "C": [], "D": []}
    )
    withheld: list[ErrorRateAction] = field(default_factory=list)

    def row(self, item: str, observed: str, verdict: Verdict, **kw: str) -> None:
        self.rows.append(Check(item=item, observed=observed, verdict=verdict, **kw))

    def unavailable(self, item: str, u: Unavailable) -> None:
        self.row(item, "-", Verdict.UNAVAILABLE, detail=u.reason)


def classify(params: HighErrorRateParams, got: dict[str, Any], now: datetime) -> Findings:
    """Turn the checks' results into rows with verdicts, and the scenarios they support."""
    sheet = _Sheet(params, now)
    _logs_evidence(sheet, got["logs"])
    _health_evidence(sheet, got["health"])
    pods = got["pods"]
    if isinstance(pods, Unavailable):
        sheet.unavailable("pods (restarts, OOMKilled)", pods)
    else:
        _pods_evidence(sheet, pods)
    ratio = _errors_evidence(sheet, got["errors"])
    onset = _onset_evidence(sheet, got["history"])
    _db_evidence(sheet, got["pool"], got["activity"])
    _redis_evidence(sheet, got["redis"])
    _rollout_evidence(sheet, got["rollout"], onset, ratio)
    scenarios = [
        ScenarioVerdict(scenario=key, name=SCENARIO_NAMES[key], evidence=found)
        for key, found in sheet.evidence.items()
        if found
    ]
    return Findings(
        checks=sheet.rows,
        scenarios=scenarios,
        error_rate=ratio,
        onset=onset,
        withheld=sheet.withheld,
    )


def scenarios_md(scenarios: list[ScenarioVerdict]) -> str:
    """The scenarios that hold, each with its figures."""
    if not scenarios:
        return "_No scenario is supported by the evidence._"
    return "\n".join(
        f"- **{s.scenario}, {md_escape(s.name)}**: " + "; ".join(md_escape(e) for e in s.evidence)
        for s in scenarios
    )


def _logs_evidence(sheet: _Sheet, logs: TailLogsResult | Unavailable) -> None:
    if isinstance(logs, Unavailable):
        sheet.unavailable("backend logs (tail)", logs)
        return
    n = count_log_errors(logs)
    sheet.row(
        "backend logs (tail)",
        f"{n.errors} of {n.lines} line(s) are 5xx/errors "
        f"({n.database} name the database, {n.cache} the cache)",
        _verdict(n.errors > 0),
        detail=n.sample,
    )
    if n.database:
        sheet.evidence["A"].append(f"{n.database} error line(s) in the logs name the database")
    if n.cache:
        sheet.evidence["C"].append(f"{n.cache} error line(s) in the logs name the cache")


def _health_evidence(sheet: _Sheet, health: HealthResult | Unavailable) -> None:
    if isinstance(health, Unavailable):
        sheet.unavailable("backend health", health)
        return
    sheet.row(
        "backend health",
        f"HTTP {health.status_code} in {health.timings.total_ms:.0f} ms",
        _verdict(not health.ok),
        detail=health.summary,
    )
    if "database" in health.failing_checks:
        sheet.evidence["A"].append(f"health says the database check fails ({health.summary})")
    if "redis" in health.failing_checks:
        sheet.evidence["C"].append(f"health says the Redis check fails ({health.summary})")


def _pods_evidence(sheet: _Sheet, pods: list[PodRestarts]) -> None:
    params = sheet.params
    recent = sheet.now - timedelta(minutes=params.oom_window_minutes)
    restarts = sum(p.restarts for p in pods)
    oom = [
        f"{p.pod}/{c.container}"
        for p in pods
        for c in p.containers
        if c.oom_killed and (c.last_finished_at is None or c.last_finished_at >= recent)
    ]
    waiting = sorted({c.waiting_reason for p in pods for c in p.containers if c.waiting_reason})
    sheet.row(
        "pods (restarts, OOMKilled)",
        f"{len(pods)} pod(s), {restarts} restart(s), {len(oom)} OOMKilled",
        _verdict(bool(oom) or restarts >= params.restart_threshold),
        threshold=f"{params.restart_threshold} restarts; OOMKilled",
        detail=", ".join(oom[:5] + waiting),
    )
    found = sheet.evidence["B"]
    if oom:
        found.append(
            f"{len(oom)} container(s) OOMKilled in the last {params.oom_window_minutes:g} min: "
            + ", ".join(oom[:5])
        )
    if restarts >= params.restart_threshold:
        found.append(f"{restarts} container restart(s) >= {params.restart_threshold}")


def _errors_evidence(sheet: _Sheet, errors: RouteFigures | Unavailable) -> float | None:
    """The 5xx ratio by route; the overall ratio (None: not measured)."""
    params = sheet.params
    item = f"5xx ratio by route ({params.window})"
    if isinstance(errors, Unavailable):
        sheet.unavailable(item, errors)
        return None
    if not errors.configured:
        sheet.row(
            item,
            "-",
            Verdict.NOT_CONFIGURED,
            detail="Prometheus not configured (RUNBOOKS_PROMETHEUS_URL)",
        )
        return None
    ratio = errors.overall
    worst = sorted(
        ((r, v) for r, v in errors.by_route.items() if v is not None), key=lambda x: -x[1]
    )[:4]
    sheet.row(
        item,
        f"overall {pct(ratio)}",
        _verdict((ratio or 0) > params.error_rate_max),
        threshold=f"{params.error_rate_max:.0%}",
        detail=", ".join(f"{r}: {v:.1%}" for r, v in worst),
    )
    return ratio


def _onset_evidence(sheet: _Sheet, history: RangeResult | Unavailable) -> datetime | None:
    """When the current run of 5xx above the threshold began (None: not above, unknown)."""
    limit = sheet.params.error_rate_max
    if isinstance(history, Unavailable):
        sheet.unavailable("5xx onset", history)
        return None
    if not history.configured:
        return None
    onset = error_onset(history, limit)
    since = f"since {_ago(onset, sheet.now)}" if onset else "now"
    sheet.row(
        "5xx onset",
        f"above {limit:.0%} {since}" if onset else f"not above {limit:.0%} {since}",
        _verdict(onset is not None),
        detail=f"{ONSET_STEP_S:g} s steps since {history.start:%H:%M:%S} UTC"
        if history.start
        else "",
    )
    return onset


def _db_evidence(
    sheet: _Sheet, pool: PoolUsage | Unavailable, activity: ActivityByDbUser | Unavailable
) -> None:
    params, found = sheet.params, sheet.evidence["A"]
    if isinstance(pool, Unavailable):
        sheet.unavailable("PostgreSQL connections", pool)
        if "TransientError" in pool.reason:
            found.append(f"PostgreSQL unreachable ({pool.reason})")
    else:
        high = pool.percent_used >= params.pool_usage_max_percent
        sheet.row(
            "PostgreSQL connections",
            f"{pool.client_connections}/{pool.max_connections} ({pool.percent_used:.1f} %)",
            _verdict(high),
            threshold=f"{params.pool_usage_max_percent:g} %",
        )
        if high:
            found.append(
                f"connection usage {pool.percent_used:.1f} % >= "
                f"{params.pool_usage_max_percent:g} % ({pool.client_connections}/"
                f"{pool.max_connections})"
            )
    if isinstance(activity, Unavailable):
        sheet.unavailable("PostgreSQL activity by database/role", activity)
        return
    waiting = sum(g.waiting for g in activity.groups)
    iit = sum(g.idle_in_transaction for g in activity.groups)
    sheet.row(
        "PostgreSQL activity by database/role",
        f"{activity.total} connection(s); {waiting} waiting on locks, {iit} idle in transaction",
        PASS,
        detail=", ".join(f"{g.datname}/{g.usename}: {g.count}" for g in activity.groups[:3]),
    )


def _redis_evidence(sheet: _Sheet, info: RedisInfo | Unavailable) -> None:
    params, found = sheet.params, sheet.evidence["C"]
    if isinstance(info, Unavailable):
        sheet.unavailable("Redis", info)
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
    memory = (
        f"memory {info.memory_ratio:.1%} of maxmemory"
        if info.memory_ratio is not None
        else f"memory {info.used_memory_human or info.used_memory} (no maxmemory)"
    )
    sheet.row(
        "Redis",
        f"{memory}; hit rate {pct(rate if rate is not None else info.hit_rate)}; "
        f"evicted {info.evicted_keys}",
        _verdict(bool(problems)),
        detail="; ".join(problems) or f"policy {info.maxmemory_policy}",
    )
    found.extend(problems)


def _rollout_evidence(
    sheet: _Sheet,
    history: RolloutHistory | Unavailable,
    onset: datetime | None,
    ratio: float | None,
) -> None:
    if isinstance(history, Unavailable):
        sheet.unavailable("rollout history", history)
        return
    latest, prev = current_and_previous(history.revisions)
    if latest is None:
        sheet.row(
            "rollout history",
            f"revision {history.current_revision}",
            Verdict.UNAVAILABLE,
            detail="no ReplicaSet matches the current template",
        )
        return
    params = sheet.params
    # Dated from when the revision became current, not from its ReplicaSet's creation: an
    # undo re-uses the old ReplicaSet, whose creation time is the old release's.
    since = latest.became_current
    began_after = began_after_rollout(
        onset, since, timedelta(minutes=params.rollout_window_minutes)
    )
    above = (ratio or 0) > params.error_rate_max
    suspect = began_after and prev is not None and above
    sheet.row(
        "rollout history",
        _revision_figure(latest, sheet.now),
        _verdict(suspect),
        detail=_rollout_detail(history, latest, prev, onset),
    )
    undone = history.undone  # computed from the same revisions: its revision is `prev`'s
    if undone is not None and above:
        # D is not claimed: its only action would go back to the release just undone.
        sheet.withheld.append(
            ErrorRateAction(
                scenario="D",
                kind="rollback",
                target=f"deployment/{history.deployment} in {history.namespace}",
                summary=f"not planned (D not claimed): {undone.describe()}; {NOT_BACK}",
                possible=False,
            )
        )
        return
    if suspect:
        assert onset is not None and since is not None and prev is not None
        sheet.evidence["D"].append(
            f"5xx at {pct(ratio)} since {onset:%H:%M:%S} UTC, "
            f"{(onset - since).total_seconds():.0f} s after revision {latest.revision} "
            f"({', '.join(latest.images)}) became current at {since:%H:%M:%S} UTC "
            f"(within {params.rollout_window_minutes:g} min); previous revision "
            f"{prev.revision} ({', '.join(prev.images)})"
        )


def _revision_figure(latest: RevisionInfo, now: datetime) -> str:
    since = latest.became_current
    figure = f"revision {latest.revision} ({', '.join(latest.images)})" + (
        f" current since {_ago(since, now)}" if since else " (when it became current: unknown)"
    )
    if latest.earlier_revisions:
        figure += f", an undo (it was revision {max(latest.earlier_revisions)} before)"
    return figure


def _rollout_detail(
    history: RolloutHistory,
    latest: RevisionInfo,
    prev: RevisionInfo | None,
    onset: datetime | None,
) -> str:
    """The previous revision (or why it is no target); table cells keep 200 characters, so
    the reason comes first."""
    undone = history.undone
    if undone is not None:
        details = [f"{undone.describe()}; {NOT_BACK}"]
    elif prev is not None:
        details = [f"previous: revision {prev.revision} ({', '.join(prev.images)})"]
    else:
        details = ["no previous revision"]
    since = latest.became_current
    if began_before_rollout(onset, since):
        assert onset is not None
        details.append(f"5xx since {onset:%H:%M:%S} UTC, before revision {latest.revision}")
    return "; ".join(details)
