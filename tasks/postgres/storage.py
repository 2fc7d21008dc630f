"""Read-only storage checks: database and WAL sizes, WAL archiving freshness."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

import psycopg
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from tasks.clients import pg_connect, pg_target
from tasks.logs import run_logger
from tasks.retry import RETRY_READ
from tasks.settings import PostgresSettings

ArchiverStatus = Literal["off", "never", "failing", "stale", "ok"]


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


def _age_text(seconds: float | None) -> str:
    """A duration as the archiver's verdict states it (`3:05:00`)."""
    if seconds is None:
        return "-"
    return str(timedelta(seconds=int(seconds)))


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
            f"last segment archived {_age_text(age)} ago (> {_age_text(max_age_s)}):"
            " normal on an idle server without archive_timeout, else check the archiver"
        )
    else:
        status, detail = "ok", f"last segment archived {_age_text(age)} ago"
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
