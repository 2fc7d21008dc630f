"""Runbook `performance-report`: the on-call runbook's "Performance Troubleshooting" as one
report, answering its three questions with figures.

Trigger: daily schedule (06:15 UTC, the catalog) and by hand in the UI. No alert starts it.
What it may change: nothing. It reads the health URL (GET), `pg_stat_statements`, the
backend pods' logs (`pods/log`) and the audit table (one bounded SELECT), and writes its own
files: `<stamp>.md`, `<stamp>.json` and `<stamp>.png` in `RUNBOOKS_PERFORMANCE_REPORT_DIR`.
Safety limits: every read is bounded (samples, log lines per pod, the window, LIMIT); table
and column names come from settings and are quoted as SQL identifiers, never pasted; a
source that fails is a row saying why, never a crash of the run. Undo: none needed (delete
the exported files to forget a report).

1. Slow overall? The health call split into DNS, connect, TLS, first byte and total (median
   of a few GETs, through the load balancer when `RUNBOOKS_OUTAGE_ENDPOINT_URL` is set);
   `pg_stat_statements` top 10 by mean time.
2. Slow for some endpoints? The `duration=…ms` lines of every backend pod: p50, p95 and max
   per endpoint, the 20 slowest requests, and a chart of latency by endpoint (a PNG, inline
   in the artifact and beside the exported report).
3. Slow for some users? The audit query over the window, slowest average first.
Then "Since the last report": the newest earlier JSON in the report folder compared.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.futures import PrefectFuture
from pydantic import BaseModel, Field

from flows.common import Report, Unavailable, collect, md_code, md_escape, table
from flows.driver import Runbook, checks_md, drive
from flows.performance.chart import latency_chart
from flows.performance.diff import Change, changes_md, compare
from flows.performance.snapshot import PerformanceSnapshot, previous_snapshot, stamp_of
from flows.spec import Action, Check, Outcome, RequestParams, RunbookSpec, Verdict, runbook_flow
from tasks.clients import kube_configured
from tasks.kubernetes import tail_logs
from tasks.kubernetes.models import TailLogsResult
from tasks.performance import (
    DURATION_GREP,
    HealthTimings,
    SlowUsers,
    endpoint_stats,
    health_timings,
    parse_request_lines,
    slow_users,
    slowest_requests,
)
from tasks.postgres import TopStatements, top_statements
from tasks.settings import KubernetesSettings, PerformanceSettings

RUNBOOK = "performance-report"
#: A chart larger than this is linked, not inlined, in the artifact (15 rows stay far below).
MAX_INLINE_PNG = 512 * 1024

SPEC: RunbookSpec[Any] = RunbookSpec(
    name=RUNBOOK,
    title="Performance report",
    severity=None,
    dry_run_field=None,
)


class PerformanceReportParams(RequestParams):
    """How much the report reads, and what it flags as slow (it changes nothing)."""

    samples: int = Field(5, ge=1, le=50, description="GETs of the health URL (the median).")
    log_lines: int = Field(
        2000, ge=1, le=10_000, description="Log lines read from the end of each backend pod."
    )
    slowest: int = Field(20, ge=1, le=200, description="How many of the slowest requests.")
    statements: int = Field(10, ge=1, le=100, description="pg_stat_statements top N by mean.")
    window_minutes: int | None = Field(
        None,
        ge=1,
        le=7 * 24 * 60,
        description="Slow users over the last N minutes; unset = the setting"
        " RUNBOOKS_PERFORMANCE_WINDOW_MINUTES.",
    )
    users: int = Field(20, ge=1, le=500, description="How many users, slowest average first.")
    slow_ms: float = Field(
        1000.0,
        gt=0,
        le=600_000,
        description="An endpoint's p95, a user's average or the health total above this is"
        " flagged (ms).",
    )
    slow_statement_ms: float = Field(
        100.0, gt=0, le=600_000, description="A statement slower than this on average (ms)."
    )


class ExportedFiles(BaseModel):
    """Where the report was written, or why it was not."""

    markdown: str | None = None
    json_file: str | None = None
    png: str | None = None
    error: str | None = None


class PerformanceReport(BaseModel):
    """The run's return value: the figures, the summary rows, what changed, the files."""

    snapshot: PerformanceSnapshot
    checks: list[Check]
    changes: list[Change] | None = Field(None, description="None: no earlier report to compare.")
    previous: str | None = None
    files: ExportedFiles
    outcome: Outcome = "nothing to do"


@dataclass
class Found:
    """What `check` measured and wrote."""

    snapshot: PerformanceSnapshot
    checks: list[Check]
    changes: list[Change] | None
    previous: str | None
    files: ExportedFiles


# ------------------------------------------------------------------------------ reads


def _gather(params: PerformanceReportParams) -> dict[str, Any]:
    """The four reads at once; one source down is one row, never the run."""
    futures: dict[str, PrefectFuture[Any]] = {
        "health": health_timings.submit(params.samples),
        "statements": top_statements.submit(params.statements),
        "users": slow_users.submit(params.window_minutes, params.users),
    }
    got: dict[str, Any] = {}
    if kube_configured():
        kube = KubernetesSettings()
        futures["logs"] = tail_logs.submit(
            kube.backend_deployment, lines=params.log_lines, grep=DURATION_GREP
        )
    else:
        got["logs"] = Unavailable(
            "not configured: no Kubernetes configuration (RUNBOOKS_K8S_KUBECONFIG, in-cluster,"
            " $KUBECONFIG or ~/.kube/config)"
        )
    got.update({name: collect(fut) for name, fut in futures.items()})
    return got


def _snapshot(
    params: PerformanceReportParams, got: dict[str, Any], at: datetime
) -> PerformanceSnapshot:
    """The reads as the report's figures (a failed read: its reason in `*_unavailable`)."""

    def value(name: str) -> Any:
        return None if isinstance(got[name], Unavailable) else got[name]

    def reason(name: str) -> str | None:
        return got[name].reason if isinstance(got[name], Unavailable) else None

    logs: TailLogsResult | None = value("logs")
    parsed = parse_request_lines(logs) if logs is not None else None
    requests = parsed.requests if parsed else []
    return PerformanceSnapshot(
        taken_at=at,
        health=value("health"),
        health_unavailable=reason("health"),
        statements=value("statements"),
        statements_unavailable=reason("statements"),
        endpoints=endpoint_stats(requests),
        slowest=slowest_requests(requests, params.slowest),
        # The requests themselves stay out of the JSON: the figures above are what compares.
        logs=parsed.model_copy(update={"requests": []}) if parsed else None,
        logs_unavailable=reason("logs"),
        users=value("users"),
        users_unavailable=reason("users"),
    )


# ------------------------------------------------------------------------------ summary rows


def _unavailable(item: str, threshold: str, why: str) -> Check:
    verdict = Verdict.NOT_CONFIGURED if why.startswith("not configured") else Verdict.UNAVAILABLE
    return Check(item=item, observed="-", threshold=threshold, verdict=verdict, detail=why)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _health_row(health: HealthTimings | None, why: str | None, slow_ms: float) -> Check:
    item, threshold = "health call (median total)", f"<= {slow_ms:g} ms"
    if health is None or health.median is None:
        return _unavailable(item, threshold, why or "no answer")
    m = health.median
    bad = [c for c in health.status_codes if c >= 400]
    return Check(
        item=item,
        observed=f"{_ms(m.total_ms)} over {len(health.runs)} GET(s)",
        threshold=threshold,
        verdict=Verdict.FAIL if m.total_ms > slow_ms or bad or health.errors else Verdict.PASS,
        detail=f"dns {_ms(m.dns_ms)}, connect {_ms(m.connect_ms)}, tls {_ms(m.tls_ms)},"
        f" first byte {_ms(m.first_byte_ms)}; via {health.via}"
        + (f"; HTTP {sorted(set(bad))}" if bad else "")
        + (f"; {health.errors} failed ({health.last_error})" if health.errors else ""),
    )


def _statements_row(stats: TopStatements | None, why: str | None, slow_ms: float) -> Check:
    item, threshold = "pg_stat_statements (slowest mean)", f"<= {slow_ms:g} ms"
    if stats is None:
        return _unavailable(item, threshold, why or "no answer")
    if stats.status != "ok":
        verdict = (
            Verdict.NOT_CONFIGURED
            if stats.status in ("extension_missing", "not_preloaded")
            else Verdict.UNAVAILABLE
        )
        return Check(
            item=item,
            observed="-",
            threshold=threshold,
            verdict=verdict,
            detail=f"{stats.status}: {stats.detail}",
        )
    if not stats.by_mean:
        return Check(item=item, observed="no statements", threshold=threshold, verdict=Verdict.PASS)
    top = stats.by_mean[0]
    return Check(
        item=item,
        observed=f"{_ms(top.mean_ms)} over {top.calls} call(s)",
        threshold=threshold,
        verdict=Verdict.FAIL if top.mean_ms > slow_ms else Verdict.PASS,
        detail=top.query[:120],
    )


def _endpoints_row(snap: PerformanceSnapshot, slow_ms: float) -> Check:
    item, threshold = "endpoints (slowest p95, backend logs)", f"<= {slow_ms:g} ms"
    if snap.logs is None:
        return _unavailable(item, threshold, snap.logs_unavailable or "no logs")
    pods = f"{len(snap.logs.pods)} pod(s) of {snap.logs.deployment}"
    errors = f"; unreadable: {'; '.join(snap.logs.errors)}" if snap.logs.errors else ""
    if not snap.endpoints:
        return Check(
            item=item,
            observed="no duration=…ms lines",
            threshold=threshold,
            verdict=Verdict.UNAVAILABLE,
            detail=f"{pods}, last {snap.logs.lines_per_pod} lines each{errors}",
        )
    top = snap.endpoints[0]
    return Check(
        item=item,
        observed=f"{top.endpoint}: p95 {_ms(top.p95_ms)} ({top.requests} request(s))",
        threshold=threshold,
        verdict=Verdict.FAIL if top.p95_ms > slow_ms else Verdict.PASS,
        detail=f"{sum(e.requests for e in snap.endpoints)} request(s) from {pods}{errors}",
    )


def _users_row(users: SlowUsers | None, why: str | None, slow_ms: float) -> Check:
    item, threshold = "users (slowest average, audit table)", f"<= {slow_ms:g} ms"
    if users is None:
        return _unavailable(item, threshold, why or "no answer")
    if users.status != "ok":
        return Check(
            item=item,
            observed="-",
            threshold=threshold,
            verdict=Verdict.NOT_CONFIGURED
            if users.status in ("table missing", "column missing")
            else Verdict.UNAVAILABLE,
            detail=f"{users.status}: {users.detail}",
        )
    if not users.users:
        return Check(
            item=item,
            observed=f"no requests in {users.window_minutes} min",
            threshold=threshold,
            verdict=Verdict.PASS,
            detail=users.table,
        )
    top = users.users[0]
    return Check(
        item=item,
        observed=f"user {top.user}: {_ms(top.avg_ms)} over {top.requests} request(s)",
        threshold=threshold,
        verdict=Verdict.FAIL if top.avg_ms > slow_ms else Verdict.PASS,
        detail=f"{users.table}, last {users.window_minutes} min",
    )


def summary_checks(params: PerformanceReportParams, snap: PerformanceSnapshot) -> list[Check]:
    """One row per figure the three questions hang on."""
    return [
        _health_row(snap.health, snap.health_unavailable, params.slow_ms),
        _statements_row(snap.statements, snap.statements_unavailable, params.slow_statement_ms),
        _endpoints_row(snap, params.slow_ms),
        _users_row(snap.users, snap.users_unavailable, params.slow_ms),
    ]


# ------------------------------------------------------------------------------ sections


def overall_md(snap: PerformanceSnapshot, checks: list[Check]) -> str:
    """Slow overall? The health call's phases per GET and the statements by mean."""
    out = [checks_md(checks[:2])]
    if snap.health and snap.health.runs:
        out.append(f"Health call: {md_code(snap.health.url)} (via {snap.health.via}).")
        rows = [
            [
                i + 1,
                _ms(t.dns_ms),
                _ms(t.connect_ms),
                _ms(t.tls_ms),
                _ms(t.first_byte_ms),
                _ms(t.total_ms),
            ]
            for i, t in enumerate(snap.health.runs)
        ]
        if snap.health.median:
            m = snap.health.median
            rows.append(
                [
                    "median",
                    _ms(m.dns_ms),
                    _ms(m.connect_ms),
                    _ms(m.tls_ms),
                    _ms(m.first_byte_ms),
                    _ms(m.total_ms),
                ]
            )
        out.append(table(["GET", "DNS", "connect", "TLS", "first byte", "total"], rows))
        out.append(
            "_Each figure counts from the start of the request, as `curl -w` does;"
            " `-`: not needed (an IP address, plain HTTP)._"
        )
    stats = snap.statements
    if stats and stats.status == "ok":
        out.append("### pg_stat_statements, top by mean time")
        out.append(
            table(
                ["mean", "calls", "total", "max", "rows/call", "query"],
                [
                    [
                        _ms(s.mean_ms),
                        s.calls,
                        _ms(s.total_ms),
                        _ms(s.max_ms),
                        s.rows_per_call,
                        s.query,
                    ]
                    for s in stats.by_mean
                ],
            )
        )
    return "\n\n".join(out)


def endpoints_md(snap: PerformanceSnapshot, check: Check, chart: str) -> str:
    """Slow for some endpoints? p50/p95/max per endpoint, the slowest requests, the chart."""
    out = [checks_md([check])]
    if snap.logs is not None:
        out.append(
            f"Read the last {snap.logs.lines_per_pod} lines of each pod of "
            f"{md_code(snap.logs.deployment)} in {md_code(snap.logs.namespace)}: "
            + (", ".join(md_code(p) for p in snap.logs.pods) or "no pod")
            + "."
        )
    if snap.endpoints:
        out.append(
            table(
                ["endpoint", "requests", "p50", "p95", "max"],
                [
                    [e.endpoint, e.requests, _ms(e.p50_ms), _ms(e.p95_ms), _ms(e.max_ms)]
                    for e in snap.endpoints
                ],
            )
        )
        out.append(chart)
        out.append(f"### The {len(snap.slowest)} slowest requests")
        out.append(
            table(
                ["duration", "endpoint", "status", "pod", "at"],
                [
                    [_ms(r.duration_ms), r.endpoint, r.status or "-", r.pod, r.at or "-"]
                    for r in snap.slowest
                ],
            )
        )
    return "\n\n".join(out)


def users_md(users: SlowUsers | None, check: Check) -> str:
    """Slow for some users? The audit query's answer."""
    out = [checks_md([check])]
    if users is not None and users.status == "ok" and users.users:
        out.append(
            f"{md_code(users.table)} on {md_escape(users.target)}, last "
            f"{users.window_minutes} min, slowest average first:"
        )
        out.append(
            table(
                ["user", "requests", "average", "max"],
                [[u.user, u.requests, _ms(u.avg_ms), _ms(u.max_ms)] for u in users.users],
            )
        )
    return "\n\n".join(out)


# ------------------------------------------------------------------------------ files


def _write(
    report_dir: Path, stem: str, snap: PerformanceSnapshot, png: bytes, markdown: str
) -> ExportedFiles:
    """The three files; a folder that cannot be written is said, not raised."""
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
        md, js, img = (report_dir / f"{stem}{ext}" for ext in (".md", ".json", ".png"))
        img.write_bytes(png)
        md.write_text(markdown, encoding="utf-8")
        # The JSON last: the next report compares against it, so it must not precede a
        # half-written set.
        js.write_text(snap.model_dump_json(indent=2), encoding="utf-8")
    except OSError as exc:
        return ExportedFiles(error=f"{type(exc).__name__}: {exc.strerror or 'write failed'}")
    return ExportedFiles(markdown=str(md), json_file=str(js), png=str(img))


class PerformanceReportRunbook(Runbook[PerformanceReportParams, Found]):
    """Read-only: the report is the check; the plan is always empty."""

    spec = SPEC

    def check(self, params: PerformanceReportParams, report: Report) -> Found:
        settings = PerformanceSettings()
        at = datetime.now(UTC)
        stem = stamp_of(at)
        got = _gather(params)
        snap = _snapshot(params, got, at)
        checks = summary_checks(params, snap)
        png = latency_chart(snap.endpoints, f"Latency by endpoint · {at:%Y-%m-%d %H:%M} UTC")
        # The Prefect UI renders a markdown image from a data: URI (checked in Chromium): the
        # chart is in the artifact itself; the exported markdown links the PNG beside it.
        inline = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        embed = inline if len(png) <= MAX_INLINE_PNG else f"{stem}.png"
        chart = (
            f"![Latency by endpoint: p50 and p95]({embed})\n\n"
            f"_The chart is also {md_code(stem + '.png')} in {md_code(settings.report_dir)}._"
        )
        report.add("Slow overall?", overall_md(snap, checks))
        report.add("Slow for some endpoints?", endpoints_md(snap, checks[2], chart))
        report.add("Slow for some users?", users_md(snap.users, checks[3]))
        found = previous_snapshot(settings.report_dir, stem)
        changes: list[Change] | None = None
        previous: str | None = None
        if found is None:
            report.add(
                "Since the last report", "No earlier report in the folder: nothing to compare."
            )
        else:
            path, before = found
            previous = path.name
            changes = compare(before, snap, params.statements)
            report.add(
                "Since the last report",
                changes_md(changes, f"{before.taken_at:%Y-%m-%d %H:%M:%S} UTC ({path.name})"),
            )
        # The exported markdown shows the chart inline (a relative link next to it).
        exported = report.markdown().replace(f"]({inline})", f"]({stem}.png)") + "\n"
        files = _write(settings.report_dir, stem, snap, png, exported)
        report.add(
            "Export",
            f"Could not write the report to {md_code(settings.report_dir)}: "
            f"{md_escape(files.error)}"
            if files.error
            else f"{md_code(stem + '.md')}, {md_code(stem + '.json')} and "
            f"{md_code(stem + '.png')} in {md_code(settings.report_dir)}.",
        )
        flagged = [c.item for c in checks if c.verdict == Verdict.FAIL]
        get_run_logger().info(
            "performance report %s: %d endpoint(s), flagged: %s", stem, len(snap.endpoints), flagged
        )
        return Found(snap, checks, changes, previous, files)

    def plan(self, params: PerformanceReportParams, findings: Found) -> list[Action]:
        # A report: the remedies (high-latency's quick wins, a rollout) are other runbooks'.
        return []


@runbook_flow(SPEC)
def performance_report(
    params: PerformanceReportParams = PerformanceReportParams(),  # noqa: B008
) -> PerformanceReport:
    """Slow overall, for some endpoints, for some users: one report, compared with the last."""
    result = drive(PerformanceReportRunbook(), params)
    f = result.findings
    return PerformanceReport(
        snapshot=f.snapshot,
        checks=f.checks,
        changes=f.changes,
        previous=f.previous,
        files=f.files,
        outcome=result.outcome,
    )
