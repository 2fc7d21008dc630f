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
from psycopg.rows import DictRow
from pydantic import BaseModel, Field, field_validator

from tasks.clients import classify_pg_error, pg_connect, pg_target
from tasks.errors import PermanentError, SafetyViolation
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


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="inspect-pool")
def inspect_pool(limit: int = 10) -> PoolSnapshot:
    """Measure usage and list the oldest open transactions and idle-in-transaction sessions."""
    settings = PostgresSettings()
    # One connection for the whole check: during an exhausted pool every slot counts.
    with pg_connect(settings) as conn:
        usage = _usage_on(conn, pg_target(settings))
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


def select_sessions(
    guard: TerminationGuard, settings: PostgresSettings | None = None
) -> TerminationPlan:
    """Run the guard on live `pg_stat_activity` and return the plan (no side effects)."""
    settings = settings or PostgresSettings()
    params = guard_params(guard, settings) | {"cap": guard.max_sessions + 1}
    with pg_connect(settings) as conn:
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


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="plan-terminations-{guard.database}")
def plan_terminations(guard: TerminationGuard) -> TerminationPlan:
    """List the sessions the guard allows to terminate, oldest idle first, capped."""
    plan = select_sessions(guard)
    run_logger().info(
        "%s: %d session(s) match the guard%s",
        plan.target,
        len(plan.sessions),
        " (cap reached)" if plan.more_than_cap else "",
    )
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
            # The seed's `pg_ctl_reload()` does not exist: the SQL function is pg_reload_conf().
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


@contextmanager
def remediation_lock(name: str, settings: PostgresSettings | None = None) -> Iterator[None]:
    """Hold a session advisory lock so only one remediation acts on this server at a time."""
    settings = settings or PostgresSettings()
    with pg_connect(settings) as conn:
        got = conn.execute(
            "SELECT pg_try_advisory_lock(hashtext(%s)) AS ok", (f"incident-runbooks:{name}",)
        ).fetchone()
        if not got or not got["ok"]:
            raise SafetyViolation(
                f"another {name} remediation holds the lock on {pg_target(settings)}; not acting"
            )
        try:
            yield
        finally:
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (f"incident-runbooks:{name}",))
