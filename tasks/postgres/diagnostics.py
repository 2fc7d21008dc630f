"""Read-only diagnostics (issue 9): the high-error-rate and high-latency runbooks' evidence.

Top statements (pg_stat_statements), N+1 suspects, tables read by sequential scans. Each one
reads catalog / statistics views only; nothing here changes the server.
"""

from __future__ import annotations

import re
from typing import Literal

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql
from psycopg.rows import DictRow
from pydantic import BaseModel, Field

from tasks.clients import pg_connect, pg_target
from tasks.errors import PermanentError
from tasks.logs import run_logger
from tasks.postgres.common import check_name, redact_query, settings_for
from tasks.retry import RETRY_READ
from tasks.settings import PostgresSettings

DiagnosticStatus = Literal["ok", "extension_missing", "not_preloaded", "permission_denied"]


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
    settings = settings_for(database, base)
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
