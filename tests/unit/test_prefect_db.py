"""Which database `make run`'s Prefect server uses, and how it is shown (never a password)."""

from __future__ import annotations

import pytest

from deployments.prefect_db import asyncpg_url, prefect_database, shown_dsn
from deployments.settings import StackSettings


@pytest.mark.parametrize(
    ("dsn", "url"),
    [
        (
            "postgresql://postgres@127.0.0.1:5432/runbooks_prefect",
            "postgresql+asyncpg://postgres@127.0.0.1:5432/runbooks_prefect",
        ),
        (
            "postgresql://pre fect:p@ss/w:rd@db.example:6543/prefect",
            "postgresql+asyncpg://pre%20fect:p%40ss%2Fw%3Ard@db.example:6543/prefect",
        ),
        (
            "host=/var/run/postgresql dbname=prefect user=prefect",
            "postgresql+asyncpg://prefect@/prefect?host=%2Fvar%2Frun%2Fpostgresql&port=5432",
        ),
    ],
)
def test_asyncpg_url_from_a_libpq_dsn(dsn: str, url: str) -> None:
    if "p@ss" in dsn:  # a URL needs its password percent-encoded; a keyword DSN does not
        dsn = "host=db.example port=6543 dbname=prefect user='pre fect' password='p@ss/w:rd'"
    assert asyncpg_url(dsn) == url


def test_shown_dsn_has_no_password() -> None:
    shown = shown_dsn("postgresql://prefect:s3cret-value@db:5432/prefect?sslmode=require")
    assert shown == "prefect@db:5432/prefect"
    assert "s3cret" not in shown


def test_an_explicit_connection_url_wins_and_is_shown_without_its_password() -> None:
    env = {"PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://u:s3cret@db:5432/p"}
    db = prefect_database("sqlite", "postgresql://ignored@nowhere/x", env, "/home")
    assert db.url is None  # left in the environment as the operator set it
    assert db.kind == "postgresql"
    assert db.shown == "postgresql+asyncpg://…@db:5432/p"


def test_sqlite_is_the_default_and_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNBOOKS_PREFECT_DB", raising=False)
    stack = StackSettings()
    assert stack.prefect_db == "sqlite"
    db = prefect_database(stack.prefect_db, stack.prefect_pg_dsn.get_secret_value(), {}, "/h")
    assert (db.kind, db.url) == ("sqlite", None)


def test_runbooks_prefect_db_is_read_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBOOKS_PREFECT_DB", "postgres")
    monkeypatch.setenv("RUNBOOKS_PREFECT_PG_DSN", "postgresql://u:pw@db:5432/p")
    stack = StackSettings()
    assert stack.prefect_db == "postgres"
    assert "pw" not in repr(stack)
    monkeypatch.setenv("RUNBOOKS_PREFECT_DB", "mysql")
    with pytest.raises(ValueError, match=r"sqlite.*postgres"):
        StackSettings()
