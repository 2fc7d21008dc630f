"""Connection usage: the pool against max_connections, the pool survey, PgBouncer's pools."""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql
from psycopg.rows import DictRow
from pydantic import BaseModel, Field

from tasks.clients import classify_pg_error, pg_connect, pg_target
from tasks.logs import run_logger
from tasks.postgres.common import redact_query
from tasks.postgres.terminations import TerminationGuard, TerminationPlan, log_plan, plan_on
from tasks.retry import RETRY_READ
from tasks.settings import PgBouncerSettings, PostgresSettings


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
        plan = plan_on(conn, guard, settings)
    log_plan(plan)
    return PoolSurvey(snapshot=snapshot, plan=plan)


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
