"""Runbook `db-pool-exhausted`: PostgreSQL connection pool exhausted ("too many connections").

Trigger: alert `DatabaseConnectionPoolExhausted`, the scheduled `pool-threshold` check, or by
hand from the Prefect UI.

Check: client connections by state, database and role against `max_connections` (reserved
superuser slots accounted), oldest transactions, idle-in-transaction sessions and their age,
PgBouncer `SHOW POOLS` when configured (read-only), the backend's pool sizing.

May change (one plan, asked once, on the driver `flows/driver.py`): terminates idle sessions
that pass every guard (client backends only, never this run's own session, never superusers
or protected roles, only the allowed idle states, idle for longer than N minutes, optional
database/role filter; approval unless `auto_approve`); optionally sets
`idle_in_transaction_session_timeout` per role (ALTER ROLE, the default; approval unless
`auto_approve`) or system-wide (ALTER SYSTEM + `pg_reload_conf()`, at least 60 s, always
approved by a human). With `raise_pool_size_to`: sets the backend's pool-size env var (at
most the pool sizing cap, flows/pool_sizing.py) and restarts the backend (always approved).

Safety limits: dry-run by default (the plan is the artifact); floors and caps in the
parameter model (idle >= 1 min, `max_sessions` <= the settings cap); acts only while usage is
at or above `act_above_percent` and outside the cooldown per target (both checked before
asking and again under the lock); at most `guard.max_sessions` terminations, in one
statement that re-checks the guard, so a session that became active since the plan
survives; one remediation per target at a time (`pg:<host:port>/<database>`, or
`pg:<host:port>` for the whole server: a Prefect global concurrency limit, `tasks.locks`,
plus an advisory lock; the backend Deployment's lock for a raise). Approved or not, usage,
cooldown and plan are checked again in the lock and only sessions both approved and still
matching are terminated (none left: skipped, it says why); a run started by an alert first
checks that the alert still fires.

Undo: a terminated session cannot be revived; its client reconnects (pools do so by
themselves). A timeout change records its exact undo statement in the artifact, built from
the value read once before the write; a raise records the exact previous env entry. The
artifact is published on every exit path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Literal, Self

from prefect.variables import Variable
from pydantic import BaseModel, Field, field_validator, model_validator

from flows.common import Report, md_escape
from flows.db_pool_report import findings_md, replan_md, sessions_md, terminated_md
from flows.driver import (
    Held,
    NotFixed,
    Runbook,
    RunResult,
    Stop,
    Verification,
    drive,
    needs_approval,
)
from flows.pool_sizing import (
    PoolSizeAction,
    RaisePoolSize,
    SizingView,
    backend_workload,
    measure_sizing,
    plan_raise,
    raise_md,
    sizing_md,
)
from flows.report_text import age_text, guard_summary
from flows.spec import (
    Action,
    ActionRecord,
    LockTarget,
    Outcome,
    RunbookParams,
    RunbookSpec,
    runbook_flow,
)
from tasks.clients import kube_configured, pg_target
from tasks.locks import LOCK_TIMEOUT_S, pg_lock_target, target_lock
from tasks.postgres import (
    PgBouncerPool,
    PoolUsage,
    TerminationGuard,
    TerminationPlan,
    TerminationResult,
    TimeoutChange,
    TimeoutReading,
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
# maintenance jobs included: never below a minute, and always with a human's approval.
MIN_SYSTEM_TIMEOUT_S = 60


class DbPoolParams(RunbookParams):
    """Parameters of the db-pool-exhausted runbook (the form in the UI's Run dialog)."""

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
        f" (at least {MIN_SYSTEM_TIMEOUT_S} s; always asks a human, auto_approve or not).",
    )
    timeout_role: str | None = Field(
        None, description="The role whose sessions get that timeout (timeout_scope `role`)."
    )
    cooldown_minutes: float = Field(
        5.0, ge=0, le=1440, description="Refuse to act again on the same target within this."
    )
    lock_timeout_s: float = Field(
        600.0,
        ge=1,
        le=3600,
        description="Wait at most this long for another run acting on the same target.",
    )
    raise_pool_size_to: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="Optional: set the backend's pool-size env var to this (at most the pool"
        " sizing cap) and restart it; always asks a human, in the run's one approval.",
    )

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
            # No approval flag to check: the system-wide change is an `always` action.
            if seconds < MIN_SYSTEM_TIMEOUT_S:
                raise ValueError(f"a system-wide timeout must be at least {MIN_SYSTEM_TIMEOUT_S} s")
        return self


class DbPoolOutcome(BaseModel):
    """What the run found and did."""

    outcome: Outcome
    note: str
    before: PoolUsage
    after: PoolUsage | None
    plan: TerminationPlan = Field(description="The first plan (the one shown for approval).")
    replan: TerminationPlan | None = Field(
        None, description="Under the lock: the plan again, on what is live now."
    )
    acted_on: TerminationPlan | None = Field(
        None, description="The sessions handed to the kill: approved and still matching."
    )
    result: TerminationResult | None
    timeout_change: TimeoutChange | None
    healthy: bool | None = Field(description="Usage below the healthy mark after acting.")
    pool_sizing: SizingView | None = Field(None, description="The pool sizing check.")
    pool_size_action: PoolSizeAction | None = Field(None, description="The pool-size raise.")


class PoolStillExhausted(NotFixed):
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


SPEC: RunbookSpec[DbPoolParams] = RunbookSpec(
    name=RUNBOOK,
    title="PostgreSQL connection pool",
    severity="critical",
    topic="database",
    lock=lambda p: LockTarget(*lock_targets(p)),
)


# ------------------------------------------------------------------------------ actions

TERMINATE = "terminate-sessions"
SET_TIMEOUT = "set-idle-in-transaction-timeout"


class TerminateSessions(Action):
    """End the planned sessions that still match the guard, in one statement (never retried)."""

    kind: str = TERMINATE
    plan: TerminationPlan
    #: Filled by `apply`.
    result: TerminationResult | None = None

    def undo(self) -> str:
        return "none: a terminated session cannot be revived; its client reconnects."

    def apply(self) -> ActionRecord:
        self.result = terminate_sessions(self.plan)
        return ActionRecord(
            kind=self.kind,
            target=self.target,
            before=f"{len(self.plan.sessions)} session(s) planned",
            after=f"{len(self.result.terminated)} terminated",
            message=f"spared {len(self.result.spared_pids)} no longer matching the guard",
        )


class SetIdleTimeout(Action):
    """Set `idle_in_transaction_session_timeout` for a role or system-wide."""

    kind: str = SET_TIMEOUT
    seconds: int
    role: str | None
    #: The value read once before the write (by `undo`, right before `apply`), and the write.
    reading: TimeoutReading | None = None
    change: TimeoutChange | None = None

    def _read(self) -> TimeoutReading:
        if self.reading is None:
            self.reading = read_idle_in_transaction_timeout(self.role)
        return self.reading

    def undo(self) -> str:
        # The previous value is read once, here; the write only gets it passed in, so a
        # retried write still records what was there before the first attempt.
        r = self._read()
        return (
            f"idle_in_transaction_session_timeout ({md_escape(r.scope)}) was"
            f" {md_escape(r.previous or 'not set')} (in effect: {md_escape(r.effective)})."
            f"\n\nUndo: `{r.undo_sql}`"
        )

    def apply(self) -> ActionRecord:
        self.change = change = set_idle_in_transaction_timeout(self.seconds, self._read())
        return ActionRecord(
            kind=self.kind,
            target=self.target,
            before=change.previous or "not set",
            after=change.new,
            message="already in place" if change.already_set else "set",
            undo=change.undo_sql,
        )


# ------------------------------------------------------------------------------ findings


class PoolFindings(BaseModel):
    """What one measurement saw: usage, the guard's plan, the sizing and the raise."""

    usage: PoolUsage
    sessions: TerminationPlan
    sizing: SizingView | None = None
    pool_raise: RaisePoolSize | None = None
    #: Measured under the lock (after an approval or a wait), not at the start.
    remeasured: bool = False
    #: Under the lock: why an approved action did not go on, by kind.
    dropped: dict[str, str] = Field(default_factory=dict)


def _pgbouncer_pools() -> list[PgBouncerPool] | str:
    """PgBouncer's SHOW POOLS, or why not; no task run at all when PgBouncer is not set up."""
    if PgBouncerSettings().dsn is None:
        return []
    state = show_pgbouncer_pools(return_state=True)
    return state.result() if state.is_completed() else f"not read: {state.message}"


def _db_actions(params: DbPoolParams, findings: PoolFindings) -> bool:
    """Whether these findings call for a database change (terminations or a timeout)."""
    return bool(findings.sessions.sessions) or bool(params.idle_in_transaction_timeout_s)


def _cooldown_note(target: str, wait: timedelta) -> str:
    return (
        f"a remediation ran on {target} recently; cooldown has {age_text(wait.total_seconds())}"
        " left. Nothing changed."
    )


# ------------------------------------------------------------------------------ the runbook


class DbPoolRunbook(Runbook[DbPoolParams, PoolFindings]):
    """Check the pool, plan guarded terminations (and the timeout, the raise), verify usage."""

    spec = SPEC
    not_fixed = PoolStillExhausted

    def __init__(self) -> None:
        #: The first findings: the plan the approval (or the route) agreed to.
        self.first: PoolFindings | None = None

    def title(self, params: DbPoolParams) -> str:
        return f"PostgreSQL pool on {pg_target(PostgresSettings())}"

    def check(self, params: DbPoolParams, report: Report) -> PoolFindings:
        survey = survey_pool(params.guard)
        report.add("Findings", findings_md(survey.snapshot, _pgbouncer_pools()))
        # The report's read is tried once (an unreachable API costs one timeout); a raise
        # that depends on it uses the retry policy.
        wanted = params.raise_pool_size_to
        view = measure_sizing(survey.snapshot.usage, retry=wanted is not None)
        report.add("Pool sizing", sizing_md(view))
        report.add("Sessions to terminate", sessions_md(survey.plan))
        findings = PoolFindings(
            usage=survey.snapshot.usage,
            sessions=survey.plan,
            sizing=view,
            pool_raise=None if wanted is None else plan_raise(wanted, view),
        )
        self.first = findings
        return findings

    def plan(self, params: DbPoolParams, findings: PoolFindings) -> list[Action]:
        narrow, server = lock_targets(params)
        actions: list[Action] = []
        if findings.sessions.sessions:
            actions.append(
                TerminateSessions(
                    target=narrow,
                    summary=f"{len(findings.sessions.sessions)} idle session(s) matching the"
                    f" guard ({guard_summary(params.guard)})",
                    plan=findings.sessions,
                )
            )
        seconds = params.idle_in_transaction_timeout_s
        if seconds:
            role = params.timeout_role if params.timeout_scope == "role" else None
            actions.append(
                SetIdleTimeout(
                    target=f"{server} role {role}" if role else f"{server} SYSTEM-WIDE",
                    summary=f"set idle_in_transaction_session_timeout={seconds}s",
                    # One role's sessions: the route or auto_approve may say yes; every role
                    # (the runbook's own jobs included): a human, always.
                    approval="unless-auto" if role else "always",
                    seconds=seconds,
                    role=role,
                )
            )
        if findings.pool_raise is not None and not findings.pool_raise.already_set:
            actions.append(findings.pool_raise)
        return actions

    def refuse(self, params: DbPoolParams, findings: PoolFindings) -> Stop | None:
        # Cooldown and act_above_percent are about the database changes: a run whose only
        # action is the pool-size raise is not held back by them (its own checks apply).
        if not _db_actions(params, findings) and params.raise_pool_size_to is not None:
            return None
        narrow = lock_targets(params)[0]
        again = " (re-checked in the lock)" if findings.remeasured else ""
        wait = _cooldown_left(narrow, params.cooldown_minutes)
        if wait is not None:
            return Stop("refused", _cooldown_note(narrow, wait) + again)
        usage = findings.usage.percent_used
        if usage < params.act_above_percent:
            return Stop(
                "skipped",
                f"usage {'is now ' if findings.remeasured else ''}{usage:.1f}%, below"
                f" act_above_percent {params.act_above_percent:g}%: nothing changed.",
            )
        return None

    def remeasure(self, params: DbPoolParams, report: Report) -> PoolFindings:
        # Whoever approved, the run may have waited, while sessions came and went: usage and
        # the guard's plan again (and the sizing, for a raise), not the whole survey.
        usage = measure_pool_usage()
        fresh = PoolFindings(usage=usage, sessions=plan_terminations(params.guard), remeasured=True)
        if params.raise_pool_size_to is not None:
            fresh.sizing = measure_sizing(usage)
            fresh.pool_raise = plan_raise(params.raise_pool_size_to, fresh.sizing)
        first = self.first.sessions if self.first else fresh.sessions
        doable = [a for a in self.plan(params, self.first or fresh) if a.possible]
        asked = needs_approval(doable, params.auto_approve)
        report.add(
            "Plan after approval" if asked else "Plan under the lock",
            f"Usage is now **{usage.percent_used:.1f}%** ({usage.client_connections}).\n\n"
            + replan_md(first, fresh.sessions, approved_and_matching(first, fresh.sessions)),
        )
        return fresh

    def still_valid(
        self,
        params: DbPoolParams,
        approved: list[Action],
        fresh: list[Action],
        findings: PoolFindings,
        now: PoolFindings,
    ) -> list[Action] | Stop:
        acting: list[Action] = []
        for old in approved:
            new = next((a for a in fresh if a.possible and a.same_as(old)), None)
            if isinstance(old, TerminateSessions):
                both = approved_and_matching(old.plan, now.sessions)
                if both.sessions:
                    acting.append(old.model_copy(update={"plan": both}))
                else:
                    now.dropped[old.kind] = (
                        f"none of the {len(old.plan.sessions)} planned session(s) still matches"
                        " after measuring again under the lock (another run or the sessions'"
                        " own end)"
                    )
            elif new is not None:
                acting.append(new)
            else:
                now.dropped[old.kind] = _why_dropped(old, now)
        if acting:
            return acting
        return Stop("skipped", "; ".join(now.dropped.values()) + ": nothing changed.")

    @contextmanager
    def hold(self, params: DbPoolParams, report: Report) -> Iterator[Held]:
        narrow, server = lock_targets(params)
        with ExitStack() as stack:
            waited = stack.enter_context(
                target_lock(narrow, within=server, timeout_s=params.lock_timeout_s)
            )
            # For runs of another Prefect installation: they refuse.
            stack.enter_context(remediation_lock(f"{RUNBOOK} {narrow}"))
            report.add("Target lock", f"Held {md_escape(narrow)} (waited {waited:.1f} s).")
            if params.raise_pool_size_to is not None and kube_configured():
                # One change to the backend at a time (high-error-rate's rollbacks too).
                workload = backend_workload()
                more = stack.enter_context(target_lock(workload, timeout_s=LOCK_TIMEOUT_S))
                report.add("Pool size lock", f"Held {md_escape(workload)} (waited {more:.1f} s).")
                waited += more
            yield Held(waited_s=waited)

    def act(
        self, params: DbPoolParams, actions: list[Action], report: Report, held: Held
    ) -> list[ActionRecord]:
        if any(a.kind in (TERMINATE, SET_TIMEOUT) for a in actions):
            key = _cooldown_key(lock_targets(params)[0])
            Variable.set(key, datetime.now(UTC).isoformat(), overwrite=True)
        records = super().act(params, actions, report, held)
        for action in actions:
            if isinstance(action, TerminateSessions) and action.result is not None:
                report.add("Terminated", terminated_md(action.result))
            elif isinstance(action, SetIdleTimeout) and action.change is not None:
                c = action.change
                report.add(
                    "Prevention",
                    f"idle_in_transaction_session_timeout = {c.new} ({md_escape(c.scope)}); was"
                    f" {md_escape(c.previous or 'not set')}.\n\nUndo: `{c.undo_sql}`",
                )
            elif isinstance(action, RaisePoolSize):
                report.add("Pool size action", raise_md(action))
        return records

    def verify(
        self,
        params: DbPoolParams,
        findings: PoolFindings,
        records: list[ActionRecord],
        report: Report,
    ) -> Verification | None:
        return _verify(params, findings, records, report)

    def not_fixed_message(self, params: DbPoolParams, verification: Verification) -> str:
        target = pg_target(PostgresSettings())
        return f"{target}: {verification.summary}; escalated (see the run's artifact)"


class PoolVerification(Verification):
    """The verification with the usage measured after acting (None: judged on the first)."""

    after: PoolUsage | None = None


def _verify(
    params: DbPoolParams, findings: PoolFindings, records: list[ActionRecord], report: Report
) -> PoolVerification | None:
    """Usage against the healthy mark: after acting, or (nothing done) as first measured."""
    healthy_below = params.healthy_below_percent
    if not records:
        before = findings.usage
        if before.percent_used < params.act_above_percent:
            report.add(
                "Verify",
                f"Nothing done: usage **{before.percent_used:.1f}%** is below act_above_percent"
                f" {params.act_above_percent:g}%.",
            )
            return None
        # Usage is over act_above_percent, so it is judged as after acting: over the healthy
        # mark fails the run (escalated), as a run that terminated sessions without effect does.
        healthy = before.percent_used < healthy_below
        report.add(
            "Verify",
            f"Nothing done: usage **{before.percent_used:.1f}%** ({before.client_connections});"
            f" healthy below {healthy_below:g}%: **{'yes' if healthy else 'NO'}**.",
        )
        done = "finding no session the guard allows to terminate"
        return PoolVerification(
            healthy=healthy, summary=f"usage still {before.percent_used:.1f}% after {done}"
        )
    before, after = findings.usage, measure_pool_usage()
    healthy = after.percent_used < healthy_below
    report.add(
        "Verify",
        f"Before **{before.percent_used:.1f}%** ({before.client_connections}) → after "
        f"**{after.percent_used:.1f}%** ({after.client_connections}); healthy below "
        f"{healthy_below:g}%: **{'yes' if healthy else 'NO'}**.",
    )
    ended = sum(int(r.after.split()[0]) for r in records if r.kind == TERMINATE)
    return PoolVerification(
        healthy=healthy,
        summary=f"usage {'' if healthy else 'still '}{after.percent_used:.1f}% after"
        f" terminating {ended} session(s)",
        after=after,
    )


def _why_dropped(old: Action, now: PoolFindings) -> str:
    """Why an approved action (not the terminations) no longer holds under the lock."""
    fresh = now.pool_raise
    if isinstance(old, RaisePoolSize) and fresh is not None:
        if not fresh.possible:
            return f"the pool-size raise, planned again under the lock: {fresh.summary}"
        return (
            f"the pool-size raise: the entry changed while waiting for approval"
            f" ({old.change.previous if old.change else None} -> "
            f"{fresh.change.previous if fresh.change else None})"
        )
    return f"{old.describe()}: no longer planned"


# ------------------------------------------------------------------------------ the flow


@runbook_flow(SPEC)
def db_pool_exhausted(params: DbPoolParams = DbPoolParams()) -> DbPoolOutcome:  # noqa: B008
    """Check the PostgreSQL pool, plan guarded terminations, act when allowed, verify."""
    # The driver publishes the report on every path, escalates and fails when not fixed.
    return _outcome(params, drive(DbPoolRunbook(), params))


def _outcome(params: DbPoolParams, result: RunResult[PoolFindings]) -> DbPoolOutcome:
    """The flow's return value from what the driver saw and did."""
    term = next((a for a in result.acted_on if isinstance(a, TerminateSessions)), None)
    timeout = next((a for a in result.acted_on if isinstance(a, SetIdleTimeout)), None)
    verification = result.verification
    return DbPoolOutcome(
        outcome=result.outcome,
        note=result.note,
        before=result.findings.usage,
        after=verification.after if isinstance(verification, PoolVerification) else None,
        plan=result.findings.sessions,
        replan=result.fresh.sessions if result.fresh else None,
        acted_on=term.plan if term else None,
        result=term.result if term else None,
        timeout_change=timeout.change if timeout else None,
        healthy=verification.healthy if verification else None,
        pool_sizing=result.findings.sizing,
        pool_size_action=_raise_outcome(params, result),
    )


def _raise_outcome(params: DbPoolParams, result: RunResult[PoolFindings]) -> PoolSizeAction | None:
    """What became of the pool-size raise, in the run's words."""
    first = result.findings.pool_raise
    if params.raise_pool_size_to is None or first is None:
        return None
    cap = first.cap
    if first.already_set:
        return PoolSizeAction(
            outcome="nothing to do", note=f"nothing to do: {first.summary}.", cap_before=cap
        )
    if not first.possible:
        return PoolSizeAction(
            outcome="refused", note=f"{first.summary}; nothing changed.", cap_before=cap
        )
    done = next((a for a in result.acted_on if isinstance(a, RaisePoolSize)), None)
    if done is not None and done.result is not None:
        return PoolSizeAction(
            outcome="acted",
            note=f"{done.result.env} {done.result.before} -> {done.result.after} (cap"
            f" {done.cap}); {done.restart.message if done.restart else 'not restarted'}.",
            cap_before=cap,
            cap_after_approval=done.cap,
            change=done.result,
            restart=done.restart,
        )
    fresh = result.fresh
    dropped = fresh.dropped.get(first.kind) if fresh else None
    if dropped is not None:
        again = fresh.pool_raise.cap if fresh and fresh.pool_raise else None
        return PoolSizeAction(
            outcome="skipped",
            note=f"{dropped}; nothing changed.",
            cap_before=cap,
            cap_after_approval=again,
        )
    if result.outcome == "planned":
        note = f"dry run: would {first.summary} (server dry run: {first.dry_run_result or '-'})"
        return PoolSizeAction(outcome="planned", note=note, cap_before=cap)
    outcome = "skipped" if result.outcome == "acted" else result.outcome
    return PoolSizeAction(outcome=outcome, note=result.note, cap_before=cap)


# ------------------------------------------------------------------------------ cooldown


def _cooldown_key(target: str) -> str:
    return "cooldown_db_pool_" + hashlib.sha256(target.encode()).hexdigest()[:16]


def _cooldown_left(target: str, minutes: float) -> timedelta | None:
    last = Variable.get(_cooldown_key(target), default=None)
    if not last or minutes <= 0:
        return None
    left = datetime.fromisoformat(str(last)) + timedelta(minutes=minutes) - datetime.now(UTC)
    return left if left > timedelta(0) else None
