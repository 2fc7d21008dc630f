"""PostgreSQL actions: measure connection usage, plan and terminate idle sessions, set timeouts.

The termination guard (docs/postgres.md, "The guard") is one SQL predicate, `GUARD_SQL`, used
both to plan and to kill: the kill statement re-evaluates it on live `pg_stat_activity` rows, so a
session that turned active (or whose pid was reused by a new backend) since the plan survives.
`is_terminable` is the same predicate in Python, kept equal to the SQL by a property test.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Literal

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import DictRow
from pydantic import BaseModel, Field, SecretStr, field_validator

from tasks.clients import classify_pg_error, pg_connect, pg_dsn, pg_target
from tasks.errors import PermanentError, RunbookError, SafetyViolation
from tasks.logs import run_logger
from tasks.retry import RETRY_IDEMPOTENT_WRITE, RETRY_READ
from tasks.settings import PgBouncerSettings, PostgresSettings

IdleState = Literal["idle", "idle in transaction", "idle in transaction (aborted)"]
IDLE_STATES: tuple[IdleState, ...] = (
    "idle",
    "idle in transaction",
    "idle in transaction (aborted)",
)

# A SQL identifier we accept for role/database names passed from forms or alerts.
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$.-]{0,62}$")


def check_name(value: str | None) -> str | None:
    """The name unchanged when it is a plain PostgreSQL name (or None); else ValueError."""
    if value is not None and not _NAME.match(value):
        raise ValueError(f"not a valid PostgreSQL name: {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Models


class CountBy(BaseModel):
    """A number of client connections sharing one key (a state, a database or a role)."""

    key: str
    count: int


class LongTransaction(BaseModel):
    """A session with an open transaction, oldest first."""

    pid: int
    usename: str | None
    datname: str | None
    state: str | None
    xact_age_s: float
    state_age_s: float | None
    query: str = Field(description="Query text with string literals masked, truncated.")


class PoolUsage(BaseModel):
    """Client connections against `max_connections`, with the slots reserved for superusers."""

    taken_at: datetime
    target: str
    max_connections: int
    superuser_reserved: int
    reserved: int = Field(description="`reserved_connections` (PostgreSQL 16+), else 0.")
    client_connections: int
    percent_used: float = Field(description="client connections / max_connections * 100")
    free_for_applications: int = Field(
        description="Slots an ordinary role can still take (reserved slots excluded)."
    )
    by_state: list[CountBy]
    by_database: list[CountBy]
    by_user: list[CountBy]


class PoolSnapshot(BaseModel):
    """Everything the pool check finds: usage, long transactions, idle-in-transaction ages."""

    usage: PoolUsage
    long_transactions: list[LongTransaction]
    idle_in_transaction: list[LongTransaction]


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


class TimeoutReading(BaseModel):
    """`idle_in_transaction_session_timeout` as found before a change: what undo restores."""

    target: str
    role: str | None = Field(description="The role; None = system-wide (ALTER SYSTEM).")
    scope: str = Field(description="`system` or `role:<name>`")
    previous: str | None = Field(
        description="The value ALTER SYSTEM / ALTER ROLE had set before; None = none set."
    )
    effective: str = Field(description="The value in effect for new sessions when read.")
    undo_sql: str


class TimeoutChange(BaseModel):
    """A change of `idle_in_transaction_session_timeout`, with what it replaced (for undo)."""

    target: str
    scope: str = Field(description="`system` or `role:<name>`")
    previous: str | None
    new: str
    undo_sql: str
    already_set: bool = Field(
        False, description="The value was already in place (e.g. a retry after a lost reply)."
    )


class PgBouncerPool(BaseModel):
    """One line of PgBouncer's `SHOW POOLS`."""

    database: str
    user: str
    cl_active: int
    cl_waiting: int
    sv_active: int
    sv_idle: int
    sv_used: int
    maxwait_s: float


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


_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\x80-\uffff][A-Za-z0-9_\x80-\uffff]*)?\$")
_IDENT_CHAR = re.compile(r"[A-Za-z0-9_$\x80-\uffff]")


def _mask_literals(query: str) -> str:
    """Replace every literal and comment body with `…`, the way PostgreSQL's lexer sees them.

    Handled: '…' (with '' inside), E'…' (backslash escapes), $$…$$ and $tag$…$tag$, "quoted
    identifiers" (kept), -- and /* */ comments (bodies masked: a quote in a comment must not
    flip what counts as inside a literal). An unterminated literal is masked to the end.
    """
    out: list[str] = []
    i, n = 0, len(query)
    while i < n:
        c = query[i]
        prev_ident = i > 0 and bool(_IDENT_CHAR.match(query[i - 1]))
        if c == "'" or (c in "eE" and query[i + 1 : i + 2] == "'" and not prev_ident):
            escapes = c != "'"
            j = i + (2 if escapes else 1)
            while j < n:
                if escapes and query[j] == "\\":
                    j += 2
                elif query[j] == "'":
                    if query[j + 1 : j + 2] == "'":
                        j += 2
                    else:
                        break
                else:
                    j += 1
            out.append(("E" if escapes else "") + "'…'")
            i = j + 1
        elif c == "$" and not prev_ident and (tag := _DOLLAR_TAG.match(query, i)):
            end = query.find(tag.group(), tag.end())
            out.append(f"{tag.group()}…{tag.group()}")
            i = n if end < 0 else end + len(tag.group())
        elif c == '"':
            end = query.find('"', i + 1)
            end = n - 1 if end < 0 else end
            out.append(query[i : end + 1])
            i = end + 1
        elif query.startswith("--", i):
            end = query.find("\n", i)
            out.append("--…\n")
            i = n if end < 0 else end + 1
        elif query.startswith("/*", i):
            end = query.find("*/", i + 2)
            out.append("/*…*/")
            i = n if end < 0 else end + 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def redact_query(query: str | None, limit: int = 160) -> str:
    """Mask literals and comments (they may hold passwords), squeeze blanks, truncate."""
    if not query:
        return ""
    masked = re.sub(r"\s+", " ", _mask_literals(query)).strip()
    return masked if len(masked) <= limit else masked[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------
# Tasks


def _counts(conn: psycopg.Connection[DictRow], column: str) -> list[CountBy]:
    query = sql.SQL(
        "SELECT coalesce({col}::text, '(none)') AS key, count(*) AS count FROM pg_stat_activity"
        " WHERE backend_type = 'client backend' GROUP BY 1 ORDER BY 2 DESC, 1"
    ).format(col=sql.Identifier(column))
    return [CountBy.model_validate(r) for r in conn.execute(query).fetchall()]


def _usage_on(conn: psycopg.Connection[DictRow], target: str) -> PoolUsage:
    """Client connections against max_connections, read on an open connection."""
    row = conn.execute(
        """
        SELECT current_setting('max_connections')::int AS max_connections,
               current_setting('superuser_reserved_connections')::int AS superuser_reserved,
               coalesce(current_setting('reserved_connections', true), '0')::int AS reserved,
               (SELECT count(*) FROM pg_stat_activity
                 WHERE backend_type = 'client backend')::int AS client_connections,
               now() AS taken_at
        """
    ).fetchone()
    assert row is not None
    max_conn = int(row["max_connections"])
    used = int(row["client_connections"])
    reserved_total = int(row["superuser_reserved"]) + int(row["reserved"])
    return PoolUsage(
        taken_at=row["taken_at"],
        target=target,
        max_connections=max_conn,
        superuser_reserved=row["superuser_reserved"],
        reserved=row["reserved"],
        client_connections=used,
        percent_used=round(100.0 * used / max_conn, 2),
        free_for_applications=max(0, max_conn - reserved_total - used),
        by_state=_counts(conn, "state"),
        by_database=_counts(conn, "datname"),
        by_user=_counts(conn, "usename"),
    )


def read_pool_usage(settings: PostgresSettings | None = None) -> PoolUsage:
    """Measure client connections against max_connections (no task wrapper: used by benches)."""
    settings = settings or PostgresSettings()
    with pg_connect(settings) as conn:
        return _usage_on(conn, pg_target(settings))


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="measure-pool-usage")
def measure_pool_usage() -> PoolUsage:
    """Count client connections by state, database and role against max_connections."""
    usage = read_pool_usage()
    run_logger().info(
        "%s: %d/%d connections (%.1f%%)",
        usage.target,
        usage.client_connections,
        usage.max_connections,
        usage.percent_used,
    )
    return usage


def _snapshot_on(conn: psycopg.Connection[DictRow], target: str, limit: int) -> PoolSnapshot:
    """Usage, the oldest open transactions and the idle-in-transaction sessions, on `conn`."""
    usage = _usage_on(conn, target)
    rows = conn.execute(
        """
        SELECT pid, usename::text AS usename, datname::text AS datname, state,
               extract(epoch FROM now() - xact_start)::float8 AS xact_age_s,
               extract(epoch FROM now() - state_change)::float8 AS state_age_s,
               query
          FROM pg_stat_activity
         WHERE backend_type = 'client backend' AND xact_start IS NOT NULL
           AND pid <> pg_backend_pid()
         ORDER BY xact_start
        """
    ).fetchall()
    txns = [LongTransaction(**{**r, "query": redact_query(r["query"])}) for r in rows]
    idle_tx = sorted(
        (t for t in txns if (t.state or "").startswith("idle in transaction")),
        key=lambda t: -(t.state_age_s or 0.0),
    )
    return PoolSnapshot(
        usage=usage, long_transactions=txns[:limit], idle_in_transaction=idle_tx[:limit]
    )


def _plan_on(
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
        return _plan_on(conn, guard, settings)


class PoolSurvey(BaseModel):
    """The pool check and the guard's plan, read together (`survey_pool`)."""

    snapshot: PoolSnapshot
    plan: TerminationPlan


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="survey-pool")
def survey_pool(guard: TerminationGuard, limit: int = 10) -> PoolSurvey:
    """Measure usage, list the oldest transactions and plan the guard's terminations."""
    settings = PostgresSettings()
    # One connection: during an exhausted pool every slot counts. One transaction: the
    # findings and the plan describe the same moment (a backend reads pg_stat_activity once
    # per transaction, and now() is fixed in it).
    with pg_connect(settings) as conn, conn.transaction():
        snapshot = _snapshot_on(conn, pg_target(settings), limit)
        plan = _plan_on(conn, guard, settings)
    _log_plan(plan)
    return PoolSurvey(snapshot=snapshot, plan=plan)


def _log_plan(plan: TerminationPlan) -> None:
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
    _log_plan(plan)
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


def _timeout_literal(seconds: int) -> str:
    return f"{seconds}s"


TIMEOUT_GUC = "idle_in_transaction_session_timeout"


def _system_value(conn: psycopg.Connection[DictRow]) -> str | None:
    """The value ALTER SYSTEM has written (postgresql.auto.conf), reloaded or not; None = none."""
    row = conn.execute(
        "SELECT setting FROM pg_file_settings WHERE name = %s"
        " AND sourcefile LIKE '%%postgresql.auto.conf' ORDER BY seqno DESC LIMIT 1",
        (TIMEOUT_GUC,),
    ).fetchone()
    return None if row is None else str(row["setting"])


def _role_value(conn: psycopg.Connection[DictRow], role: str) -> str | None:
    """The value `ALTER ROLE role SET` has stored (all databases); None = none."""
    row = conn.execute(
        """
        SELECT substr(c, length(%(guc)s) + 2) AS v
          FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole,
               unnest(s.setconfig) c
         WHERE r.rolname = %(role)s AND s.setdatabase = 0 AND c LIKE %(guc)s || '=%%'
        """,
        {"guc": TIMEOUT_GUC, "role": role},
    ).fetchone()
    return None if row is None else str(row["v"])


def _require_role(conn: psycopg.Connection[DictRow], role: str, target: str) -> None:
    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
        raise PermanentError(f"role {role!r} does not exist on {target}")


@task(
    **RETRY_READ,
    cache_policy=NO_CACHE,
    task_run_name="read-idle-in-transaction-timeout-{role}",
)
def read_idle_in_transaction_timeout(role: str | None = None) -> TimeoutReading:
    """Read idle_in_transaction_session_timeout before a change, and the statement to undo it."""
    check_name(role)
    settings = PostgresSettings()
    target = pg_target(settings)
    with pg_connect(settings) as conn:
        if role is None:
            previous = _system_value(conn)
            effective = conn.execute("SELECT current_setting(%s) AS v", (TIMEOUT_GUC,)).fetchone()
            undo = (
                sql.SQL("ALTER SYSTEM SET {} = {}; SELECT pg_reload_conf();").format(
                    sql.Identifier(TIMEOUT_GUC), sql.Literal(previous)
                )
                if previous is not None
                else sql.SQL("ALTER SYSTEM RESET {}; SELECT pg_reload_conf();").format(
                    sql.Identifier(TIMEOUT_GUC)
                )
            )
            scope = "system"
            in_effect = str(effective["v"]) if effective else "?"
        else:
            _require_role(conn, role, target)
            previous = _role_value(conn, role)
            undo = (
                sql.SQL("ALTER ROLE {} SET {} = {};").format(
                    sql.Identifier(role), sql.Identifier(TIMEOUT_GUC), sql.Literal(previous)
                )
                if previous is not None
                else sql.SQL("ALTER ROLE {} RESET {};").format(
                    sql.Identifier(role), sql.Identifier(TIMEOUT_GUC)
                )
            )
            scope = f"role:{role}"
            in_effect = previous or "(the system value)"
        undo_sql = undo.as_string(conn)
    run_logger().info(
        "%s: %s (%s) was %s before the change; in effect: %s",
        target,
        TIMEOUT_GUC,
        scope,
        previous if previous is not None else "not set",
        in_effect,
    )
    return TimeoutReading(
        target=target,
        role=role,
        scope=scope,
        previous=previous,
        effective=in_effect,
        undo_sql=undo_sql,
    )


@task(
    **RETRY_IDEMPOTENT_WRITE,
    cache_policy=NO_CACHE,
    task_run_name="set-idle-in-transaction-timeout-{reading.scope}",
)
def set_idle_in_transaction_timeout(seconds: int, reading: TimeoutReading) -> TimeoutChange:
    """Set idle_in_transaction_session_timeout to `seconds`; a no-op when already there."""
    # Idempotent by construction: the previous value and the undo come from `reading`, taken
    # once before this write, and a retry that finds the target value in place changes nothing.
    role = reading.role
    if not 1 <= seconds <= 24 * 3600:
        raise PermanentError(f"{TIMEOUT_GUC} must be 1 s .. 24 h")
    if role is None and seconds < 60:
        raise PermanentError(f"a system-wide {TIMEOUT_GUC} must be at least 60 s")
    check_name(role)
    settings = PostgresSettings()
    target = pg_target(settings)
    value = _timeout_literal(seconds)
    with pg_connect(settings) as conn:
        if role is None:
            already = _system_value(conn) == value
            if not already:
                conn.execute(
                    sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        sql.Identifier(TIMEOUT_GUC), sql.Literal(value)
                    )
                )
            # The on-call runbook's `pg_ctl_reload()` does not exist: the SQL function is
            # pg_reload_conf().
            # Reloading again is harmless, and needed when the lost reply was the reload's.
            conn.execute("SELECT pg_reload_conf()")
        else:
            _require_role(conn, role, target)
            already = _role_value(conn, role) == value
            if not already:
                conn.execute(
                    sql.SQL("ALTER ROLE {} SET {} = {}").format(
                        sql.Identifier(role), sql.Identifier(TIMEOUT_GUC), sql.Literal(value)
                    )
                )
    run_logger().warning(
        "%s: %s=%s (%s)%s; previous %s; undo: %s",
        target,
        TIMEOUT_GUC,
        value,
        reading.scope,
        " (already in place)" if already else "",
        reading.previous if reading.previous is not None else "not set",
        reading.undo_sql,
    )
    return TimeoutChange(
        target=target,
        scope=reading.scope,
        previous=reading.previous,
        new=value,
        undo_sql=reading.undo_sql,
        already_set=already,
    )


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="show-pgbouncer-pools")
def show_pgbouncer_pools() -> list[PgBouncerPool]:
    """Read PgBouncer's SHOW POOLS from its admin console (read-only); [] when not configured."""
    settings = PgBouncerSettings()
    if settings.dsn is None:
        return []
    try:
        # The admin console speaks the simple query protocol only: ClientCursor uses it.
        with psycopg.connect(
            settings.dsn.get_secret_value(),
            connect_timeout=settings.connect_timeout_s,
            autocommit=True,
            cursor_factory=psycopg.ClientCursor,
        ) as conn:
            cur = conn.execute("SHOW POOLS")
            names = [d.name for d in cur.description or []]
            rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    except psycopg.Error as exc:
        raise classify_pg_error(exc, "pgbouncer") from None
    return [
        PgBouncerPool(
            database=str(r["database"]),
            user=str(r["user"]),
            cl_active=int(r["cl_active"]),
            cl_waiting=int(r["cl_waiting"]),
            sv_active=int(r["sv_active"]),
            sv_idle=int(r["sv_idle"]),
            sv_used=int(r["sv_used"]),
            maxwait_s=float(r["maxwait"]) + float(r.get("maxwait_us", 0) or 0) / 1e6,
        )
        for r in rows
    ]


def guard_summary(guard: TerminationGuard) -> str:
    """The guard in words, for the plan artifact and the approval form."""
    parts = [
        "client backends only",
        "never this session",
        "never superusers",
        f"states {', '.join(guard.states)}",
        f"idle > {guard.idle_minutes:g} min",
        f"at most {guard.max_sessions}",
    ]
    if guard.database:
        parts.append(f"database = {guard.database}")
    if guard.username:
        parts.append(f"role = {guard.username}")
    if guard.protected_roles:
        parts.append(f"also protected: {', '.join(guard.protected_roles)}")
    return "; ".join(parts)


def age_text(seconds: float | None) -> str:
    """A duration as the on-call reads it (`3m05s`)."""
    if seconds is None:
        return "-"
    return str(timedelta(seconds=int(seconds)))


class AdvisoryLock:
    """A held `remediation_lock`: its session, and whether this run expects to lose it."""

    def __init__(self, conn: psycopg.Connection[DictRow], key: str, target: str) -> None:
        self._conn = conn
        self._key = key
        # Kept to blot it out of an error's text, should libpq ever quote it.
        self._secret = conn.info.password
        self.target = target
        self.expected_loss = ""
        self.released = ""

    def expect_loss(self, cause: str) -> None:
        """Say this run is about to end the lock's session itself (a restart of its server)."""
        self.expected_loss = cause

    def release(self) -> str:
        """Unlock now (once); how it ended. A session that died after `expect_loss` is no error:
        PostgreSQL released a session lock with its session. Any other failure raises."""
        if self.released:
            return self.released
        try:
            self._conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (self._key,))
        except psycopg.Error as exc:
            # Only a dead session counts as the expected loss; a live one that refused the
            # unlock is a real failure, restart or not.
            if not self.expected_loss or not (self._conn.broken or self._conn.closed):
                self.released = "unlock failed"
                raise classify_pg_error(exc, self.target, self._secret) from None
            self.released = (
                f"its session ended with {self.expected_loss}; PostgreSQL released it with the "
                "session"
            )
            run_logger().info("remediation lock on %s: %s", self.target, self.released)
            return self.released
        self.released = "released"
        return self.released


@contextmanager
def remediation_lock(name: str, settings: PostgresSettings | None = None) -> Iterator[AdvisoryLock]:
    """Hold a session advisory lock so only one remediation acts on this server at a time.

    A run that restarts this very server calls `expect_loss` first: the lock's session then
    dies on purpose, and the exit releases it quietly instead of failing the run.
    """
    settings = settings or PostgresSettings()
    key = f"incident-runbooks:{name}"
    with pg_connect(settings) as conn:
        got = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s)) AS ok", (key,)).fetchone()
        if not got or not got["ok"]:
            raise SafetyViolation(
                f"another {name} remediation holds the lock on {pg_target(settings)}; not acting"
            )
        lock = AdvisoryLock(conn, key, pg_target(settings))
        try:
            yield lock
        except BaseException:
            # The run is failing already: an unlock that fails too must not hide why.
            try:
                lock.release()
            except RunbookError as exc:
                run_logger().warning("remediation lock on %s: %s", lock.target, exc)
            raise
        lock.release()


# ---------------------------------------------------------------------------------------------
# Read-only diagnostics (issue 9): the high-error-rate and high-latency runbooks' evidence.
# Each one reads catalog / statistics views only; nothing here changes the server.

DiagnosticStatus = Literal["ok", "extension_missing", "not_preloaded", "permission_denied"]
ArchiverStatus = Literal["off", "never", "failing", "stale", "ok"]


def _settings_for(database: str | None, settings: PostgresSettings | None) -> PostgresSettings:
    """The settings, pointed at `database` instead of the DSN's own (None = unchanged)."""
    settings = settings or PostgresSettings()
    if database is None:
        return settings
    check_name(database)
    try:
        dsn = make_conninfo(pg_dsn(settings), dbname=database)
    except psycopg.Error:
        # libpq's parse errors quote the DSN: never echo them.
        raise PermanentError("PostgreSQL DSN is malformed (not shown)") from None
    return settings.model_copy(update={"dsn": SecretStr(dsn), "dsn_secret_block": None})


class ActivityGroup(BaseModel):
    """Client connections of one (database, role) pair, split by state."""

    datname: str
    usename: str
    count: int
    active: int
    idle: int
    idle_in_transaction: int
    waiting: int = Field(description="Sessions waiting on a lock (`wait_event_type = 'Lock'`).")


class ActivityByDbUser(BaseModel):
    """The on-call runbook's `GROUP BY datname, usename` over client connections, largest first."""

    target: str
    taken_at: datetime
    total: int
    groups: list[ActivityGroup]


def read_activity_by_db_user(settings: PostgresSettings | None = None) -> ActivityByDbUser:
    """Client connections grouped by database and role together (no task wrapper)."""
    settings = settings or PostgresSettings()
    with pg_connect(settings) as conn:
        rows = conn.execute(
            """
            SELECT coalesce(datname::text, '(none)') AS datname,
                   coalesce(usename::text, '(none)') AS usename,
                   count(*)::int AS count,
                   count(*) FILTER (WHERE state = 'active')::int AS active,
                   count(*) FILTER (WHERE state = 'idle')::int AS idle,
                   count(*) FILTER (WHERE state IN ('idle in transaction',
                                                    'idle in transaction (aborted)'))::int
                       AS idle_in_transaction,
                   count(*) FILTER (WHERE wait_event_type = 'Lock')::int AS waiting,
                   now() AS taken_at
              FROM pg_stat_activity
             WHERE backend_type = 'client backend'
             GROUP BY datname, usename
             ORDER BY 3 DESC, 1, 2
            """
        ).fetchall()
        now = conn.execute("SELECT now() AS now").fetchone()
    groups = [ActivityGroup.model_validate(r) for r in rows]
    return ActivityByDbUser(
        target=pg_target(settings),
        taken_at=now["now"] if now else datetime.now(UTC),
        total=sum(g.count for g in groups),
        groups=groups,
    )


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="activity-by-db-user")
def activity_by_db_user() -> ActivityByDbUser:
    """Count client connections by database and role together (the on-call runbook's query)."""
    result = read_activity_by_db_user()
    top = result.groups[0] if result.groups else None
    run_logger().info(
        "%s: %d client connection(s) in %d (database, role) group(s)%s",
        result.target,
        result.total,
        len(result.groups),
        f"; largest {top.datname}/{top.usename}: {top.count}" if top else "",
    )
    return result


class StatementStat(BaseModel):
    """One `pg_stat_statements` entry; the query text is redacted."""

    queryid: int | None
    datname: str | None
    usename: str | None
    query: str = Field(description="Normalised query text with literals masked, truncated.")
    calls: int
    total_ms: float
    mean_ms: float
    max_ms: float
    rows: int
    rows_per_call: float
    shared_blks_hit: int
    shared_blks_read: int

    def calls_per(self, requests: float) -> float | None:
        """Calls per request (N+1 suspects are far above 1); None when no request counted."""
        return None if requests <= 0 else self.calls / requests


class TopStatements(BaseModel):
    """`pg_stat_statements` top-N by mean, total time and calls, or why it cannot be read."""

    target: str
    status: DiagnosticStatus
    detail: str = Field(description="What is missing and how to enable it, when not `ok`.")
    database: str | None = Field(description="Only statements of this database; None = all.")
    by_mean: list[StatementStat] = Field(default_factory=list)
    by_total: list[StatementStat] = Field(default_factory=list)
    by_calls: list[StatementStat] = Field(default_factory=list)


_HIDDEN_TEXT = "<insufficient privilege>"
_STATEMENTS_ENABLE = (
    "add pg_stat_statements to shared_preload_libraries (restart), then"
    " CREATE EXTENSION pg_stat_statements in the database the runbook connects to"
)


def _statements_sql(schema: str, order: str, pg_version: int) -> sql.Composed:
    """The top-N query on the extension's view, in the schema it was created in."""
    # PostgreSQL 13 renamed total_time/mean_time/max_time to *_exec_time.
    suffix = "_exec_time" if pg_version >= 130000 else "_time"
    cols = {c: sql.Identifier(f"{c}{suffix}") for c in ("total", "mean", "max")}
    return sql.SQL(
        """
        SELECT s.queryid, d.datname::text AS datname, r.rolname::text AS usename, s.query,
               s.calls, s.{total}::float8 AS total_ms, s.{mean}::float8 AS mean_ms,
               s.{max}::float8 AS max_ms, s.rows, s.shared_blks_hit, s.shared_blks_read
          FROM {schema}.pg_stat_statements s
          LEFT JOIN pg_database d ON d.oid = s.dbid
          LEFT JOIN pg_roles r ON r.oid = s.userid
         WHERE (%(db)s::text IS NULL OR d.datname = %(db)s::text)
           AND s.query IS NOT NULL AND s.calls > 0
         ORDER BY {order} DESC NULLS LAST
         LIMIT %(limit)s
        """
    ).format(
        schema=sql.Identifier(schema),
        order=sql.SQL(order).format(**cols),
        **cols,
    )


def _statement(row: DictRow) -> StatementStat:
    calls = int(row["calls"])
    return StatementStat(
        queryid=row["queryid"],
        datname=row["datname"],
        usename=row["usename"],
        query=redact_query(row["query"], limit=300),
        calls=calls,
        total_ms=round(float(row["total_ms"]), 3),
        mean_ms=round(float(row["mean_ms"]), 3),
        max_ms=round(float(row["max_ms"]), 3),
        rows=int(row["rows"]),
        rows_per_call=round(int(row["rows"]) / calls, 2),
        shared_blks_hit=int(row["shared_blks_hit"]),
        shared_blks_read=int(row["shared_blks_read"]),
    )


def read_top_statements(
    limit: int = 10, database: str | None = None, settings: PostgresSettings | None = None
) -> TopStatements:
    """Top-N statements by mean, total time and calls; a missing extension is a result."""
    if not 1 <= limit <= 100:
        raise PermanentError("limit must be 1 .. 100")
    check_name(database)
    settings = settings or PostgresSettings()
    target = pg_target(settings)

    def missing(status: DiagnosticStatus, detail: str) -> TopStatements:
        run_logger().warning("%s: pg_stat_statements unavailable (%s): %s", target, status, detail)
        return TopStatements(target=target, status=status, detail=detail, database=database)

    with pg_connect(settings) as conn:
        ext = conn.execute(
            "SELECT n.nspname::text AS schema, e.extversion"
            "  FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace"
            " WHERE e.extname = 'pg_stat_statements'"
        ).fetchone()
        here = conn.execute(
            "SELECT current_database()::text AS db, current_setting('server_version_num')::int AS v"
        ).fetchone()
        assert here is not None
        if ext is None:
            return missing(
                "extension_missing",
                f"pg_stat_statements is not installed in database {here['db']}:"
                f" {_STATEMENTS_ENABLE}",
            )
        lists: dict[str, list[StatementStat]] = {}
        for key, order in (
            ("by_mean", "s.{mean}"),
            ("by_total", "s.{total}"),
            ("by_calls", "s.calls"),
        ):
            try:
                rows = conn.execute(
                    _statements_sql(str(ext["schema"]), order, int(here["v"])),
                    {"db": database, "limit": limit},
                ).fetchall()
            except psycopg.errors.ObjectNotInPrerequisiteState:
                # "pg_stat_statements must be loaded via shared_preload_libraries" (55000):
                # created but not preloaded; a retry would never fix it.
                return missing(
                    "not_preloaded",
                    "pg_stat_statements is installed but not in shared_preload_libraries:"
                    " add it there and restart the server",
                )
            except psycopg.errors.InsufficientPrivilege:
                return missing(
                    "permission_denied",
                    "the runbook's role may not read pg_stat_statements:"
                    " GRANT pg_read_all_stats TO it",
                )
            lists[key] = [_statement(r) for r in rows]
    # Without pg_read_all_stats the view answers, but other roles' texts read
    # "<insufficient privilege>": the figures stand, the statements cannot be named.
    hidden = any(st.query == _HIDDEN_TEXT for rows_ in lists.values() for st in rows_)
    detail = (
        "some query texts are hidden from this role: GRANT pg_read_all_stats (or pg_monitor)"
        if hidden
        else ""
    )
    return TopStatements(target=target, status="ok", detail=detail, database=database, **lists)


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="top-statements-{database}")
def top_statements(limit: int = 10, database: str | None = None) -> TopStatements:
    """Read pg_stat_statements' top-N by mean time, total time and calls (redacted text)."""
    result = read_top_statements(limit, database)
    if result.status == "ok" and result.by_mean:
        worst = result.by_mean[0]
        run_logger().info(
            "%s: slowest statement by mean %.1f ms over %d call(s)",
            result.target,
            worst.mean_ms,
            worst.calls,
        )
    return result


def n_plus_one_suspects(
    stats: TopStatements, requests: float, factor: float = 10.0
) -> list[StatementStat]:
    """Statements called at least `factor` times per request (from `by_calls`), most first."""
    if requests <= 0:
        return []
    return [s for s in stats.by_calls if s.calls / requests >= factor]


class SeqScanTable(BaseModel):
    """A table often read whole by sequential scans, with an index hint."""

    schema_name: str
    table: str
    seq_scan: int
    seq_tup_read: int
    idx_scan: int | None = Field(description="None: the table has no index at all.")
    n_live_tup: int
    avg_rows_per_seq_scan: float
    candidate_columns: list[str] = Field(
        description="Columns filtered on by pg_stat_statements queries and not leading any index."
    )
    suggestion: str


class SeqScanReport(BaseModel):
    """Tables with heavy sequential scans in one database, most rows read first."""

    target: str
    database: str
    min_rows: int
    min_seq_scans: int
    tables: list[SeqScanTable]


# `FROM/JOIN <table> ... WHERE|AND|OR <col> = | IN | < | > | LIKE`: a rough reading of the
# normalised text, enough to name the column an index would serve. Hints, not proofs.
_FILTER_COL = re.compile(
    r"(?:\bWHERE|\bAND|\bOR)\s+(?:\w+\.)?\"?(\w+)\"?\s*(?:=|<|>|\bIN\b|\bLIKE\b|\bBETWEEN\b)",
    re.IGNORECASE,
)


def _candidate_columns(
    conn: psycopg.Connection[DictRow], relid: int, table: str, queries: list[str]
) -> list[str]:
    """Columns of the table filtered on by `queries` that lead no index of the table."""
    cols = conn.execute(
        """
        SELECT a.attname::text AS name,
               EXISTS (SELECT 1 FROM pg_index i
                        WHERE i.indrelid = a.attrelid AND i.indkey[0] = a.attnum) AS indexed
          FROM pg_attribute a
         WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
        """,
        (relid,),
    ).fetchall()
    unindexed = {str(c["name"]) for c in cols if not c["indexed"]}
    mention = re.compile(rf"\b(?:FROM|JOIN)\s+(?:\w+\.)?\"?{re.escape(table)}\"?\b", re.IGNORECASE)
    found: list[str] = []
    for q in queries:
        if mention.search(q):
            for col in _FILTER_COL.findall(q):
                if col in unindexed and col not in found:
                    found.append(col)
    return found


def _seq_suggestion(t: SeqScanTable) -> str:
    if t.candidate_columns:
        cols = ", ".join(t.candidate_columns)
        return (
            f"{t.seq_scan} sequential scans reading ~{t.avg_rows_per_seq_scan:,.0f} rows each;"
            f" queries filter on {cols} (no index leads with it): consider"
            f" CREATE INDEX CONCURRENTLY ON {t.schema_name}.{t.table} ({t.candidate_columns[0]})"
        )
    return (
        f"{t.seq_scan} sequential scans reading ~{t.avg_rows_per_seq_scan:,.0f} rows each"
        f" vs {t.idx_scan or 0} index scans: find the filtering queries (top statements)"
        " and index their WHERE columns"
    )


def read_seq_scan_tables(
    min_rows: int = 1000,
    min_seq_scans: int = 10,
    limit: int = 10,
    database: str | None = None,
    settings: PostgresSettings | None = None,
) -> SeqScanReport:
    """Tables of `min_rows`+ rows read whole `min_seq_scans`+ times (no task wrapper).

    Not "seq_scan > idx_scan": rows inserted with ON CONFLICT or checked by foreign keys count
    as index scans, so a table hurt by every full scan can still have far more index scans.
    """
    base = settings or PostgresSettings()
    settings = _settings_for(database, base)
    with pg_connect(settings) as conn:
        here = conn.execute("SELECT current_database()::text AS db").fetchone()
        rows = conn.execute(
            """
            SELECT relid::int AS relid, schemaname::text AS schema_name, relname::text AS table,
                   seq_scan, seq_tup_read, idx_scan, n_live_tup
              FROM pg_stat_user_tables
             WHERE n_live_tup >= %(min_rows)s AND seq_scan >= %(min_scans)s
               AND seq_tup_read >= %(min_rows)s::bigint * %(min_scans)s
             ORDER BY seq_tup_read DESC
             LIMIT %(limit)s
            """,
            {"min_rows": min_rows, "min_scans": min_seq_scans, "limit": limit},
        ).fetchall()
        # Column hints come from pg_stat_statements when it is readable; without it the
        # report still names the tables.
        queries: list[str] = []
        if rows:
            # The extension lives where the runbook connects (usually), else maybe in the
            # application database itself: try both.
            db = here["db"] if here else None
            stats = read_top_statements(100, db, base)
            if stats.status != "ok" and database is not None:
                stats = read_top_statements(100, db, settings)
            queries = [s.query for s in stats.by_calls + stats.by_total]
        tables: list[SeqScanTable] = []
        for r in rows:
            t = SeqScanTable(
                schema_name=r["schema_name"],
                table=r["table"],
                seq_scan=int(r["seq_scan"]),
                seq_tup_read=int(r["seq_tup_read"]),
                idx_scan=None if r["idx_scan"] is None else int(r["idx_scan"]),
                n_live_tup=int(r["n_live_tup"]),
                avg_rows_per_seq_scan=round(int(r["seq_tup_read"]) / int(r["seq_scan"]), 1),
                candidate_columns=_candidate_columns(conn, int(r["relid"]), r["table"], queries),
                suggestion="",
            )
            tables.append(t.model_copy(update={"suggestion": _seq_suggestion(t)}))
    return SeqScanReport(
        target=pg_target(settings),
        database=here["db"] if here else "?",
        min_rows=min_rows,
        min_seq_scans=min_seq_scans,
        tables=tables,
    )


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="seq-scan-tables-{database}")
def seq_scan_tables(
    min_rows: int = 1000, min_seq_scans: int = 10, limit: int = 10, database: str | None = None
) -> SeqScanReport:
    """List tables often read whole by sequential scans, with index candidates (read-only)."""
    report = read_seq_scan_tables(min_rows, min_seq_scans, limit, database)
    for t in report.tables:
        run_logger().info("%s: %s.%s: %s", report.target, t.schema_name, t.table, t.suggestion)
    return report


class DatabaseSize(BaseModel):
    """The on-disk size of one database."""

    datname: str
    bytes: int | None = Field(description="None: no CONNECT privilege on it.")
    pretty: str


class StorageSizes(BaseModel):
    """Database sizes and the WAL directory, or why WAL could not be read."""

    target: str
    databases: list[DatabaseSize]
    total_database_bytes: int
    wal_bytes: int | None = Field(description="Sum of pg_ls_waldir(); None when not readable.")
    wal_files: int | None
    wal_detail: str = Field(description="Why WAL is not shown (permission), else empty.")
    max_wal_size: str
    in_recovery: bool


def read_storage_sizes(settings: PostgresSettings | None = None) -> StorageSizes:
    """Sizes of every database and of the WAL directory (no task wrapper)."""
    settings = settings or PostgresSettings()
    with pg_connect(settings) as conn:
        dbs = conn.execute(
            """
            SELECT datname::text AS datname,
                   CASE WHEN has_database_privilege(oid, 'CONNECT')
                        THEN pg_database_size(oid) END AS bytes
              FROM pg_database
             WHERE datallowconn
             ORDER BY 2 DESC NULLS LAST, 1
            """
        ).fetchall()
        info = conn.execute(
            "SELECT current_setting('max_wal_size') AS max_wal_size,"
            " pg_is_in_recovery() AS in_recovery"
        ).fetchone()
        assert info is not None
        wal_bytes: int | None = None
        wal_files: int | None = None
        wal_detail = ""
        try:
            wal = conn.execute(
                "SELECT coalesce(sum(size), 0)::bigint AS bytes, count(*)::int AS files"
                " FROM pg_ls_waldir()"
            ).fetchone()
            if wal is not None:
                wal_bytes, wal_files = int(wal["bytes"]), int(wal["files"])
        except psycopg.errors.InsufficientPrivilege:
            wal_detail = "permission denied for pg_ls_waldir(): GRANT pg_monitor to the role"
    databases = [
        DatabaseSize(
            datname=r["datname"],
            bytes=r["bytes"],
            pretty="no access" if r["bytes"] is None else _pretty_bytes(int(r["bytes"])),
        )
        for r in dbs
    ]
    return StorageSizes(
        target=pg_target(settings),
        databases=databases,
        total_database_bytes=sum(d.bytes or 0 for d in databases),
        wal_bytes=wal_bytes,
        wal_files=wal_files,
        wal_detail=wal_detail,
        max_wal_size=str(info["max_wal_size"]),
        in_recovery=bool(info["in_recovery"]),
    )


def _pretty_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="storage-sizes")
def storage_sizes() -> StorageSizes:
    """Measure every database's size and the WAL directory (read-only)."""
    result = read_storage_sizes()
    run_logger().info(
        "%s: databases %s, WAL %s",
        result.target,
        _pretty_bytes(result.total_database_bytes),
        result.wal_detail or _pretty_bytes(result.wal_bytes or 0),
    )
    return result


class ArchiverState(BaseModel):
    """WAL archiving freshness from `pg_stat_archiver`, with a verdict."""

    target: str
    status: ArchiverStatus
    detail: str
    archive_mode: str
    archived_count: int
    last_archived_wal: str | None
    last_archived_time: datetime | None
    last_archived_age_s: float | None
    failed_count: int
    last_failed_wal: str | None
    last_failed_time: datetime | None
    stats_reset: datetime | None


def read_archiver(
    max_age_s: float = 3600.0, settings: PostgresSettings | None = None
) -> ArchiverState:
    """`pg_stat_archiver` and a verdict: off, never, failing, stale or ok (no task wrapper)."""
    settings = settings or PostgresSettings()
    with pg_connect(settings) as conn:
        r = conn.execute(
            """
            SELECT current_setting('archive_mode') AS archive_mode,
                   archived_count, last_archived_wal, last_archived_time,
                   -- clock_timestamp(), not now(): the statement's start can precede an
                   -- archive that the stats snapshot already shows (a negative age).
                   greatest(0, extract(epoch FROM clock_timestamp() - last_archived_time))::float8
                     AS age_s,
                   failed_count, last_failed_wal, last_failed_time, stats_reset
              FROM pg_stat_archiver
            """
        ).fetchone()
    assert r is not None
    mode = str(r["archive_mode"])
    age = r["age_s"]
    last_ok, last_failed = r["last_archived_time"], r["last_failed_time"]
    status: ArchiverStatus
    if mode == "off":
        status, detail = "off", "archive_mode is off: no WAL archiving (point-in-time recovery)"
    elif last_failed is not None and (last_ok is None or last_failed > last_ok):
        status = "failing"
        detail = (
            f"the last archive attempt failed ({r['last_failed_wal']}, {r['failed_count']}"
            " failure(s) since stats reset): check archive_command and the server log"
        )
    elif last_ok is None:
        status, detail = "never", "archive_mode is on but no WAL segment archived yet"
    elif age is not None and age > max_age_s:
        status = "stale"
        detail = (
            f"last segment archived {age_text(age)} ago (> {age_text(max_age_s)}):"
            " normal on an idle server without archive_timeout, else check the archiver"
        )
    else:
        status, detail = "ok", f"last segment archived {age_text(age)} ago"
    return ArchiverState(
        target=pg_target(settings),
        status=status,
        detail=detail,
        archive_mode=mode,
        archived_count=int(r["archived_count"]),
        last_archived_wal=r["last_archived_wal"],
        last_archived_time=last_ok,
        last_archived_age_s=None if age is None else round(float(age), 1),
        failed_count=int(r["failed_count"]),
        last_failed_wal=r["last_failed_wal"],
        last_failed_time=last_failed,
        stats_reset=r["stats_reset"],
    )


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="archiver-status")
def archiver_status(max_age_s: float = 3600.0) -> ArchiverState:
    """Read pg_stat_archiver: is WAL archiving (backup freshness) on, failing or stale."""
    result = read_archiver(max_age_s)
    log = run_logger().info if result.status in ("ok", "off") else run_logger().warning
    log("%s: archiving %s: %s", result.target, result.status, result.detail)
    return result
