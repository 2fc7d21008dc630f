"""db-pool-exhausted's report text: usage, findings, the guard's sessions, the re-plan, the kill.

Markdown only (no reads, no writes); outside text goes through `table`/`md_escape`.
"""

from __future__ import annotations

from flows.common import table
from flows.report_text import age_text, guard_summary
from tasks.postgres import (
    PgBouncerPool,
    PoolSnapshot,
    PoolUsage,
    TerminationPlan,
    TerminationResult,
)


def usage_md(u: PoolUsage) -> str:
    """Connections against max_connections, with the counts by state, database and role."""
    return (
        f"**{u.client_connections} / {u.max_connections}** client connections "
        f"(**{u.percent_used:.1f}%**), {u.superuser_reserved} reserved for superusers"
        + (f" + {u.reserved} reserved" if u.reserved else "")
        + f", {u.free_for_applications} free for applications.\n\n"
        + table(["state", "n"], [[c.key, c.count] for c in u.by_state])
        + "\n\n"
        + table(["database", "n"], [[c.key, c.count] for c in u.by_database])
        + "\n\n"
        + table(["role", "n"], [[c.key, c.count] for c in u.by_user])
    )


def findings_md(snap: PoolSnapshot, pools: list[PgBouncerPool] | str) -> str:
    """The "Findings" section: usage, oldest transactions, idle in transaction, PgBouncer."""
    txn_rows = [
        [t.pid, t.usename, t.datname, t.state, age_text(t.xact_age_s), t.query]
        for t in snap.long_transactions
    ]
    iit_rows = [
        [t.pid, t.usename, t.datname, age_text(t.state_age_s)] for t in snap.idle_in_transaction
    ]
    out = [
        usage_md(snap.usage),
        "### Oldest open transactions",
        table(["pid", "role", "database", "state", "age", "query"], txn_rows),
        "### Idle in transaction",
        table(["pid", "role", "database", "idle for"], iit_rows),
    ]
    if isinstance(pools, str):
        out += ["### PgBouncer", pools]
    elif pools:
        rows = [
            [p.database, p.user, p.cl_active, p.cl_waiting, p.sv_active, p.sv_idle, p.maxwait_s]
            for p in pools
        ]
        out += [
            "### PgBouncer SHOW POOLS",
            table(
                ["db", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle", "maxwait"], rows
            ),
        ]
    return "\n\n".join(out)


def sessions_md(plan: TerminationPlan, lead: str = "would be terminated") -> str:
    """The guard and the sessions it matches (capped)."""
    rows = [
        [
            s.pid,
            s.usename,
            s.datname,
            s.state,
            age_text(s.idle_s(plan.planned_at)),
            s.application_name,
            s.client_addr or "local",
        ]
        for s in plan.sessions
    ]
    cap = f"\n\n_More sessions matched than the cap of {plan.guard.max_sessions}._" * (
        plan.more_than_cap
    )
    return (
        f"Guard: {guard_summary(plan.guard)}.\n\n"
        f"**{len(plan.sessions)}** session(s) {lead}:\n\n"
        + table(["pid", "role", "database", "state", "idle for", "application", "client"], rows)
        + cap
    )


def replan_md(approved: TerminationPlan, fresh: TerminationPlan, both: TerminationPlan) -> str:
    """The plan under the lock: what matches now, what is approved and still matching."""
    keys = {(x.pid, x.backend_start) for x in both.sessions}
    fresh_keys = {(x.pid, x.backend_start) for x in fresh.sessions}
    gone = [x.pid for x in approved.sessions if (x.pid, x.backend_start) not in fresh_keys]
    new = [x.pid for x in fresh.sessions if (x.pid, x.backend_start) not in keys]
    return (
        sessions_md(fresh, "match the guard now")
        + f"\n\nApproved and still matching: **{len(both.sessions)}** session(s)"
        + (f"; approved but no longer matching (left alone): {gone}" if gone else "")
        + (f"; matching now but never approved (left alone): {new}" if new else "")
        + "."
    )


def terminated_md(result: TerminationResult) -> str:
    """What the kill statement ended, and the planned sessions it spared."""
    done = table(
        ["pid", "role", "database", "state"],
        [[x.pid, x.usename, x.datname, x.state] for x in result.terminated],
    )
    spared = f"\n\nSpared (no longer matching the guard): {result.spared_pids}" * bool(
        result.spared_pids
    )
    return (
        f"Terminated **{len(result.terminated)}** in {result.elapsed_s:.3f} s:\n\n" + done + spared
    )
