"""The Prefect server's database: SQLite under PREFECT_HOME, or a PostgreSQL database.

`make run` serves one machine on Prefect's SQLite default. `RUNBOOKS_PREFECT_DB=postgres`
puts the server on PostgreSQL instead (the database `RUNBOOKS_PREFECT_PG_DSN` names, created
when missing), which is what several receivers and Runners sharing one Prefect API need:
SQLite has one writer at a time, PostgreSQL many. An operator's own
`PREFECT_API_DATABASE_CONNECTION_URL` wins over both and is used as given.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

log = logging.getLogger("runbooks.cli")

PREFECT_DB_URL = "PREFECT_API_DATABASE_CONNECTION_URL"


class PrefectDatabaseError(RuntimeError):
    """The PostgreSQL database for Prefect could not be reached or created."""


@dataclass(frozen=True)
class PrefectDatabase:
    """Where the server keeps its state, as the stack's log shows it (never a password)."""

    kind: str
    shown: str
    #: PREFECT_API_DATABASE_CONNECTION_URL to hand the server; None = Prefect's default.
    url: str | None = None


def asyncpg_url(dsn: str) -> str:
    """The SQLAlchemy URL (`postgresql+asyncpg://`) Prefect takes for a libpq DSN."""
    params = conninfo_to_dict(dsn)
    host = str(params.get("host") or "127.0.0.1")
    port = str(params.get("port") or "5432")
    user = quote(str(params.get("user") or "postgres"), safe="")
    password = params.get("password")
    auth = f"{user}:{quote(str(password), safe='')}" if password else user
    dbname = quote(str(params.get("dbname") or "prefect"), safe="")
    if host.startswith("/"):  # a Unix socket directory: asyncpg takes it as a query argument
        return f"postgresql+asyncpg://{auth}@/{dbname}?host={quote(host, safe='')}&port={port}"
    return f"postgresql+asyncpg://{auth}@{host}:{port}/{dbname}"


def shown_dsn(dsn: str) -> str:
    """`user@host:port/dbname` of a DSN, for logs: no password, no other parameters."""
    params = conninfo_to_dict(dsn)
    return (
        f"{params.get('user') or 'postgres'}@{params.get('host') or '127.0.0.1'}:"
        f"{params.get('port') or '5432'}/{params.get('dbname') or 'prefect'}"
    )


def ensure_database(dsn: str, timeout_s: float = 10.0) -> bool:
    """Create the DSN's database when it does not exist; True if it was created.

    Connects to the server's `postgres` database to do it. Errors never carry the DSN (it
    may hold a password): only the server's own message.
    """
    params = conninfo_to_dict(dsn)
    dbname = str(params.get("dbname") or "prefect")
    admin = make_conninfo(dsn, dbname="postgres", connect_timeout=str(int(max(1, timeout_s))))
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
            if found.fetchone() is not None:
                return False
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
            except psycopg.errors.DuplicateDatabase:  # another node made it meanwhile
                return False
            return True
    except psycopg.Error as exc:
        detail = exc.diag.message_primary or type(exc).__name__
        raise PrefectDatabaseError(
            f"Prefect's PostgreSQL database {shown_dsn(dsn)}: {detail}"
        ) from None


def prefect_database(
    kind: str, dsn: str, env: Mapping[str, str], sqlite_home: str
) -> PrefectDatabase:
    """The server's database for `RUNBOOKS_PREFECT_DB=kind`, creating a PostgreSQL one.

    An explicit PREFECT_API_DATABASE_CONNECTION_URL in `env` is used unchanged.
    """
    given = env.get(PREFECT_DB_URL)
    if given:
        scheme, _, rest = given.partition("://")
        # user:password@ never reaches a log line
        where = f"…@{rest.rpartition('@')[2]}" if "@" in rest else rest
        return PrefectDatabase(scheme.split("+")[0] or "custom", f"{scheme}://{where}")
    if kind == "sqlite":
        return PrefectDatabase("sqlite", f"SQLite under {sqlite_home}")
    if ensure_database(dsn):
        log.info("created the Prefect database %s", shown_dsn(dsn))
    return PrefectDatabase("postgres", f"PostgreSQL {shown_dsn(dsn)}", asyncpg_url(dsn))
