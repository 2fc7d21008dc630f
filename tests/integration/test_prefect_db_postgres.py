"""`RUNBOOKS_PREFECT_DB=postgres` on the local PostgreSQL: the database is made once."""

from __future__ import annotations

import os

import psycopg
import pytest
from psycopg import sql

from deployments.prefect_db import PrefectDatabaseError, ensure_database, prefect_database

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def test_the_database_is_created_once_and_the_url_points_at_it() -> None:
    name = f"runbooks_prefect_t{os.urandom(4).hex()}"
    dsn = f"postgresql://postgres@127.0.0.1:5432/{name}"
    try:
        db = prefect_database("postgres", dsn, {}, "/unused")
        assert db.url == f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
        assert db.shown == f"PostgreSQL postgres@127.0.0.1:5432/{name}"
        assert ensure_database(dsn) is False  # there already: nothing done
        with psycopg.connect(dsn) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (name,)
    finally:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


def test_an_unreachable_server_is_a_clear_error_without_the_password() -> None:
    dsn = "postgresql://postgres:s3cret-pw@127.0.0.1:1/prefect"
    with pytest.raises(PrefectDatabaseError) as caught:
        ensure_database(dsn, timeout_s=2)
    assert "postgres@127.0.0.1:1/prefect" in str(caught.value)
    assert "s3cret" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
