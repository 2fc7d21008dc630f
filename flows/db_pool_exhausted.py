"""Runbook `db-pool-exhausted`: PostgreSQL connection pool exhausted ("too many connections").

Trigger: alert `DatabaseConnectionPoolExhausted`, the scheduled `pool-threshold` check, or by
hand from the Prefect UI.

Check: client connections by state, database and role against `max_connections` (reserved
superuser slots accounted), oldest transactions, idle-in-transaction sessions and their age,
PgBouncer `SHOW POOLS` when configured (read-only).

May change: terminates idle sessions that pass every guard (client backends only, never this
run's own session, never superusers or protected roles, only the allowed idle states, idle
for longer than N minutes, optional database/role filter); optionally sets
`idle_in_transaction_session_timeout` per role (ALTER ROLE, the default) or, with approval
and at least 60 s, system-wide (ALTER SYSTEM + `pg_reload_conf()`).
With `raise_pool_size_to`, dry_run off and approval: sets the backend's pool-size env var
(at most the pool sizing cap, flows/pool_sizing.py) and restarts the backend.

Safety limits: dry-run by default (the plan is the artifact); floors and caps in the
parameter model (idle >= 1 min, `max_sessions` <= the settings cap); acts only while usage is
at or above `act_above_percent`; at most `guard.max_sessions` terminations, in one statement
that re-checks the guard, so a session that became active since the plan survives; one
remediation per target at a time (`pg:<host:port>/<database>`, or `pg:<host:port>` for the
whole server: a Prefect global concurrency limit, `tasks.locks`, plus an advisory lock) and a
cooldown per target; optional approval gate. Approved or not, usage, cooldown and plan are
checked again in the lock and only sessions both approved and still matching are
terminated (none left: skipped, it says why); a run started by an alert first checks that
the alert still fires.

Undo: a terminated session cannot be revived; its client reconnects (pools do so by
themselves). A timeout change prints its exact undo statement in the artifact, built from
the value read once before the write. The artifact is published on every exit path.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Self

from prefect import get_run_logger
from prefect.variables import Variable
from pydantic import BaseModel, Field, field_validator, model_validator

from flows.common import (
    Report,
    alert_resolved,
    md_escape,
    publish_on_exit,
    request_approval,
    table,
    tag_run,
)
from flows.escalate import escalate_incident
from flows.pool_sizing import PoolSizeAction, SizingView, pool_sizing_report, raise_pool_size
from flows.report_text import age_text, guard_summary
from flows.spec import LockTarget, RunbookSpec, runbook_flow
from tasks.clients import pg_target
from tasks.errors import SafetyViolation
from tasks.locks import LOCK_TIMEOUT_S, pg_lock_target, target_lock
from tasks.postgres import (
    PgBouncerPool,
    PoolSnapshot,
    PoolUsage,
    TerminationGuard,
    TerminationPlan,
    TerminationResult,
    TimeoutChange,
    approved_and_matching,
    check_name,
    measure_pool_usage,
    plan_terminations,
    read_idle_in_transaction_timeout,
    remediation_lock,
    set_idle_in_transaction_timeout,
    show_pgbouncer_pools,
    survey_pool,
    terminate_sessions,
)
from tasks.settings import PgBouncerSettings, PostgresSettings

RUNBOOK = "db-pool-exhausted"
# A system-wide idle_in_transaction_session_timeout hits every role, the runbook's own
# maintenance jobs included: never below a minute, and only with a human's approval.
MIN_SYSTEM_TIMEOUT_S = 60


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
    timeout_scope: Literal["role", "system"] = Field(
        "role",
        description="`role` (default): ALTER ROLE `timeout_role` SET …; `system`: ALTER SYSTEM"
        f" (needs require_approval and at least {MIN_SYSTEM_TIMEOUT_S} s).",
    )
    timeout_role: str | None = Field(
        None, description="The role whose sessions get that timeout (timeout_scope `role`)."
    )
    require_approval: bool = Field(
        False, description="Pause for a human approval in the UI before acting."
    )
    approval_timeout_s: int = Field(
        1200, ge=10, le=86_400, description="Without an answer by then, nothing is done."
    )
    cooldown_minutes: float = Field(
        5.0, ge=0, le=1440, description="Refuse to act again on the same target within this."
    )
    lock_timeout_s: float = Field(
        LOCK_TIMEOUT_S,
        ge=1,
        le=3600,
        description="Wait at most this long for another run acting on the same target.",
    )
    raise_pool_size_to: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="Optional: set the backend's pool-size env var to this (at most the pool"
        " sizing cap) and restart it; needs dry_run off and require_approval on.",
    )
    requested_by: str = Field(
        "", max_length=200, description="Who asked for this run (name, alert); for the audit."
    )
    reason: str = Field("", max_length=2000, description="Why; recorded in the audit artifact.")

    @field_validator("timeout_role")
    @classmethod
    def _valid_role(cls, value: str | None) -> str | None:
        return check_name(value)

    @model_validator(mode="after")
    def _blast_radius(self) -> Self:
        """Floors and caps no parameter may cross, checked before anything runs."""
        settings = PostgresSettings()
        if self.guard.idle_minutes < settings.min_idle_minutes:
            raise ValueError(
                f"guard.idle_minutes must be at least {settings.min_idle_minutes:g}"
                " (RUNBOOKS_PG_MIN_IDLE_MINUTES)"
            )
        if self.guard.max_sessions > settings.max_sessions_cap:
            raise ValueError(
                f"guard.max_sessions must be at most {settings.max_sessions_cap}"
                " (RUNBOOKS_PG_MAX_SESSIONS_CAP)"
            )
        seconds = self.idle_in_transaction_timeout_s
        if seconds is None:
            return self
        if self.timeout_scope == "role":
            if not self.timeout_role:
                raise ValueError(
                    "timeout_role is required for a per-role timeout (timeout_scope 'role');"
                    " a system-wide one needs timeout_scope 'system'"
                )
        else:
            if self.timeout_role:
                raise ValueError("timeout_role must be unset with timeout_scope 'system'")
            if not self.require_approval:
                raise ValueError("a system-wide timeout (timeout_scope 'system') needs approval")
            if seconds < MIN_SYSTEM_TIMEOUT_S:
                raise ValueError(f"a system-wide timeout must be at least {MIN_SYSTEM_TIMEOUT_S} s")
        return self


class DbPoolOutcome(BaseModel):
    """What the run found and did."""

    action: Literal["none", "planned", "terminated", "skipped", "refused"]
    note: str
    before: PoolUsage
    after: PoolUsage | None
    plan: TerminationPlan = Field(description="The first plan (the one shown for approval).")
    replan: TerminationPlan | None = Field(
        None, description="After an approval: the plan again, on what is live now."
    )
    acted_on: TerminationPlan | None = Field(
        None, description="The sessions handed to the kill: approved and still matching."
    )
    result: TerminationResult | None
    timeout_change: TimeoutChange | None
    healthy: bool | None = Field(description="Usage below the healthy mark after acting.")
    pool_sizing: SizingView | None = Field(None, description="The pool sizing check.")
    pool_size_action: PoolSizeAction | None = Field(None, description="The pool-size raise.")


class PoolStillExhausted(Exception):
    """Verification failed: usage is still above the healthy mark after remediation."""


def lock_targets(params: DbPoolParams, settings: PostgresSettings | None = None) -> tuple[str, str]:
    """`(target, server)`: `pg:<host:port>/<database>`, or the server itself without a filter
    (`tasks.locks.pg_lock_target`)."""
    lock = pg_lock_target(settings or PostgresSettings(), params.guard.database)
    assert lock.within is not None  # a PostgreSQL target always sits within its server
    return lock.key, lock.within


def target_of(params: DbPoolParams) -> str:
    """The target a run of these parameters acts on (alerts for one target coalesce)."""
    return lock_targets(params)[0]


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


def _pgbouncer_pools() -> list[PgBouncerPool] | str:
    """PgBouncer's SHOW POOLS, or why not; no task run at all when PgBouncer is not set up."""
    if PgBouncerSettings().dsn is None:
        return []
    state = show_pgbouncer_pools(return_state=True)
    return state.result() if state.is_completed() else f"not read: {state.message}"


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


def _plan_md(plan: TerminationPlan, lead: str = "would be terminated") -> str:
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


def _replan_md(approved: TerminationPlan, fresh: TerminationPlan, both: TerminationPlan) -> str:
    keys = {(x.pid, x.backend_start) for x in both.sessions}
    fresh_keys = {(x.pid, x.backend_start) for x in fresh.sessions}
    gone = [x.pid for x in approved.sessions if (x.pid, x.backend_start) not in fresh_keys]
    new = [x.pid for x in fresh.sessions if (x.pid, x.backend_start) not in keys]
    return (
        _plan_md(fresh, "match the guard now")
        + f"\n\nApproved and still matching: **{len(both.sessions)}** session(s)"
        + (f"; approved but no longer matching (left alone): {gone}" if gone else "")
        + (f"; matching now but never approved (left alone): {new}" if new else "")
        + "."
    )


Action = Literal["none", "planned", "terminated", "skipped", "refused"]


SPEC: RunbookSpec[Any] = RunbookSpec(
    name=RUNBOOK,
    title="PostgreSQL connection pool",
    severity="critical",
    topic="database",
    lock=lambda p: LockTarget(*lock_targets(p)),
)


@runbook_flow(SPEC)
def db_pool_exhausted(params: DbPoolParams = DbPoolParams()) -> DbPoolOutcome:  # noqa: B008
    """Check the PostgreSQL pool, plan guarded terminations, act when allowed, verify."""
    target = pg_target(PostgresSettings())
    report = Report(RUNBOOK, f"PostgreSQL pool on {target}")
    outcome: list[DbPoolOutcome] = []

    def summary() -> str:
        action = outcome[0].action if outcome else "stopped"
        return f"{RUNBOOK} on {target}: {'nothing to do' if action == 'none' else action}"

    # The audit record is written on every path: done, refused, timed out or failed.
    with publish_on_exit(report, summary):
        result = _remediate(params, target, report)
        if params.raise_pool_size_to is not None:
            result.pool_size_action = raise_pool_size(
                params.raise_pool_size_to,
                dry_run=params.dry_run,
                require_approval=params.require_approval,
                approval_timeout_s=params.approval_timeout_s,
                report=report,
            )
        outcome.append(result)
        if result.healthy is False:
            usage = result.after or result.before
            done = (
                f"terminating {len(result.result.terminated)} session(s)"
                if result.result is not None
                else "finding no session the guard allows to terminate"
            )
            message = (
                f"{target}: usage still {usage.percent_used:.1f}% after {done};"
                " escalated (see the run's artifact)"
            )
            escalate_incident("critical", "database", message)
            raise PoolStillExhausted(message)
        return result


def _remediate(params: DbPoolParams, target: str, report: Report) -> DbPoolOutcome:
    logger = get_run_logger()
    source = tag_run(RUNBOOK)
    who = params.requested_by or source
    report.add(
        "Request",
        f"Requested by **{md_escape(who)}** (source: {source}); dry run: **{params.dry_run}**."
        + (f"\n\nReason: {md_escape(params.reason)}" if params.reason else ""),
    )

    survey = survey_pool(params.guard)
    snapshot, plan = survey.snapshot, survey.plan
    report.add("Findings", _findings_md(snapshot, _pgbouncer_pools()))
    sizing = pool_sizing_report(report, snapshot.usage)
    report.add("Plan", _plan_md(plan))
    before = snapshot.usage
    replan: TerminationPlan | None = None

    def finish(
        action: Action,
        note: str,
        *,
        after: PoolUsage | None = None,
        acted_on: TerminationPlan | None = None,
        result: TerminationResult | None = None,
        change: TimeoutChange | None = None,
        healthy: bool | None = None,
    ) -> DbPoolOutcome:
        report.add("Outcome", f"**{action}**: {note}")
        logger.info("%s: %s (%s)", target, action, note)
        return DbPoolOutcome(
            action=action,
            note=note,
            before=before,
            after=after,
            plan=plan,
            replan=replan,
            acted_on=acted_on,
            result=result,
            timeout_change=change,
            healthy=healthy,
            pool_sizing=sizing,
        )

    if params.dry_run:
        return finish("planned", "dry run: nothing changed. Re-run with dry_run off to act.")
    if before.percent_used < params.act_above_percent:
        return finish(
            "skipped",
            f"usage {before.percent_used:.1f}% is below act_above_percent "
            f"{params.act_above_percent:g}%: nothing changed.",
        )
    if not plan.sessions and not params.idle_in_transaction_timeout_s:
        # An empty plan asks nobody and takes no lock. Usage is over act_above_percent, so
        # it is judged as after acting: over the healthy mark fails the run (escalated), as
        # a run that terminated sessions without effect does.
        healthy = before.percent_used < params.healthy_below_percent
        report.add(
            "Verify",
            f"Nothing done: usage **{before.percent_used:.1f}%** ({before.client_connections});"
            f" healthy below {params.healthy_below_percent:g}%: **{'yes' if healthy else 'NO'}**.",
        )
        return finish(
            "none",
            "nothing to do: no session matches the guard, so nobody was asked and nothing changed.",
            healthy=healthy,
        )
    narrow, server = lock_targets(params)
    # Checked here so nobody is asked to approve a run that would refuse, and again in the lock.
    wait = _cooldown_left(narrow, params.cooldown_minutes)
    if wait is not None:
        return finish("refused", _cooldown_note(narrow, wait))
    if params.require_approval:
        timeout = params.idle_in_transaction_timeout_s
        decision = request_approval(
            f"Terminate {len(plan.sessions)} idle session(s) on {target}"
            + (
                f" and set idle_in_transaction_session_timeout={timeout}s ({_scope(params)})"
                if timeout
                else ""
            ),
            params.approval_timeout_s,
        )
        report.add("Approval", decision.line())
        if not decision.approved:
            return finish("refused", "not approved: nothing changed.")

    try:
        with (
            target_lock(narrow, within=server, timeout_s=params.lock_timeout_s) as waited,
            remediation_lock(f"{RUNBOOK} {narrow}"),
        ):
            report.add("Target lock", f"Held {md_escape(narrow)} (waited {waited:.1f} s).")
            # Whoever approved (a human or the route), the run may have waited for the approval
            # or for another run on the target, while sessions came and went: measure and plan
            # again, and act only on what was approved AND still matches.
            now = measure_pool_usage()
            replan = plan_terminations(params.guard)
            acted_on = approved_and_matching(plan, replan)
            report.add(
                "Plan after approval" if params.require_approval else "Plan under the lock",
                _replan_md(plan, replan, acted_on),
            )
            wait = _cooldown_left(narrow, params.cooldown_minutes)
            if wait is not None:
                return finish("refused", _cooldown_note(narrow, wait) + " (re-checked in the lock)")
            if now.percent_used < params.act_above_percent:
                return finish(
                    "skipped",
                    f"usage is now {now.percent_used:.1f}%, below act_above_percent "
                    f"{params.act_above_percent:g}%: nothing changed.",
                )
            if plan.sessions and not acted_on.sessions and not params.idle_in_transaction_timeout_s:
                return finish(
                    "skipped",
                    f"none of the {len(plan.sessions)} planned session(s) still matches after "
                    f"measuring again under the lock (waited {waited:.0f} s for it; another "
                    "run or the sessions' own end): nothing changed.",
                )
            # The run may have waited (approval, another run on the target): the last word.
            stale = alert_resolved(report)
            if stale is not None:
                return finish("skipped", stale)
            Variable.set(_cooldown_key(narrow), datetime.now(UTC).isoformat(), overwrite=True)
            result = terminate_sessions(acted_on)
            report.add("Done", _done_md(result))
            change: TimeoutChange | None = None
            if params.idle_in_transaction_timeout_s:
                role = params.timeout_role if params.timeout_scope == "role" else None
                # The previous value is read once, here; the write only gets it passed in.
                reading = read_idle_in_transaction_timeout(role)
                change = set_idle_in_transaction_timeout(
                    params.idle_in_transaction_timeout_s, reading
                )
                report.add(
                    "Prevention",
                    f"idle_in_transaction_session_timeout = {change.new} ({change.scope}); "
                    f"was {change.previous or 'not set'} (in effect: {reading.effective})."
                    f"\n\nUndo: `{change.undo_sql}`",
                )
    except SafetyViolation as exc:
        return finish("refused", f"{exc}. Nothing changed.", acted_on=None)

    after = measure_pool_usage()
    healthy = after.percent_used < params.healthy_below_percent
    report.add(
        "Verify",
        f"Before **{before.percent_used:.1f}%** ({before.client_connections}) → after "
        f"**{after.percent_used:.1f}%** ({after.client_connections}); healthy below "
        f"{params.healthy_below_percent:g}%: **{'yes' if healthy else 'NO'}**.",
    )
    return finish(
        "terminated",
        f"{len(result.terminated)} session(s) terminated; usage {after.percent_used:.1f}%.",
        after=after,
        acted_on=acted_on,
        result=result,
        change=change,
        healthy=healthy,
    )


def _scope(params: DbPoolParams) -> str:
    return f"role {params.timeout_role}" if params.timeout_scope == "role" else "SYSTEM-WIDE"


def _cooldown_note(target: str, wait: timedelta) -> str:
    return (
        f"a remediation ran on {target} recently; cooldown has {age_text(wait.total_seconds())}"
        " left. Nothing changed."
    )


def _done_md(result: TerminationResult) -> str:
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
