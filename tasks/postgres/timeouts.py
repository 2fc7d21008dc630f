"""`idle_in_transaction_session_timeout`: read it (with its undo) and set it."""

from __future__ import annotations

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql
from psycopg.rows import DictRow
from pydantic import BaseModel, Field

from tasks.clients import pg_connect, pg_target
from tasks.errors import PermanentError
from tasks.logs import run_logger
from tasks.postgres.common import check_name
from tasks.retry import RETRY_IDEMPOTENT_WRITE, RETRY_READ
from tasks.settings import PostgresSettings


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
