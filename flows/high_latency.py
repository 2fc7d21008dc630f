"""Runbook `high-latency`: the on-call runbook's "High Response Time" checklist, and its quick wins.

What it may change: nothing, apart from one action: clearing the Redis cache keys matching
the configured pattern (`RUNBOOKS_REDIS_CACHE_KEY_PATTERN`, SCAN + UNLINK, never FLUSHALL).
That clear needs `dry_run=False` AND a human approval in the UI, on every run, whatever the
alert route says (`auto: true` only lets the read-only part run unattended).
Safety limits: the checks only read; after the approval the cache is measured again and only
cleared if there is still something to clear. Undo: none needed, the cache refills from the
database (expect a short burst of database reads).

Checks run concurrently; a dependency that fails is a row "unavailable: <reason>", never a
crash of the run. The artifact holds the checklist, the quick wins and what was done.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import get_run_logger
from prefect.futures import PrefectFuture
from pydantic import BaseModel, Field

from flows.common import (
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
from flows.spec import LockTarget, RunbookSpec, runbook_flow
from tasks.backend import CompressionResult, compression_check
from tasks.kubernetes.metrics import PodMetrics, pod_metrics
from tasks.locks import LOCK_TIMEOUT_S, redis_lock_target, target_lock
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
from tasks.redis import CacheClearResult, RedisInfo, clear_cache, redis_info, redis_target
from tasks.settings import PrometheusSettings, RedisSettings

RUNBOOK = "high-latency"

Verdict = Literal["pass", "FAIL", "not available", "unavailable"]


class HighLatencyParams(BaseModel):
    """Thresholds of the checklist, and whether the one action (a cache clear) may happen."""

    dry_run: bool = Field(
        True, description="Only check and plan. Off: a cache clear may run, after approval."
    )
    window: str = Field("5m", pattern=r"^[1-9][0-9]{0,3}[smh]$", description="Prometheus window.")
    p95_max_s: float = Field(1.0, ge=0.01, le=600, description="p95 above this fails (seconds).")
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
    approval_timeout_s: int = Field(
        1200, ge=10, le=86_400, description="Without an answer by then, nothing is done."
    )
    requested_by: str = Field("", max_length=200, description="Who asked (name, alert).")
    reason: str = Field("", max_length=2000, description="Why; recorded in the audit artifact.")


def target_of(params: HighLatencyParams) -> str:
    """What the runbook may change: the cache, `redis:<host:port>/<db>`."""
    return redis_lock_target(RedisSettings()).key


class CheckRow(BaseModel):
    """One checklist item: its figure, the threshold and the verdict."""

    item: str
    figure: str
    threshold: str
    verdict: Verdict
    detail: str = ""


class QuickWin(BaseModel):
    """A quick win with the evidence behind it."""

    kind: Literal["n+1", "index", "compression", "cache"]
    evidence: str
    suggestion: str


class HighLatencyOutcome(BaseModel):
    """What the run found and did."""

    checks: list[CheckRow]
    quick_wins: list[QuickWin]
    cache_action: Literal["none", "planned", "cleared", "refused", "skipped"]
    note: str
    cache_plan: CacheClearResult | None = None
    cache_result: CacheClearResult | None = None


def _fmt(value: float | None, unit: str, digits: int = 3) -> str:
    return "no data" if value is None else f"{value:.{digits}g} {unit}".strip()


def _unavailable(item: str, threshold: str, u: Unavailable) -> CheckRow:
    return CheckRow(
        item=item, figure="-", threshold=threshold, verdict="unavailable", detail=u.reason
    )


def _not_configured(item: str, threshold: str) -> CheckRow:
    return CheckRow(
        item=item,
        figure="-",
        threshold=threshold,
        verdict="not available",
        detail="Prometheus not configured (RUNBOOKS_PROMETHEUS_URL)",
    )


def _load_row(rate: RouteFigures | Unavailable) -> CheckRow:
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
        return CheckRow(
            item=item,
            figure="no data",
            threshold=threshold,
            verdict="not available",
            detail="no /api requests in the window",
        )
    return CheckRow(
        item=item,
        figure=f"{rate.overall:.3g} req/s over {rate.window}",
        threshold=threshold,
        verdict="pass",
        detail=detail,
    )


def _p95_row(p95: RouteFigures | Unavailable, max_s: float) -> CheckRow:
    item, threshold = "p95 by route", f"<= {max_s:g} s"
    if isinstance(p95, Unavailable):
        return _unavailable(item, threshold, p95)
    if not p95.configured:
        return _not_configured(item, threshold)
    known = {r: v for r, v in p95.by_route.items() if v is not None}
    if p95.overall is None and not known:
        return CheckRow(
            item=item,
            figure="no data",
            threshold=threshold,
            verdict="not available",
            detail="no /api requests in the window",
        )
    slow = {r: v for r, v in known.items() if v > max_s}
    worst = max(known.items(), key=lambda x: x[1]) if known else None
    detail = ", ".join(f"{r}: {v:.3g} s" for r, v in sorted(slow.items(), key=lambda x: -x[1]))
    return CheckRow(
        item=item,
        figure=f"overall {_fmt(p95.overall, 's')}"
        + (f"; worst {worst[0]} {worst[1]:.3g} s" if worst else ""),
        threshold=threshold,
        verdict="FAIL" if slow or (p95.overall or 0) > max_s else "pass",
        detail=f"over the threshold: {detail}" if detail else "",
    )


def _slow_row(stats: TopStatements | Unavailable, mean_ms: float) -> CheckRow:
    item, threshold = "slow queries (pg_stat_statements, by mean)", f"mean <= {mean_ms:g} ms"
    if isinstance(stats, Unavailable):
        return _unavailable(item, threshold, stats)
    if stats.status != "ok":
        return CheckRow(
            item=item,
            figure="-",
            threshold=threshold,
            verdict="not available",
            detail=f"{stats.status}: {stats.detail}",
        )
    if not stats.by_mean:
        return CheckRow(item=item, figure="no statements", threshold=threshold, verdict="pass")
    top = stats.by_mean[0]
    slow = [s for s in stats.by_mean if s.mean_ms > mean_ms]
    return CheckRow(
        item=item,
        figure=f"slowest mean {top.mean_ms:.1f} ms over {top.calls} call(s)",
        threshold=threshold,
        verdict="FAIL" if slow else "pass",
        detail=top.query[:120],
    )


def _hit_rate_row(info: RedisInfo | Unavailable, minimum: float) -> CheckRow:
    item, threshold = "cache hit rate (Redis)", f">= {minimum:.0%}"
    if isinstance(info, Unavailable):
        return _unavailable(item, threshold, info)
    rate = info.window_hit_rate if info.window_hit_rate is not None else info.hit_rate
    scope = f"last {info.window_s:g} s" if info.window_hit_rate is not None else "since start"
    if rate is None:
        return CheckRow(
            item=item,
            figure="no reads",
            threshold=threshold,
            verdict="not available",
            detail="no cache reads counted yet",
        )
    return CheckRow(
        item=item,
        figure=f"{rate:.1%} ({scope})",
        threshold=threshold,
        verdict="pass" if rate >= minimum else "FAIL",
        detail=f"hits {info.keyspace_hits}, misses {info.keyspace_misses}, "
        f"evicted {info.evicted_keys}",
    )


def _memory_row(info: RedisInfo | Unavailable, maximum: float) -> CheckRow:
    item, threshold = "Redis memory vs maxmemory", f"<= {maximum:.0%}"
    if isinstance(info, Unavailable):
        return _unavailable(item, threshold, info)
    if info.memory_ratio is None:
        return CheckRow(
            item=item,
            figure=f"{info.used_memory_human or info.used_memory} used",
            threshold=threshold,
            verdict="not available",
            detail="no maxmemory set: no ceiling to compare with",
        )
    return CheckRow(
        item=item,
        figure=f"{info.memory_ratio:.1%} ({info.used_memory} of {info.maxmemory} bytes)",
        threshold=threshold,
        verdict="pass" if info.memory_ratio <= maximum else "FAIL",
        detail=f"policy {info.maxmemory_policy}",
    )


def _network_rows(
    times: list[ConnectTime] | Unavailable, wanted: dict[str, tuple[str, int]], max_ms: float
) -> list[CheckRow]:
    threshold = f"<= {max_ms:g} ms"
    if isinstance(times, Unavailable):
        return [_unavailable("network latency (TCP connect)", threshold, times)]
    rows = []
    for t in times:
        item = f"network latency: {t.name} ({t.host}:{t.port})"
        if t.median_ms is None:
            rows.append(
                CheckRow(
                    item=item,
                    figure="no connection",
                    threshold=threshold,
                    verdict="unavailable",
                    detail=f"{t.failures}/{t.attempts} connects failed ({t.error})",
                )
            )
            continue
        rows.append(
            CheckRow(
                item=item,
                figure=f"median {t.median_ms:.2f} ms (max {_fmt(t.max_ms, 'ms')})",
                threshold=threshold,
                verdict="pass" if t.median_ms <= max_ms and not t.failures else "FAIL",
                detail=f"{t.failures}/{t.attempts} failed" if t.failures else "",
            )
        )
    for name in ("backend", "postgres", "redis"):
        if name not in wanted:
            rows.append(
                CheckRow(
                    item=f"network latency: {name}",
                    figure="-",
                    threshold=threshold,
                    verdict="not available",
                    detail="no TCP host:port in its settings",
                )
            )
    return rows


def _pods_row(
    metrics: PodMetrics | Unavailable,
    cpu: QueryResult | Unavailable,
    mem: QueryResult | Unavailable,
    max_cores: float,
) -> CheckRow:
    item, threshold = "pod CPU/memory", f"CPU <= {max_cores:g} cores per pod"
    if isinstance(metrics, PodMetrics) and metrics.available and metrics.pods:
        worst = max(metrics.pods, key=lambda p: p.cpu_cores)
        heaviest = max(metrics.pods, key=lambda p: p.memory_bytes)
        return CheckRow(
            item=item,
            figure=f"max CPU {worst.cpu_cores:.3g} cores ({worst.pod}); "
            f"max memory {heaviest.memory_bytes / 2**20:.0f} MiB ({heaviest.pod})",
            threshold=threshold,
            verdict="pass" if worst.cpu_cores <= max_cores else "FAIL",
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
        return CheckRow(
            item=item,
            figure=f"max CPU {cores:.3g} cores ({worst_cpu.labels.get('pod', '?')})"
            + (
                f"; max memory {(worst_mem.value or 0) / 2**20:.0f} MiB "
                f"({worst_mem.labels.get('pod', '?')})"
                if worst_mem
                else ""
            ),
            threshold=threshold,
            verdict="pass" if cores <= max_cores else "FAIL",
            detail=f"Prometheus container metrics (metrics.k8s.io: {why_api})",
        )
    if isinstance(cpu, Unavailable):
        why_prom = cpu.reason
    elif not cpu.configured:
        why_prom = "not configured"
    else:
        why_prom = "no container_cpu_usage_seconds_total series"
    return CheckRow(
        item=item,
        figure="-",
        threshold=threshold,
        verdict="not available",
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


def _checks_md(rows: list[CheckRow]) -> str:
    return table(
        ["check", "figure", "threshold", "verdict", "detail"],
        [[r.item, r.figure, r.threshold, r.verdict, r.detail] for r in rows],
    )


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


SPEC: RunbookSpec[Any] = RunbookSpec(
    name=RUNBOOK,
    title="High latency",
    severity="high",
    topic="platform",
    lock=lambda p: LockTarget(target_of(p)),
)


@runbook_flow(SPEC)
def high_latency(params: HighLatencyParams = HighLatencyParams()) -> HighLatencyOutcome:  # noqa: B008
    """Run the latency checklist, list quick wins with evidence, clear the cache if approved."""
    report = Report(RUNBOOK, "High response time")
    outcome: list[HighLatencyOutcome] = []

    def summary() -> str:
        return f"{RUNBOOK}: cache {outcome[0].cache_action if outcome else 'stopped'}"

    with publish_on_exit(report, summary):
        result = _run(params, report)
        outcome.append(result)
        return result


def _run(params: HighLatencyParams, report: Report) -> HighLatencyOutcome:
    logger = get_run_logger()
    source = tag_run(RUNBOOK)
    report.add(
        "Request",
        f"Requested by **{md_escape(params.requested_by or source)}** (source: {source}); "
        f"dry run: **{params.dry_run}**."
        + (f"\n\nReason: {md_escape(params.reason)}" if params.reason else ""),
    )
    targets = dependency_addresses()
    # Every check at once: the slowest source sets the time, and one down is one row.
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
    got: dict[str, Any] = {name: collect(fut) for name, fut in futures.items()}
    checks = [
        _load_row(got["rate"]),
        _p95_row(got["p95"], params.p95_max_s),
        _slow_row(got["stats"], params.slow_query_mean_ms),
        _hit_rate_row(got["info"], params.hit_rate_min),
        _memory_row(got["info"], params.redis_memory_max),
        *_network_rows(got["net"], targets, params.connect_ms_max),
        _pods_row(got["pods"], got["cpu"], got["mem"], params.pod_cpu_max_cores),
    ]
    report.add("Checklist", _checks_md(checks))
    wins, notes = _quick_wins(
        params,
        got["stats"],
        _total_requests(got["total"]),
        got["seq"],
        got["gzip"],
        got["info"],
    )
    report.add("Quick wins", _wins_md(wins, notes))
    failed = [c.item for c in checks if c.verdict == "FAIL"]
    logger.info("%d check(s) failed: %s; %d quick win(s)", len(failed), failed, len(wins))

    def finish(
        action: Literal["none", "planned", "cleared", "refused", "skipped"],
        note: str,
        plan: CacheClearResult | None = None,
        done: CacheClearResult | None = None,
    ) -> HighLatencyOutcome:
        report.add("Done", f"**{action}**: {md_escape(note)}")
        return HighLatencyOutcome(
            checks=checks,
            quick_wins=wins,
            cache_action=action,
            note=note,
            cache_plan=plan,
            cache_result=done,
        )

    if not any(w.kind == "cache" for w in wins):
        return finish("none", "read-only checks only; nothing changed.")
    try:
        plan = clear_cache(dry_run=True)
    except Exception as exc:  # noqa: BLE001 - a refused or failed plan is reported, not raised
        return finish("refused", f"cache clear not planned: {failure_text(exc)}. Nothing changed.")
    report.add("Cache clear plan", _clear_md(plan))
    if plan.matched == 0:
        # An empty plan asks nobody: there is nothing to approve.
        return finish(
            "none", "nothing to do: no key matches the cache pattern; nothing changed.", plan
        )
    if params.dry_run:
        return finish("planned", "dry run: nothing changed. Re-run with dry_run off to act.", plan)
    decision = request_approval(
        f"Clear {plan.matched} Redis cache key(s) matching {plan.pattern!r} on {plan.target}",
        params.approval_timeout_s,
    )
    report.add("Approval", decision.line())
    if not decision.approved:
        return finish("refused", "not approved: nothing changed.", plan)
    # One clear per cache at a time; the others wait, then find the keys gone and skip.
    cache = target_of(params)
    with target_lock(cache, timeout_s=LOCK_TIMEOUT_S) as waited:
        report.add("Target lock", f"Held {md_escape(cache)} (waited {waited:.1f} s).")
        # The run waited for a human: measure again and act only if it still makes sense.
        info_now = redis_info()
        evidence_now = _cache_evidence(params, info_now)
        fresh = clear_cache(dry_run=True)
        report.add(
            "Re-measured after approval",
            f"{_clear_md(fresh)}\n\nEvidence now: {md_escape(evidence_now or 'none')}.",
        )
        if not evidence_now and not params.clear_cache:
            return finish("skipped", "the evidence for a clear is gone: nothing changed.", fresh)
        if fresh.matched == 0:
            return finish("skipped", "no key matches the pattern any more: nothing changed.", fresh)
        stale = alert_resolved(report)
        if stale is not None:
            return finish("skipped", stale, fresh)
        done = clear_cache(dry_run=False)
    report.add("Cache cleared", _clear_md(done))
    return finish(
        "cleared",
        f"{done.deleted} key(s) removed from {redis_target(RedisSettings())}.",
        fresh,
        done,
    )
