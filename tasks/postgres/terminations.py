"""Terminate idle sessions: the guard, the plan, the kill.

The termination guard (docs/postgres.md, "The guard") is one SQL predicate, `GUARD_SQL`, used
both to plan and to kill: the kill statement re-evaluates it on live `pg_stat_activity` rows, so a
session that turned active (or whose pid was reused by a new backend) since the plan survives.
`is_terminable` is the same predicate in Python, kept equal to the SQL by a property test.
"""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg.rows import DictRow
from pydantic import BaseModel, Field, field_validator

from tasks.clients import pg_connect, pg_target
from tasks.errors import SafetyViolation
from tasks.logs import run_logger
from tasks.postgres.common import IDLE_STATES, IdleState, check_name
from tasks.retry import RETRY_READ
from tasks.settings import PostgresSettings


class TerminationGuard(BaseModel):
    """Which sessions may be terminated. Every condition must hold, re-checked at kill time."""

    states: list[IdleState] = Field(
        default_factory=lambda: list(IDLE_STATES),
        min_length=1,
        description="Only sessions in these idle states; active sessions are never touched.",
    )
    # Defaults stay inside the operator's floor and cap (settings), so the default
    # parameters are always valid; the runbook's parameter model enforces both.
    idle_minutes: float = Field(
        default_factory=lambda: max(10.0, PostgresSettings().min_idle_minutes),
        gt=0,
        le=7 * 24 * 60,
        description="Only sessions idle for longer than this (minutes; default 10).",
    )
    database: str | None = Field(None, description="Only sessions on this database.")
    username: str | None = Field(None, description="Only sessions of this role.")
    protected_roles: list[str] = Field(
        default_factory=list, description="Roles never terminated (besides superusers)."
    )
    max_sessions: int = Field(
        default_factory=lambda: min(50, PostgresSettings().max_sessions_cap),
        ge=1,
        le=5000,
        description="At most this many per run (default 50).",
    )

    @field_validator("database", "username")
    @classmethod
    def _valid_name(cls, value: str | None) -> str | None:
        return check_name(value)


class Session(BaseModel):
    """One row of `pg_stat_activity` as the guard sees it."""

    pid: int
    backend_start: datetime
    backend_type: str
    usename: str | None
    datname: str | None
    state: str | None
    state_change: datetime | None
    rolsuper: bool
    is_self: bool = False
    application_name: str = ""
    client_addr: str | None = None

    def idle_s(self, now: datetime) -> float | None:
        return None if self.state_change is None else (now - self.state_change).total_seconds()


class TerminationPlan(BaseModel):
    """The sessions a run would terminate, chosen by the guard, oldest idle first."""

    target: str
    guard: TerminationGuard
    planned_at: datetime
    sessions: list[Session]
    more_than_cap: bool = Field(description="More sessions matched than `max_sessions`.")


class TerminationResult(BaseModel):
    """What the kill statement did: terminated pids and the planned ones it spared."""

    target: str
    terminated: list[Session]
    spared_pids: list[int] = Field(description="Planned but no longer matching the guard.")
    failed_pids: list[int] = Field(description="pg_terminate_backend returned false.")
    elapsed_s: float


# ---------------------------------------------------------------------------------------------
# The guard: one predicate, SQL and Python.

SESSIONS_SQL = """
    SELECT a.pid, a.backend_start, a.backend_type, a.usename::text AS usename,
           a.datname::text AS datname, a.state, a.state_change,
           coalesce(r.rolsuper, true) AS rolsuper, a.pid = pg_backend_pid() AS is_self,
           coalesce(a.application_name, '') AS application_name,
           host(a.client_addr) AS client_addr
      FROM pg_stat_activity a
      LEFT JOIN pg_roles r ON r.oid = a.usesysid
"""

# Unknown role (no pg_roles row) counts as superuser above: when in doubt, spare it.
GUARD_SQL = """
        s.backend_type = 'client backend'
    AND NOT s.is_self
    AND NOT s.rolsuper
    AND s.usename IS NOT NULL
    AND NOT (s.usename = ANY(%(protected)s::text[]))
    AND s.state = ANY(%(states)s::text[])
    AND s.state_change < now() - make_interval(secs => %(idle_s)s::float8)
    AND (%(datname)s::text IS NULL OR s.datname = %(datname)s::text)
    AND (%(usename)s::text IS NULL OR s.usename = %(usename)s::text)
"""


def guard_params(guard: TerminationGuard, settings: PostgresSettings) -> dict[str, object]:
    """Bind values for `GUARD_SQL`; protected roles = settings' list + the run's list."""
    return {
        "protected": sorted(set(settings.protected_roles) | set(guard.protected_roles)),
        "states": list(guard.states),
        "idle_s": guard.idle_minutes * 60.0,
        "datname": guard.database,
        "usename": guard.username,
    }


def is_terminable(s: Session, guard: TerminationGuard, protected: set[str], now: datetime) -> bool:
    """The guard in Python, equal to `GUARD_SQL` (a property test holds them together)."""
    idle = s.idle_s(now)
    return (
        s.backend_type == "client backend"
        and not s.is_self
        and not s.rolsuper
        and s.usename is not None
        and s.usename not in protected
        and s.state in guard.states
        and idle is not None
        and idle > guard.idle_minutes * 60.0
        and (guard.database is None or s.datname == guard.database)
        and (guard.username is None or s.usename == guard.username)
    )


def plan_on(
    conn: psycopg.Connection[DictRow], guard: TerminationGuard, settings: PostgresSettings
) -> TerminationPlan:
    """Run the guard on live `pg_stat_activity` over `conn` (no side effects)."""
    params = guard_params(guard, settings) | {"cap": guard.max_sessions + 1}
    now = conn.execute("SELECT now() AS now").fetchone()
    rows = conn.execute(
        f"SELECT s.* FROM ({SESSIONS_SQL}) s WHERE {GUARD_SQL}"  # noqa: S608 - constant SQL, values bound
        " ORDER BY s.state_change, s.pid LIMIT %(cap)s",
        params,
    ).fetchall()
    sessions = [Session.model_validate(r) for r in rows]
    return TerminationPlan(
        target=pg_target(settings),
        guard=guard,
        planned_at=now["now"] if now else datetime.now(UTC),
        sessions=sessions[: guard.max_sessions],
        more_than_cap=len(sessions) > guard.max_sessions,
    )


def select_sessions(
    guard: TerminationGuard, settings: PostgresSettings | None = None
) -> TerminationPlan:
    """Run the guard on live `pg_stat_activity` and return the plan (no side effects)."""
    settings = settings or PostgresSettings()
    with pg_connect(settings) as conn:
        return plan_on(conn, guard, settings)


def log_plan(plan: TerminationPlan) -> None:
    """Log how many sessions the plan holds (for `plan_terminations` and `survey_pool`)."""
    run_logger().info(
        "%s: %d session(s) match the guard%s",
        plan.target,
        len(plan.sessions),
        " (cap reached)" if plan.more_than_cap else "",
    )


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="plan-terminations-{guard.database}")
def plan_terminations(guard: TerminationGuard) -> TerminationPlan:
    """List the sessions the guard allows to terminate, oldest idle first, capped."""
    plan = select_sessions(guard)
    log_plan(plan)
    return plan


def approved_and_matching(approved: TerminationPlan, fresh: TerminationPlan) -> TerminationPlan:
    """The sessions both approved (first plan) and matching the guard now (fresh plan).

    Matched by `(pid, backend_start)`: a pid reused by a new backend is a different session.
    """
    keys = {(s.pid, s.backend_start) for s in approved.sessions}
    both = [s for s in fresh.sessions if (s.pid, s.backend_start) in keys]
    return TerminationPlan(
        target=fresh.target,
        guard=approved.guard,
        planned_at=fresh.planned_at,
        sessions=both,
        more_than_cap=False,
    )


def kill_planned(
    plan: TerminationPlan, settings: PostgresSettings | None = None
) -> TerminationResult:
    """Terminate the planned sessions still matching the guard, in one statement."""
    settings = settings or PostgresSettings()
    if len(plan.sessions) > plan.guard.max_sessions:
        raise SafetyViolation(
            f"plan holds {len(plan.sessions)} sessions, over the cap of {plan.guard.max_sessions}"
        )
    if not plan.sessions:
        return TerminationResult(
            target=plan.target, terminated=[], spared_pids=[], failed_pids=[], elapsed_s=0.0
        )
    params = guard_params(plan.guard, settings) | {
        "pids": [s.pid for s in plan.sessions],
        "starts": [s.backend_start for s in plan.sessions],
        "cap": plan.guard.max_sessions,
    }
    # MATERIALIZED: the guard and the cap are applied before any pg_terminate_backend call;
    # (pid, backend_start) pairs make sure a pid reused by a new backend is not hit.
    statement = f"""
        WITH planned AS (
            SELECT * FROM unnest(%(pids)s::int[], %(starts)s::timestamptz[]) AS p(pid, started)
        ), targets AS MATERIALIZED (
            SELECT s.* FROM ({SESSIONS_SQL}) s
              JOIN planned p ON p.pid = s.pid AND p.started = s.backend_start
             WHERE {GUARD_SQL}
             ORDER BY s.state_change, s.pid
             LIMIT %(cap)s
        )
        SELECT t.*, pg_terminate_backend(t.pid) AS terminated FROM targets t
    """  # noqa: S608 - constant SQL, values bound
    with pg_connect(settings) as conn:
        started = datetime.now(UTC)
        rows = conn.execute(statement, params).fetchall()
        elapsed = (datetime.now(UTC) - started).total_seconds()
    killed = [Session.model_validate(r) for r in rows if r["terminated"]]
    failed = [int(r["pid"]) for r in rows if not r["terminated"]]
    hit = {int(r["pid"]) for r in rows}
    return TerminationResult(
        target=plan.target,
        terminated=killed,
        spared_pids=[s.pid for s in plan.sessions if s.pid not in hit],
        failed_pids=failed,
        elapsed_s=round(elapsed, 4),
    )


# retries=0 spelled out: a termination is not idempotent (never retried automatically).
@task(retries=0, cache_policy=NO_CACHE, task_run_name="terminate-sessions-{plan.target}")
def terminate_sessions(plan: TerminationPlan) -> TerminationResult:
    """Terminate the planned sessions that still match the guard, in one statement."""
    # Not retried: a retry after an unknown outcome would re-plan nothing but could confuse
    # the audit; the flow re-measures instead and a human decides on a second pass.
    result = kill_planned(plan)
    logger = run_logger()
    logger.warning(
        "%s: terminated %d session(s), spared %d that no longer matched the guard",
        result.target,
        len(result.terminated),
        len(result.spared_pids),
    )
    for s in result.terminated:
        logger.warning("terminated pid=%d role=%s database=%s", s.pid, s.usename, s.datname)
    return result
