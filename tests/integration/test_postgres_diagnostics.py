"""The read-only PostgreSQL diagnostics against real servers.

`pg_stat_statements` and WAL archiving need server settings the shared server does not
have: those tests run on a private cluster (`pg_private`) with the sandbox's schema and seed
(`orders.user_id` has no index on purpose). The shared server stands for a production server
without the extension and with archiving off.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

import psycopg
import pytest
from prefect import flow
from pydantic import SecretStr

from sandbox.db import create_database, drop_database
from tasks.errors import PermanentError, TransientError
from tasks.postgres import (
    ArchiverState,
    TopStatements,
    activity_by_db_user,
    archiver_status,
    n_plus_one_suspects,
    read_activity_by_db_user,
    read_archiver,
    read_seq_scan_tables,
    read_storage_sizes,
    read_top_statements,
    seq_scan_tables,
    storage_sizes,
    top_statements,
)
from tasks.settings import PostgresSettings
from tests.fixtures.pg_private import PrivateCluster
from tests.fixtures.postgres import ADMIN_DSN, PgWorld, Sessions

T = TypeVar("T")
SECRET = "hunter2-" + uuid.uuid4().hex[:8]
REQUESTS = 20
ORDERS_PER_REQUEST = 25


def settings(dsn: str) -> PostgresSettings:
    return PostgresSettings(dsn=SecretStr(dsn), connect_timeout_s=2)


def wait_for(read: Callable[[], T], done: Callable[[T], bool], timeout: float = 15.0) -> T:
    """Read until `done` holds (statistics reach shared memory asynchronously)."""
    deadline = time.monotonic() + timeout
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.1)
        value = read()
    return value


@pytest.fixture(scope="module")
def akig(pg_private: PrivateCluster) -> Iterator[str]:
    """The sandbox database in the private cluster, with an N+1 and a missing-index workload."""
    dsn = create_database(pg_private.admin_dsn, "akig_diag", users=500, orders=20_000)
    # As an operator sets it up: the extension where the runbook connects (postgres).
    with psycopg.connect(pg_private.admin_dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        conn.execute("SELECT pg_stat_statements_reset()")
    # N+1: each "request" lists orders, then looks up each order's user one by one.
    with psycopg.connect(dsn, autocommit=True) as conn:
        for r in range(REQUESTS):
            rows = conn.execute(
                "SELECT id, user_id FROM orders WHERE id > %s ORDER BY id LIMIT %s",
                (r * ORDERS_PER_REQUEST, ORDERS_PER_REQUEST),
            ).fetchall()
            for _, user_id in rows:
                conn.execute("SELECT name, email FROM users WHERE id = %s", (user_id,))
        # The missing index: orders by user sequentially scan 20,000 rows each time.
        for user_id in range(1, 31):
            conn.execute("SELECT count(*) FROM orders WHERE user_id = %s", (user_id,))
        # A utility statement keeps its literal in pg_stat_statements (not normalised).
        conn.execute(f"CREATE TABLE secret_copy AS SELECT '{SECRET}'::text AS note")
    # Closing the session flushed its table statistics; other backends see them shortly.
    yield dsn
    drop_database(pg_private.admin_dsn, "akig_diag")


def test_n_plus_one_is_top_by_calls(akig: str, pg_private: PrivateCluster) -> None:
    stats = read_top_statements(
        limit=5, database="akig_diag", settings=settings(pg_private.admin_dsn)
    )
    assert stats.status == "ok", stats.detail
    top = stats.by_calls[0]
    assert "FROM users WHERE id = $1" in top.query
    assert top.calls == REQUESTS * ORDERS_PER_REQUEST
    assert top.calls_per(REQUESTS) == ORDERS_PER_REQUEST
    suspects = n_plus_one_suspects(stats, requests=REQUESTS, factor=10)
    assert [s.query for s in suspects] == [top.query]  # the listing query (1/request) is not
    assert all(s.datname == "akig_diag" for s in stats.by_calls + stats.by_mean)
    # The seq scans of orders cost far more per call than the primary-key lookups.
    slow = stats.by_mean[0]
    assert "FROM orders WHERE user_id = $1" in slow.query or "secret_copy" in slow.query
    assert stats.by_total and stats.by_total[0].total_ms >= stats.by_total[-1].total_ms


def test_query_literals_are_redacted(akig: str, pg_private: PrivateCluster) -> None:
    with psycopg.connect(pg_private.admin_dsn) as conn:
        raw = conn.execute(
            "SELECT count(*) FROM pg_stat_statements WHERE query LIKE %s", (f"%{SECRET}%",)
        ).fetchone()
    assert raw is not None and raw[0] >= 1  # the view itself holds the literal
    stats = read_top_statements(
        limit=100, database="akig_diag", settings=settings(pg_private.admin_dsn)
    )
    texts = [s.query for s in stats.by_calls + stats.by_mean + stats.by_total]
    assert any("secret_copy" in t and "'…'" in t for t in texts)
    assert not any(SECRET in t or "hunter2" in t for t in texts)


def test_hidden_texts_are_said(akig: str, pg_private: PrivateCluster) -> None:
    with psycopg.connect(pg_private.admin_dsn, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS rb_viewer")
        conn.execute("CREATE ROLE rb_viewer LOGIN")
    stats = read_top_statements(
        limit=3, database="akig_diag", settings=settings(pg_private.dsn(role="rb_viewer"))
    )
    # Figures without texts: still "ok", and the detail says which grant is missing.
    assert stats.status == "ok"
    assert stats.by_calls[0].calls == REQUESTS * ORDERS_PER_REQUEST
    assert stats.by_calls[0].query == "<insufficient privilege>"
    assert "pg_read_all_stats" in stats.detail


def test_missing_index_is_flagged(akig: str, pg_private: PrivateCluster) -> None:
    report = wait_for(
        lambda: read_seq_scan_tables(
            min_rows=1000, database="akig_diag", settings=settings(pg_private.admin_dsn)
        ),
        lambda r: any(t.table == "orders" and t.seq_scan >= 30 for t in r.tables),
    )
    assert report.database == "akig_diag"
    orders = next(t for t in report.tables if t.table == "orders")
    assert orders.seq_tup_read >= 30 * 20_000
    assert orders.n_live_tup == 20_000
    assert orders.candidate_columns == ["user_id"]
    assert "CREATE INDEX CONCURRENTLY ON public.orders (user_id)" in orders.suggestion
    # users is read through its primary key: not a sequential-scan table.
    assert "users" not in {t.table for t in report.tables}


def test_extension_missing_is_a_result(pg_world: PgWorld) -> None:
    shared = settings(ADMIN_DSN)
    stats = read_top_statements(settings=shared)
    assert stats.status == "extension_missing"
    assert "shared_preload_libraries" in stats.detail
    assert "CREATE EXTENSION pg_stat_statements" in stats.detail
    assert stats.by_mean == stats.by_total == stats.by_calls == []
    # Created but not preloaded (the commonest half-setup): the view raises, we report.
    db_dsn = f"postgresql://postgres@127.0.0.1:5432/{pg_world.database}"
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    stats = read_top_statements(settings=settings(db_dsn))
    assert stats.status == "not_preloaded"
    assert "shared_preload_libraries" in stats.detail


def test_activity_grouped_by_database_and_role(pg_world: PgWorld, sessions: Sessions) -> None:
    sessions.open(pg_world.app_role, "idle")
    sessions.open(pg_world.app_role, "idle in transaction")
    sessions.open(pg_world.protected_role, "idle")
    result = read_activity_by_db_user(settings(ADMIN_DSN))
    groups = {(g.datname, g.usename): g for g in result.groups}
    app = groups[(pg_world.database, pg_world.app_role)]
    assert (app.count, app.idle, app.idle_in_transaction, app.active) == (2, 1, 1, 0)
    assert groups[(pg_world.database, pg_world.protected_role)].count == 1
    assert result.total == sum(g.count for g in result.groups) >= 3


def test_sizes_and_wal(pg_private: PrivateCluster) -> None:
    sizes = read_storage_sizes(settings(pg_private.admin_dsn))
    by_name = {d.datname: d for d in sizes.databases}
    assert by_name["postgres"].bytes is not None and by_name["postgres"].bytes > 1_000_000
    assert sizes.total_database_bytes >= sum(d.bytes or 0 for d in sizes.databases)
    assert sizes.wal_files is not None and sizes.wal_files >= 1
    assert sizes.wal_bytes is not None and sizes.wal_bytes >= 16 * 1024 * 1024
    assert sizes.wal_detail == "" and not sizes.in_recovery
    # A role without pg_monitor: database sizes still, WAL "permission denied", no exception.
    with psycopg.connect(pg_private.admin_dsn, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS rb_reader")
        conn.execute("CREATE ROLE rb_reader LOGIN")
    limited = read_storage_sizes(settings(pg_private.dsn(role="rb_reader")))
    assert limited.wal_bytes is None and limited.wal_files is None
    assert "permission denied" in limited.wal_detail and "pg_monitor" in limited.wal_detail
    assert {d.datname for d in limited.databases} >= {"postgres"}


def test_archiving_off_on_the_shared_server() -> None:
    state = read_archiver(settings=settings(ADMIN_DSN))
    assert state.status == "off" and state.archive_mode == "off"
    assert "archive_mode is off" in state.detail


def _switch_wal(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        # A switch on an empty segment is a no-op: write something first.
        conn.execute("CREATE TABLE IF NOT EXISTS wal_marker (n int)")
        conn.execute("INSERT INTO wal_marker VALUES (1)")
        conn.execute("SELECT pg_switch_wal()")


def test_archiver_ok_then_failing(pg_private: PrivateCluster) -> None:
    s = settings(pg_private.admin_dsn)
    _switch_wal(pg_private.admin_dsn)
    state: ArchiverState = wait_for(lambda: read_archiver(settings=s), lambda a: a.status == "ok")
    assert state.status == "ok", state.detail
    assert state.archived_count >= 1 and state.last_archived_wal
    assert state.last_archived_age_s is not None and state.last_archived_age_s < 600
    assert (pg_private.root / "archive" / state.last_archived_wal).exists()
    stale = read_archiver(max_age_s=0.0, settings=s)  # any age is too old: the stale verdict
    assert stale.status == "stale" and "ago" in stale.detail
    # An archive_command that fails: the verdict turns "failing" with the segment named.
    with psycopg.connect(pg_private.admin_dsn, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET archive_command = 'false'")
        conn.execute("SELECT pg_reload_conf()")
    try:
        _switch_wal(pg_private.admin_dsn)
        state = wait_for(lambda: read_archiver(settings=s), lambda a: a.status == "failing")
        assert state.status == "failing" and state.failed_count >= 1
        assert state.last_failed_wal and state.last_failed_wal in state.detail
    finally:
        with psycopg.connect(pg_private.admin_dsn, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM RESET archive_command")
            conn.execute("SELECT pg_reload_conf()")


def test_tasks_run_in_a_flow_against_the_shared_server(
    prefect_api: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNBOOKS_PG_DSN", ADMIN_DSN)

    @flow
    def diagnose() -> tuple[object, ...]:
        return (
            activity_by_db_user(),
            top_statements(limit=3),
            seq_scan_tables(),
            storage_sizes(),
            archiver_status(),
        )

    activity, stats, seq, sizes, archiver = diagnose()
    assert isinstance(stats, TopStatements) and stats.status == "extension_missing"
    assert activity.total >= 1  # type: ignore[attr-defined]
    assert seq.database == "postgres"  # type: ignore[attr-defined]
    assert sizes.total_database_bytes > 0  # type: ignore[attr-defined]
    assert archiver.status == "off"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://rb_app:Pw%2Fsecret%40x@127.0.0.1:1/postgres",  # nothing listens on :1
        "host=127.0.0.1 port=1 user=rb_app password='Pw/secret@x' dbname=postgres",
        "postgresql://rb_app:Pw/secret@x@127.0.0.1:1/postgres",  # malformed: raw / and @
    ],
)
def test_another_database_keeps_the_password_out(dsn: str) -> None:
    # `database` rebuilds the DSN: neither that nor the failure may show the password.
    with pytest.raises((TransientError, PermanentError)) as caught:
        read_seq_scan_tables(database="akig", settings=settings(dsn))
    text = f"{caught.value!r} {caught.value}"
    assert "secret" not in text and "Pw" not in text
