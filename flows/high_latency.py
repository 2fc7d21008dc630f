"""Runbook `high-latency`: the on-call runbook's "High Response Time" checklist, and its quick wins.

What it may change: nothing, apart from one action: clearing the Redis cache keys matching
the configured pattern (`RUNBOOKS_REDIS_CACHE_KEY_PATTERN`, SCAN + UNLINK, never FLUSHALL).
That clear (approval `always`) needs `dry_run=False` AND a human approval in the UI, on every
run, whatever the alert route or `auto_approve` says (its route's `mode: auto` only lets the
read-only part run unattended).
Safety limits: the checks only read; after the approval the cache is measured again under
the lock and only cleared if there is still something to clear. Undo: none needed, the
cache refills from the database (expect a short burst of database reads).
Verify: after a clear, p95 is measured again (the checklist's query); still above
`p95_max_s`, or no longer measurable when it was before: escalated (high, platform), the
run fails.

Checks run concurrently; a dependency that fails is a row "unavailable: <reason>", never a
crash of the run. The artifact holds the checklist, the quick wins and what was done.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from prefect import get_run_logger
from prefect.futures import PrefectFuture
from pydantic import BaseModel, Field

from flows.cache_clear import CacheClear
from flows.common import Report, Unavailable, collect, md_escape, table
from flows.driver import Runbook, RunResult, Stop, Verification, checks_md, drive
from flows.spec import (
    Action,
    ActionRecord,
    ApprovalPolicy,
    Check,
    LockTarget,
    Outcome,
    RunbookParams,
    RunbookSpec,
    Verdict,
    runbook_flow,
)
from tasks.backend import CompressionResult, compression_check
from tasks.errors import RunbookError, SafetyViolation
from tasks.kubernetes.metrics import PodMetrics, pod_metrics
from tasks.locks import redis_lock_target
from tasks.network import ConnectTime, dependency_addresses, tcp_connect_times
from tasks.postgres import (
    SeqScanReport,
    StatementStat,
    TopStatements,
    n_plus_one_suspects,
    seq_scan_tables,
    top_statements,
)
from tasks.prometheus import (
    QueryResult,
    RouteFigures,
    latency_quantile_by_route,
    pod_cpu_query,
    pod_memory_query,
    query_instant,
    request_rate,
    requests_total_query,
)
from tasks.redis import CacheClearResult, RedisInfo, clear_cache, redis_info
from tasks.settings import PrometheusSettings, RedisSettings

RUNBOOK = "high-latency"


class HighLatencyParams(RunbookParams):
    """Thresholds of the checklist, and whether the one action (a cache clear) is proposed."""

    window: str = Field("5m", pattern=r"^[1-9][0-9]{0,3}[smh]$", description="Prometheus window.")
    p95_max_s: float = Field(
        1.0, ge=0.01, le=600, description="p95 above this fails (seconds), before and after."
    )
    slow_query_mean_ms: float = Field(
        100.0, ge=1, le=600_000, description="A statement slower than this on average fails."
    )
    hit_rate_min: float = Field(
        0.8, ge=0, le=1, description="Redis hit rate below this fails (0..1)."
    )
    redis_memory_max: float = Field(
        0.9, gt=0, le=1, description="Redis used/maxmemory above this fails (0..1)."
    )
    connect_ms_max: float = Field(
        50.0, ge=0.1, le=10_000, description="A TCP connect slower than this fails (ms)."
    )
    pod_cpu_max_cores: float = Field(
        1.0, gt=0, le=256, description="A pod using more CPU than this fails (cores)."
    )
    n_plus_one_factor: float = Field(
        10.0, ge=2, le=10_000, description="Statements called this many times per request."
    )
    clear_cache: bool = Field(
        False, description="Propose the cache clear even when hit rate and memory look fine."
    )


def target_of(params: HighLatencyParams) -> str:
    """What the runbook may change: the cache, `redis:<host:port>/<db>`."""
    return redis_lock_target(RedisSettings()).key


SPEC: RunbookSpec[HighLatencyParams] = RunbookSpec(
    name=RUNBOOK,
    title="High response time",
    severity="high",
    topic="platform",
    lock=lambda p: LockTarget(target_of(p)),
)


class QuickWin(BaseModel):
    """A quick win with the evidence behind it."""

    kind: Literal["n+1", "index", "compression", "cache"]
    evidence: str
    suggestion: str


class LatencyVerification(Verification):
    """p95 after the cache clear, next to the p95 the checklist saw before it."""

    before: Check
    after: Check


class HighLatencyOutcome(BaseModel):
    """What the run found and did."""

    checks: list[Check]
    quick_wins: list[QuickWin]
    outcome: Outcome
    note: str
    cache_plan: CacheClearResult | None = None
    cache_result: CacheClearResult | None = None
    verification: LatencyVerification | None = None


@dataclass(frozen=True)
class Findings:
    """The checklist, the quick wins, and the cache clear they call for (if any)."""

    checks: list[Check]
    wins: list[QuickWin]
    #: The checklist's p95 figures: the "before" of the verification.
    p95: RouteFigures | Unavailable
    #: A cache quick win (evidence, or `clear_cache` asked for it).
    cache_wanted: bool
    cache_evidence: str = ""
    #: The keys a clear would remove now (a dry-run count), or why they could not be counted.
    cache_plan: CacheClearResult | None = None
    cache_error: str | None = None


def _fmt(value: float | None, unit: str, digits: int = 3) -> str:
    return "no data" if value is None else f"{value:.{digits}g} {unit}".strip()


def _unavailable(item: str, threshold: str, u: Unavailable) -> Check:
    return Check(
        item=item, observed="-", threshold=threshold, verdict=Verdict.UNAVAILABLE, detail=u.reason
    )


def _not_configured(item: str, threshold: str) -> Check:
    return Check(
        item=item,
        observed="-",
        threshold=threshold,
        verdict=Verdict.NOT_CONFIGURED,
        detail="Prometheus not configured (RUNBOOKS_PROMETHEUS_URL)",
    )


def _load_row(rate: RouteFigures | Unavailable) -> Check:
    item, threshold = "load (req/s, /api)", "figure only"
    if isinstance(rate, Unavailable):
        return _unavailable(item, threshold, rate)
    if not rate.configured:
        return _not_configured(item, threshold)
    busiest = sorted(
        ((r, v) for r, v in rate.by_route.items() if v is not None), key=lambda x: -x[1]
    )[:3]
    detail = ", ".join(f"{r}: {v:.3g}/s" for r, v in busiest)
    if rate.overall is None:
        return Check(
            item=item,
            observed="no data",
            threshold=threshold,
            verdict=Verdict.UNAVAILABLE,
            detail="no /api requests in the window",
        )
    return Check(
        item=item,
        observed=f"{rate.overall:.3g} req/s over {rate.window}",
        threshold=threshold,
        verdict=Verdict.PASS,
        detail=detail,
    )


def _p95_row(p95: RouteFigures | Unavailable, max_s: float) -> Check:
    item, threshold = "p95 by route", f"<= {max_s:g} s"
    if isinstance(p95, Unavailable):
        return _unavailable(item, threshold, p95)
    if not p95.configured:
        return _not_configured(item, threshold)
    known = {r: v for r, v in p95.by_route.items() if v is not None}
    if p95.overall is None and not known:
        return Check(
            item=item,
            observed="no data",
            threshold=threshold,
            verdict=Verdict.UNAVAILABLE,
            detail="no /api requests in the window",
        )
    slow = {r: v for r, v in known.items() if v > max_s}
    worst = max(known.items(), key=lambda x: x[1]) if known else None
    detail = ", ".join(f"{r}: {v:.3g} s" for r, v in sorted(slow.items(), key=lambda x: -x[1]))
    return Check(
        item=item,
        observed=f"overall {_fmt(p95.overall, 's')}"
        + (f"; worst {worst[0]} {worst[1]:.3g} s" if worst else ""),
        threshold=threshold,
        verdict=Verdict.FAIL if slow or (p95.overall or 0) > max_s else Verdict.PASS,
        detail=f"over the threshold: {detail}" if detail else "",
    )


def _slow_row(stats: TopStatements | Unavailable, mean_ms: float) -> Check:
    item, threshold = "slow queries (pg_stat_statements, by mean)", f"mean <= {mean_ms:g} ms"
    if isinstance(stats, Unavailable):
        return _unavailable(item, threshold, stats)
    if stats.status != "ok":
        return Check(
            item=item,
            observed="-",
            threshold=threshold,
            verdict=_statements_verdict(stats),
            detail=f"{stats.status}: {stats.detail}",
        )
    if not stats.by_mean:
        return Check(item=item, observed="no statements", threshold=threshold, verdict=Verdict.PASS)
    top = stats.by_mean[0]
    slow = [s for s in stats.by_mean if s.mean_ms > mean_ms]
    return Check(
        item=item,
        observed=f"slowest mean {top.mean_ms:.1f} ms over {top.calls} call(s)",
        threshold=threshold,
        verdict=Verdict.FAIL if slow else Verdict.PASS,
        detail=top.query[:120],
    )


def _hit_rate_row(info: RedisInfo | Unavailable, minimum: float) -> Check:
    item, threshold = "cache hit rate (Redis)", f">= {minimum:.0%}"
    if isinstance(info, Unavailable):
        return _unavailable(item, threshold, info)
    rate = info.window_hit_rate if info.window_hit_rate is not None else info.hit_rate
    scope = f"last {info.window_s:g} s" if info.window_hit_rate is not None else "since start"
    if rate is None:
        return Check(
            item=item,
            observed="no reads",
            threshold=threshold,
            verdict=Verdict.UNAVAILABLE,
            detail="no cache reads counted yet",
        )
    return Check(
        item=item,
        observed=f"{rate:.1%} ({scope})",
        threshold=threshold,
        verdict=Verdict.PASS if rate >= minimum else Verdict.FAIL,
        detail=f"hits {info.keyspace_hits}, misses {info.keyspace_misses}, "
        f"evicted {info.evicted_keys}",
    )


def _memory_row(info: RedisInfo | Unavailable, maximum: float) -> Check:
    item, threshold = "Redis memory vs maxmemory", f"<= {maximum:.0%}"
    if isinstance(info, Unavailable):
        return _unavailable(item, threshold, info)
    if info.memory_ratio is None:
        return Check(
            item=item,
            observed=f"{info.used_memory_human or info.used_memory} used",
            threshold=threshold,
            verdict=Verdict.NOT_CONFIGURED,
            detail="no maxmemory set: no ceiling to compare with",
        )
    return Check(
        item=item,
        observed=f"{info.memory_ratio:.1%} ({info.used_memory} of {info.maxmemory} bytes)",
        threshold=threshold,
        verdict=Verdict.PASS if info.memory_ratio <= maximum else Verdict.FAIL,
        detail=f"policy {info.maxmemory_policy}",
    )


def _network_rows(
    times: list[ConnectTime] | Unavailable, wanted: dict[str, tuple[str, int]], max_ms: float
) -> list[Check]:
    threshold = f"<= {max_ms:g} ms"
    if isinstance(times, Unavailable):
        return [_unavailable("network latency (TCP connect)", threshold, times)]
    rows = []
    for t in times:
        item = f"network latency: {t.name} ({t.host}:{t.port})"
        if t.median_ms is None:
            rows.append(
                Check(
                    item=item,
                    observed="no connection",
                    threshold=threshold,
                    verdict=Verdict.UNAVAILABLE,
                    detail=f"{t.failures}/{t.attempts} connects failed ({t.error})",
                )
            )
            continue
        rows.append(
            Check(
                item=item,
                observed=f"median {t.median_ms:.2f} ms (max {_fmt(t.max_ms, 'ms')})",
                threshold=threshold,
                verdict=Verdict.PASS if t.median_ms <= max_ms and not t.failures else Verdict.FAIL,
                detail=f"{t.failures}/{t.attempts} failed" if t.failures else "",
            )
        )
    for name in ("backend", "postgres", "redis"):
        if name not in wanted:
            rows.append(
                Check(
                    item=f"network latency: {name}",
                    observed="-",
                    threshold=threshold,
                    verdict=Verdict.NOT_CONFIGURED,
                    detail="no TCP host:port in its settings",
                )
            )
    return rows


def _pods_row(
    metrics: PodMetrics | Unavailable,
    cpu: QueryResult | Unavailable,
    mem: QueryResult | Unavailable,
    max_cores: float,
) -> Check:
    item, threshold = "pod CPU/memory", f"CPU <= {max_cores:g} cores per pod"
    if isinstance(metrics, PodMetrics) and metrics.available and metrics.pods:
        worst = max(metrics.pods, key=lambda p: p.cpu_cores)
        heaviest = max(metrics.pods, key=lambda p: p.memory_bytes)
        return Check(
            item=item,
            observed=f"max CPU {worst.cpu_cores:.3g} cores ({worst.pod}); "
            f"max memory {heaviest.memory_bytes / 2**20:.0f} MiB ({heaviest.pod})",
            threshold=threshold,
            verdict=Verdict.PASS if worst.cpu_cores <= max_cores else Verdict.FAIL,
            detail=f"metrics.k8s.io, {len(metrics.pods)} pod(s)",
        )
    why_api = (
        metrics.reason
        if isinstance(metrics, Unavailable)
        else (metrics.detail or "no pods matched")
    )
    cpu_samples = (
        [s for s in cpu.samples if s.value is not None] if isinstance(cpu, QueryResult) else []
    )
    mem_samples = (
        [s for s in mem.samples if s.value is not None] if isinstance(mem, QueryResult) else []
    )
    if cpu_samples:
        worst_cpu = max(cpu_samples, key=lambda s: s.value or 0.0)
        worst_mem = max(mem_samples, key=lambda s: s.value or 0.0) if mem_samples else None
        cores = worst_cpu.value or 0.0
        return Check(
            item=item,
            observed=f"max CPU {cores:.3g} cores ({worst_cpu.labels.get('pod', '?')})"
            + (
                f"; max memory {(worst_mem.value or 0) / 2**20:.0f} MiB "
                f"({worst_mem.labels.get('pod', '?')})"
                if worst_mem
                else ""
            ),
            threshold=threshold,
            verdict=Verdict.PASS if cores <= max_cores else Verdict.FAIL,
            detail=f"Prometheus container metrics (metrics.k8s.io: {why_api})",
        )
    if isinstance(cpu, Unavailable):
        why_prom = cpu.reason
    elif not cpu.configured:
        why_prom = "not configured"
    else:
        why_prom = "no container_cpu_usage_seconds_total series"
    return Check(
        item=item,
        observed="-",
        threshold=threshold,
        verdict=Verdict.UNAVAILABLE,
        detail=f"metrics.k8s.io: {why_api}; Prometheus: {why_prom}",
    )


def _total_requests(total: QueryResult | Unavailable) -> float | None:
    if isinstance(total, Unavailable) or not total.configured or not total.samples:
        return None
    return total.samples[0].value


def _quick_wins(
    params: HighLatencyParams,
    stats: TopStatements | Unavailable,
    requests: float | None,
    seq: SeqScanReport | Unavailable,
    gzip: CompressionResult | Unavailable,
    info: RedisInfo | Unavailable,
) -> tuple[list[QuickWin], list[str]]:
    """Quick wins backed by evidence, and notes on those that could not be judged."""
    wins: list[QuickWin] = []
    notes: list[str] = []
    if isinstance(stats, TopStatements) and stats.status == "ok" and requests:
        suspects: list[StatementStat] = n_plus_one_suspects(
            stats, requests, params.n_plus_one_factor
        )
        for s in suspects:
            wins.append(
                QuickWin(
                    kind="n+1",
                    evidence=f"{s.calls} calls for {requests:.0f} /api requests "
                    f"= {s.calls / requests:.1f} per request: {s.query[:120]}",
                    suggestion="load these rows in one query (JOIN / WHERE id = ANY(...))",
                )
            )
    else:
        notes.append("N+1: not judged (needs pg_stat_statements and the Prometheus request count)")
    if isinstance(seq, SeqScanReport):
        for t in seq.tables:
            wins.append(
                QuickWin(
                    kind="index",
                    evidence=f"{t.schema_name}.{t.table}: {t.seq_scan} seq scans, "
                    f"{t.seq_tup_read} rows read, {t.n_live_tup} live rows"
                    + (
                        f"; filtered on {', '.join(t.candidate_columns)}"
                        if t.candidate_columns
                        else ""
                    ),
                    suggestion=t.suggestion,
                )
            )
    else:
        notes.append(f"index candidates: not judged ({seq.reason})")
    if isinstance(gzip, CompressionResult):
        if not gzip.compressed and gzip.status_code < 400:
            wins.append(
                QuickWin(
                    kind="compression",
                    evidence=f"{gzip.url} answered {gzip.body_bytes} bytes uncompressed to "
                    "Accept-Encoding: gzip",
                    suggestion="turn response compression on (gzip middleware / ingress)",
                )
            )
    else:
        notes.append(f"compression: not judged ({gzip.reason})")
    if isinstance(info, RedisInfo):
        evidence = _cache_evidence(params, info)
        if evidence or params.clear_cache:
            wins.append(
                QuickWin(
                    kind="cache",
                    evidence=evidence or "asked for by the run's parameters (clear_cache)",
                    suggestion="clear the cache keys matching the configured pattern "
                    "(needs dry_run off and an approval)",
                )
            )
    else:
        notes.append(f"cache: not judged ({info.reason})")
    return wins, notes


def _cache_evidence(params: HighLatencyParams, info: RedisInfo) -> str:
    rate = info.window_hit_rate if info.window_hit_rate is not None else info.hit_rate
    parts = []
    if rate is not None and rate < params.hit_rate_min:
        parts.append(f"hit rate {rate:.1%} < {params.hit_rate_min:.0%}")
    if info.memory_ratio is not None and info.memory_ratio > params.redis_memory_max:
        parts.append(f"memory {info.memory_ratio:.1%} of maxmemory > {params.redis_memory_max:.0%}")
    return "; ".join(parts)


def _wins_md(wins: list[QuickWin], notes: list[str]) -> str:
    body = table(
        ["quick win", "evidence", "suggestion"],
        [[w.kind, w.evidence, w.suggestion] for w in wins],
    )
    if notes:
        body += "\n\n" + "\n".join(f"- {md_escape(n)}" for n in notes)
    return body


def _clear_md(result: CacheClearResult) -> str:
    sample = ", ".join(result.sample_keys[:5])
    verb = "would be removed" if result.dry_run else "removed"
    return (
        f"Pattern `{md_escape(result.pattern)}` on {md_escape(result.target)} "
        f"({result.method}): **{result.matched}** key(s) match, **{result.deleted}** {verb}"
        + (f" (dry run: {result.matched})" if result.dry_run else "")
        + (f".\n\nSample: {md_escape(sample)}" if sample else ".")
    )


def _statements_verdict(stats: TopStatements) -> Verdict:
    """pg_stat_statements not installed is not configured; not allowed to read it, unavailable."""
    if stats.status in ("extension_missing", "not_preloaded"):
        return Verdict.NOT_CONFIGURED
    return Verdict.UNAVAILABLE


def _gather(params: HighLatencyParams) -> tuple[dict[str, Any], dict[str, tuple[str, int]]]:
    """Every read of the checklist at once: the slowest sets the time, one down is one row."""
    targets = dependency_addresses()
    futures: dict[str, PrefectFuture[Any]] = {
        "rate": request_rate.submit(params.window),
        "p95": latency_quantile_by_route.submit(0.95, params.window),
        "total": query_instant.submit(requests_total_query(PrometheusSettings())),
        "stats": top_statements.submit(20),
        "seq": seq_scan_tables.submit(),
        "info": redis_info.submit(),
        "net": tcp_connect_times.submit(targets),
        "pods": pod_metrics.submit(),
        "cpu": query_instant.submit(pod_cpu_query()),
        "mem": query_instant.submit(pod_memory_query()),
        "gzip": compression_check.submit(),
    }
    return {name: collect(fut) for name, fut in futures.items()}, targets


def _checklist(
    params: HighLatencyParams, got: dict[str, Any], targets: dict[str, tuple[str, int]]
) -> list[Check]:
    return [
        _load_row(got["rate"]),
        _p95_row(got["p95"], params.p95_max_s),
        _slow_row(got["stats"], params.slow_query_mean_ms),
        _hit_rate_row(got["info"], params.hit_rate_min),
        _memory_row(got["info"], params.redis_memory_max),
        *_network_rows(got["net"], targets, params.connect_ms_max),
        _pods_row(got["pods"], got["cpu"], got["mem"], params.pod_cpu_max_cores),
    ]


def _count_keys() -> tuple[CacheClearResult | None, str | None]:
    """The keys a clear would remove now (SCAN, a dry run), or why they cannot be counted."""
    try:
        return clear_cache(dry_run=True), None
    except RunbookError as exc:  # a guard or Redis said no: the plan is refused, not raised
        return None, f"{type(exc).__name__}: {str(exc)[:500]}"
    except Exception as exc:  # noqa: BLE001 - a library's text may quote anything: type only
        return None, f"{type(exc).__name__} (details in the run's logs)"


class ClearCache(CacheClear):
    """The cache clear, asked of a human on every run whatever the route or auto_approve say."""

    approval: ApprovalPolicy = "always"


class HighLatency(Runbook[HighLatencyParams, Findings]):
    """The checklist and quick wins; the cache clear; p95 again after it."""

    spec = SPEC

    def __init__(self) -> None:
        self.first: Findings | None = None

    def check(self, params: HighLatencyParams, report: Report) -> Findings:
        got, targets = _gather(params)
        checks = _checklist(params, got, targets)
        report.add("Checklist", checks_md(checks))
        wins, notes = _quick_wins(
            params,
            got["stats"],
            _total_requests(got["total"]),
            got["seq"],
            got["gzip"],
            got["info"],
        )
        report.add("Quick wins", _wins_md(wins, notes))
        failed = [c.item for c in checks if c.verdict == Verdict.FAIL]
        get_run_logger().info(
            "%d check(s) failed: %s; %d quick win(s)", len(failed), failed, len(wins)
        )
        info = got["info"]
        found = Findings(
            checks=checks,
            wins=wins,
            p95=got["p95"],
            cache_wanted=any(w.kind == "cache" for w in wins),
            cache_evidence=_cache_evidence(params, info) if isinstance(info, RedisInfo) else "",
        )
        if found.cache_wanted:
            plan, error = _count_keys()
            found = replace(found, cache_plan=plan, cache_error=error)
            if plan is not None:
                report.add("Cache clear plan", _clear_md(plan))
        self.first = found
        return found

    def remeasure(self, params: HighLatencyParams, report: Report) -> Findings:
        """The cache again (its evidence and the keys a clear would remove); the rest stands."""
        assert self.first is not None, "remeasure before check"
        evidence = _cache_evidence(params, redis_info())
        plan, error = _count_keys()
        report.add(
            "Re-measured after approval",
            (_clear_md(plan) if plan else f"Keys not counted: {md_escape(error or '?')}")
            + f"\n\nEvidence now: {md_escape(evidence or 'none')}.",
        )
        return replace(
            self.first,
            cache_wanted=bool(evidence) or params.clear_cache,
            cache_evidence=evidence,
            cache_plan=plan,
            cache_error=error,
        )

    def plan(self, params: HighLatencyParams, findings: Findings) -> list[Action]:
        if not findings.cache_wanted:
            return []
        if findings.cache_plan is None:
            # The guard (no pattern, a pattern matching everything) or Redis said no.
            raise SafetyViolation(f"cache clear not planned: {findings.cache_error}")
        if findings.cache_plan.matched == 0:
            return []  # an empty plan asks nobody: there is nothing to approve
        plan = findings.cache_plan
        return [
            ClearCache(
                target=target_of(params),
                summary=f"UNLINK {plan.matched} key(s) matching {plan.pattern!r}",
                planned=plan,
            )
        ]

    def still_valid(
        self,
        params: HighLatencyParams,
        approved: list[Action],
        fresh: list[Action],
        findings: Findings,
        now: Findings,
    ) -> list[Action] | Stop:
        if not now.cache_wanted:
            return Stop("skipped", "the evidence for a clear is gone: nothing changed.")
        if now.cache_plan is not None and now.cache_plan.matched == 0:
            return Stop("skipped", "no key matches the pattern any more: nothing changed.")
        return super().still_valid(params, approved, fresh, findings, now)

    def verify(
        self,
        params: HighLatencyParams,
        findings: Findings,
        records: list[ActionRecord],
        report: Report,
    ) -> LatencyVerification | None:
        """After a clear: p95 again, the checklist's query; nothing cleared, nothing to verify."""
        if not records:
            return None
        try:
            after: RouteFigures | Unavailable = latency_quantile_by_route(0.95, params.window)
        except Exception as exc:  # noqa: BLE001 - unmeasurable is a verdict, not a crash
            after = Unavailable(
                f"{type(exc).__name__}: {str(exc)[:300]}"
                if isinstance(exc, RunbookError)
                else type(exc).__name__
            )
        verification = _judge_p95(
            _p95_row(findings.p95, params.p95_max_s), _p95_row(after, params.p95_max_s)
        )
        report.add(
            "Verify",
            checks_md([verification.before, verification.after])
            + f"\n\n{md_escape(verification.summary)}",
        )
        return verification


_MEASURED = (Verdict.PASS, Verdict.FAIL)


def _judge_p95(before: Check, after: Check) -> LatencyVerification:
    """Fixed when p95 is within the threshold after the clear. Not measurable after it: not
    fixed when it was measured before (calling that fixed would hide a failure we cannot
    see); healthy, saying so, only when it could not be measured before either."""
    before = before.model_copy(update={"item": "p95 by route, before the clear"})
    after = after.model_copy(update={"item": "p95 by route, after the clear"})
    figures = f"p95 before: {before.observed}; after: {after.observed} ({after.threshold})"
    if after.verdict == Verdict.PASS:
        healthy, text = True, f"p95 within the threshold after the cache clear: {figures}"
    elif after.verdict == Verdict.FAIL:
        healthy, text = False, f"p95 still above the threshold after the cache clear: {figures}"
    elif before.verdict in _MEASURED:
        healthy = False
        text = (
            f"p95 not measurable after the cache clear ({after.detail or after.verdict}), "
            f"though it was before ({before.observed}): the clear is not verified"
        )
    else:
        healthy = True
        text = (
            f"p95 not measurable, before ({before.detail or before.verdict}) nor after "
            f"({after.detail or after.verdict}): the clear could not be verified by latency"
        )
    return LatencyVerification(healthy=healthy, summary=text, before=before, after=after)


def _outcome(result: RunResult[Findings]) -> HighLatencyOutcome:
    now = result.fresh or result.findings
    done = [a.done for a in result.acted_on if isinstance(a, ClearCache) and a.done]
    verification = result.verification
    return HighLatencyOutcome(
        checks=result.findings.checks,
        quick_wins=result.findings.wins,
        outcome=result.outcome,
        note=result.note,
        cache_plan=now.cache_plan,
        cache_result=done[0] if done else None,
        verification=verification if isinstance(verification, LatencyVerification) else None,
    )


@runbook_flow(SPEC)
def high_latency(params: HighLatencyParams = HighLatencyParams()) -> HighLatencyOutcome:  # noqa: B008
    """Run the latency checklist, list quick wins with evidence, clear the cache if approved
    (then measure p95 again: not fixed escalates and fails the run)."""
    return _outcome(drive(HighLatency(), params))
