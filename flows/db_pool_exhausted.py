"""Runbook `db-pool-exhausted`: PostgreSQL connection pool exhausted ("too many connections").

Trigger: alert `DatabaseConnectionPoolExhausted`, the scheduled `pool-threshold` check, or by
hand from the Prefect UI.

Check: client connections by state, database and role against `max_connections` (reserved
superuser slots accounted), oldest transactions, idle-in-transaction sessions and their age,
PgBouncer `SHOW POOLS` when configured (read-only).

May change: terminates idle sessions that pass every guard (client backends only, never this
run's own session, never superusers or protected roles, only the allowed idle states, idle
for longer than N minutes, optional database/role filter); optionally sets
`idle_in_transaction_session_timeout` (ALTER SYSTEM + `pg_reload_conf()`, or ALTER ROLE).

Safety limits: dry-run by default (the plan is the artifact); acts only while usage is at or
above `act_above_percent`; at most `guard.max_sessions` terminations, in one statement that
re-checks the guard, so a session that became active since the plan survives; one
remediation per server at a time (advisory lock) and a cooldown between remediations;
optional approval gate.

Undo: a terminated session cannot be revived; its client reconnects (pools do so by
themselves). A timeout change prints its exact undo statement in the artifact.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Literal

from prefect import flow, get_run_logger
from prefect.variables import Variable
from pydantic import BaseModel, Field

from flows.common import Report, request_approval, table, tag_run
from tasks.clients import pg_target
from tasks.errors import SafetyViolation
from tasks.postgres import (
    PgBouncerPool,
    PoolSnapshot,
    PoolUsage,
    TerminationGuard,
    TerminationPlan,
    TerminationResult,
    TimeoutChange,
    age_text,
    guard_summary,
    inspect_pool,
    measure_pool_usage,
    plan_terminations,
    remediation_lock,
    set_idle_in_transaction_timeout,
    show_pgbouncer_pools,
    terminate_sessions,
)
from tasks.settings import PostgresSettings

RUNBOOK = "db-pool-exhausted"


class DbPoolParams(BaseModel):
    """Parameters of the db-pool-exhausted runbook (the form in the UI's Run dialog)."""

    dry_run: bool = Field(
        True, description="Only plan: report what would be terminated and change nothing."
    )
    guard: TerminationGuard = Field(
        default_factory=TerminationGuard,
        description="Which sessions may be terminated; all conditions must hold.",
    )
    act_above_percent: float = Field(
        70.0,
        ge=0,
        le=100,
        description="Terminate only while usage is at or above this percent (0 = always).",
    )
    healthy_below_percent: float = Field(
        70.0, gt=0, le=100, description="Verification passes when usage falls below this."
    )
    idle_in_transaction_timeout_s: int | None = Field(
        None,
        ge=1,
        le=86_400,
        description="Prevention: set idle_in_transaction_session_timeout (seconds); unset = no.",
    )
    timeout_role: str | None = Field(
        None,
        description="Set that timeout for this role only (ALTER ROLE); unset = ALTER SYSTEM.",
    )
    require_approval: bool = Field(
        False, description="Pause for a human approval in the UI before acting."
    )
    approval_timeout_s: int = Field(
        900, ge=10, le=86_400, description="Without an answer by then, nothing is done."
    )
    cooldown_minutes: float = Field(
        5.0, ge=0, le=1440, description="Refuse to act again on the same server within this."
    )
    requested_by: str = Field(
        "", max_length=200, description="Who asked for this run (name, alert); for the audit."
    )
    reason: str = Field("", max_length=2000, description="Why; recorded in the audit artifact.")


class DbPoolOutcome(BaseModel):
    """What the run found and did."""

    action: Literal["planned", "terminated", "skipped", "refused"]
    note: str
    before: PoolUsage
    after: PoolUsage | None
    plan: TerminationPlan
    result: TerminationResult | None
    timeout_change: TimeoutChange | None
    healthy: bool | None = Field(description="Usage below the healthy mark after acting.")


class PoolStillExhausted(Exception):
    """Verification failed: usage is still above the healthy mark after remediation."""


def _cooldown_key(target: str) -> str:
    return "cooldown_db_pool_" + hashlib.sha256(target.encode()).hexdigest()[:16]


def _cooldown_left(target: str, minutes: float) -> timedelta | None:
    last = Variable.get(_cooldown_key(target), default=None)
    if not last or minutes <= 0:
        return None
    left = datetime.fromisoformat(str(last)) + timedelta(minutes=minutes) - datetime.now(UTC)
    return left if left > timedelta(0) else None


def _usage_md(u: PoolUsage) -> str:
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


def _findings_md(snap: PoolSnapshot, pools: list[PgBouncerPool] | str) -> str:
    txn_rows = [
        [t.pid, t.usename, t.datname, t.state, age_text(t.xact_age_s), t.query]
        for t in snap.long_transactions
    ]
    iit_rows = [
        [t.pid, t.usename, t.datname, age_text(t.state_age_s)] for t in snap.idle_in_transaction
    ]
    out = [
        _usage_md(snap.usage),
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


def _plan_md(plan: TerminationPlan) -> str:
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
        f"**{len(plan.sessions)}** session(s) would be terminated:\n\n"
        + table(["pid", "role", "database", "state", "idle for", "application", "client"], rows)
        + cap
    )


@flow(name=RUNBOOK, log_prints=False)
def db_pool_exhausted(params: DbPoolParams = DbPoolParams()) -> DbPoolOutcome:  # noqa: B008
    """Check the PostgreSQL pool, plan guarded terminations, act when allowed, verify."""
    logger = get_run_logger()
    source = tag_run(RUNBOOK)
    target = pg_target(PostgresSettings())
    report = Report(RUNBOOK, f"PostgreSQL pool on {target}")
    who = params.requested_by or source
    report.add(
        "Request",
        f"Requested by **{who}** (source: {source}); dry run: **{params.dry_run}**."
        + (f"\n\nReason: {params.reason}" if params.reason else ""),
    )

    snapshot = inspect_pool()
    pools_state = show_pgbouncer_pools(return_state=True)
    pools: list[PgBouncerPool] | str = (
        pools_state.result() if pools_state.is_completed() else f"not read: {pools_state.message}"
    )
    report.add("Findings", _findings_md(snapshot, pools))
    plan = plan_terminations(params.guard)
    report.add("Plan", _plan_md(plan))
    before = snapshot.usage

    def finish(
        action: Literal["planned", "terminated", "skipped", "refused"],
        note: str,
        *,
        after: PoolUsage | None = None,
        result: TerminationResult | None = None,
        change: TimeoutChange | None = None,
        healthy: bool | None = None,
    ) -> DbPoolOutcome:
        report.add("Outcome", f"**{action}**: {note}")
        report.publish(f"{RUNBOOK} on {target}: {action}")
        logger.info("%s: %s (%s)", target, action, note)
        return DbPoolOutcome(
            action=action,
            note=note,
            before=before,
            after=after,
            plan=plan,
            result=result,
            timeout_change=change,
            healthy=healthy,
        )

    if params.dry_run:
        return finish("planned", "dry run: nothing changed. Re-run with dry_run off to act.")
    if before.percent_used < params.act_above_percent:
        return finish(
            "skipped",
            f"usage {before.percent_used:.1f}% is below act_above_percent "
            f"{params.act_above_percent:g}%: nothing changed.",
        )
    wait = _cooldown_left(target, params.cooldown_minutes)
    if wait is not None:
        return finish(
            "refused",
            f"a remediation ran on {target} recently; cooldown has {age_text(wait.total_seconds())}"
            " left. Nothing changed.",
        )
    if params.require_approval:
        timeout = params.idle_in_transaction_timeout_s
        decision = request_approval(
            f"Terminate {len(plan.sessions)} idle session(s) on {target}"
            + (f" and set idle_in_transaction_session_timeout={timeout}s" if timeout else ""),
            params.approval_timeout_s,
        )
        report.add("Approval", decision.line())
        if not decision.approved:
            return finish("refused", "not approved: nothing changed.")

    try:
        with remediation_lock(RUNBOOK):
            Variable.set(_cooldown_key(target), datetime.now(UTC).isoformat(), overwrite=True)
            result = terminate_sessions(plan)
            change = (
                set_idle_in_transaction_timeout(
                    params.idle_in_transaction_timeout_s, params.timeout_role
                )
                if params.idle_in_transaction_timeout_s
                else None
            )
    except SafetyViolation as exc:
        return finish("refused", f"{exc}. Nothing changed.")

    done = table(
        ["pid", "role", "database", "state"],
        [[s.pid, s.usename, s.datname, s.state] for s in result.terminated],
    )
    spared = f"\n\nSpared (no longer matching the guard): {result.spared_pids}" * bool(
        result.spared_pids
    )
    report.add(
        "Done",
        f"Terminated **{len(result.terminated)}** in {result.elapsed_s:.3f} s:\n\n" + done + spared,
    )
    if change is not None:
        report.add(
            "Prevention",
            f"idle_in_transaction_session_timeout = {change.new} ({change.scope}); "
            f"was {change.previous or 'default'}.\n\nUndo: `{change.undo_sql}`",
        )

    after = measure_pool_usage()
    healthy = after.percent_used < params.healthy_below_percent
    report.add(
        "Verify",
        f"Before **{before.percent_used:.1f}%** ({before.client_connections}) → after "
        f"**{after.percent_used:.1f}%** ({after.client_connections}); healthy below "
        f"{params.healthy_below_percent:g}%: **{'yes' if healthy else 'NO'}**.",
    )
    outcome = finish(
        "terminated",
        f"{len(result.terminated)} session(s) terminated; usage {after.percent_used:.1f}%.",
        after=after,
        result=result,
        change=change,
        healthy=healthy,
    )
    if not healthy:
        raise PoolStillExhausted(
            f"{target}: usage still {after.percent_used:.1f}% after terminating "
            f"{len(result.terminated)} session(s); escalate (see the run's artifact)"
        )
    return outcome
