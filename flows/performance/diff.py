"""What changed since the previous performance report: p95 per endpoint, slow users, slow
statements, the health call's total. Pure: two snapshots in, rows out."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from flows.common import md_escape, table
from flows.performance.snapshot import PerformanceSnapshot

#: A p95 or average must move by this share AND by `MIN_DELTA_MS` to count as a change:
#: a busy endpoint's p95 wobbles a little from one day to the next.
CHANGE_SHARE = 0.2
MIN_DELTA_MS = 5.0

ChangeKind = Literal["endpoint", "user", "statement", "health"]


class Change(BaseModel):
    """One thing that differs from the previous report."""

    kind: ChangeKind
    subject: str
    before: str
    after: str
    change: str


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _moved(before: float, after: float) -> str | None:
    """`up 120%` / `down 40%` when the move is big enough to report, else None."""
    delta = after - before
    if abs(delta) < MIN_DELTA_MS or (before > 0 and abs(delta) / before < CHANGE_SHARE):
        return None
    share = f" {abs(delta) / before:.0%}" if before > 0 else ""
    return ("up" if delta > 0 else "down") + share


def _endpoints(before: PerformanceSnapshot, after: PerformanceSnapshot) -> list[Change]:
    old = {e.endpoint: e for e in before.endpoints}
    new = {e.endpoint: e for e in after.endpoints}
    out: list[Change] = []
    for name, now in new.items():
        was = old.get(name)
        if was is None:
            out.append(
                Change(
                    kind="endpoint",
                    subject=name,
                    before="-",
                    after=_ms(now.p95_ms),
                    change="new endpoint (p95)",
                )
            )
            continue
        moved = _moved(was.p95_ms, now.p95_ms)
        if moved:
            out.append(
                Change(
                    kind="endpoint",
                    subject=name,
                    before=_ms(was.p95_ms),
                    after=_ms(now.p95_ms),
                    change=f"p95 {moved}",
                )
            )
    for name, was in old.items():
        if name not in new and before.logs_unavailable is None and after.logs_unavailable is None:
            out.append(
                Change(
                    kind="endpoint",
                    subject=name,
                    before=_ms(was.p95_ms),
                    after="-",
                    change="no longer in the logs",
                )
            )
    return out


def _users(before: PerformanceSnapshot, after: PerformanceSnapshot) -> list[Change]:
    if after.users is None or after.users.status != "ok":
        return []
    old_ok = before.users is not None and before.users.status == "ok"
    old = {u.user: u for u in before.users.users} if before.users and old_ok else {}
    out: list[Change] = []
    for u in after.users.users:
        was = old.get(u.user)
        if was is None:
            if old_ok:
                out.append(
                    Change(
                        kind="user",
                        subject=u.user,
                        before="-",
                        after=_ms(u.avg_ms),
                        change="new among the slowest users (average)",
                    )
                )
            continue
        moved = _moved(was.avg_ms, u.avg_ms)
        if moved:
            out.append(
                Change(
                    kind="user",
                    subject=u.user,
                    before=_ms(was.avg_ms),
                    after=_ms(u.avg_ms),
                    change=f"average {moved}",
                )
            )
    return out


def _statements(before: PerformanceSnapshot, after: PerformanceSnapshot, top: int) -> list[Change]:
    if after.statements is None or after.statements.status != "ok":
        return []
    if before.statements is None or before.statements.status != "ok":
        return []
    old = {s.queryid or s.query: s for s in before.statements.by_mean[:top]}
    out: list[Change] = []
    for s in after.statements.by_mean[:top]:
        was = old.get(s.queryid or s.query)
        if was is None:
            out.append(
                Change(
                    kind="statement",
                    subject=s.query[:120],
                    before="-",
                    after=_ms(s.mean_ms),
                    change=f"new in the top {top} by mean",
                )
            )
            continue
        moved = _moved(was.mean_ms, s.mean_ms)
        if moved:
            out.append(
                Change(
                    kind="statement",
                    subject=s.query[:120],
                    before=_ms(was.mean_ms),
                    after=_ms(s.mean_ms),
                    change=f"mean {moved}",
                )
            )
    return out


def _health(before: PerformanceSnapshot, after: PerformanceSnapshot) -> list[Change]:
    if not (before.health and after.health and before.health.median and after.health.median):
        return []
    was, now = before.health.median.total_ms, after.health.median.total_ms
    moved = _moved(was, now)
    if not moved:
        return []
    return [
        Change(
            kind="health",
            subject=after.health.url,
            before=_ms(was),
            after=_ms(now),
            change=f"median total {moved}",
        )
    ]


def compare(
    before: PerformanceSnapshot, after: PerformanceSnapshot, top_statements: int = 10
) -> list[Change]:
    """Every change worth a line: endpoints first (the report's order is health, statements,
    endpoints, users; the diff leads with what most often moves)."""
    return [
        *_endpoints(before, after),
        *_users(before, after),
        *_statements(before, after, top_statements),
        *_health(before, after),
    ]


def changes_md(changes: list[Change], previous: str) -> str:
    """The "Since the last report" section."""
    head = f"Compared with the report of {md_escape(previous)}"
    if not changes:
        return (
            head + ": no change beyond the usual wobble (p95 and averages within "
            f"{CHANGE_SHARE:.0%} or {MIN_DELTA_MS:g} ms; no new slow user or statement)."
        )
    return (
        head
        + ":\n\n"
        + table(
            ["what", "subject", "before", "now", "change"],
            [[c.kind, c.subject, c.before, c.after, c.change] for c in changes],
        )
    )
