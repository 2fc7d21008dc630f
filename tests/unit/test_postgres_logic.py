"""Pure parts of the PostgreSQL actions: redaction, validation, guard wording."""

from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

from tasks.clients import pg_target
from tasks.postgres import TerminationGuard, guard_summary, redact_query
from tasks.settings import PostgresSettings


def test_string_literals_are_masked() -> None:
    q = "ALTER ROLE app PASSWORD 'hunter2''s secret' VALID UNTIL 'infinity'"
    out = redact_query(q)
    assert "hunter2" not in out
    assert out == "ALTER ROLE app PASSWORD '…' VALID UNTIL '…'"


def test_long_queries_are_truncated() -> None:
    assert len(redact_query("SELECT " + "x, " * 500, limit=80)) == 80


def test_target_never_shows_the_password() -> None:
    s = PostgresSettings(dsn=SecretStr("postgresql://app:p%40ss-w0rd@db.internal:6432/orders"))
    assert pg_target(s) == "db.internal:6432/orders"
    assert "w0rd" not in repr(s)
    kv = PostgresSettings(dsn=SecretStr("host=db port=5433 dbname=x user=u password=zz"))
    assert pg_target(kv) == "db:5433/x"


@pytest.mark.parametrize(
    "bad",
    [
        {"max_sessions": 0},
        {"max_sessions": 5001},
        {"idle_minutes": 0},
        {"states": []},
        {"states": ["active"]},
        {"database": "a b"},
        {"username": "x';--"},
    ],
)
def test_guard_rejects_bad_input(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        TerminationGuard.model_validate(bad)


def test_guard_summary_names_every_limit() -> None:
    text = guard_summary(TerminationGuard(database="orders", username="app", max_sessions=7))
    for part in (
        "client backends only",
        "never superusers",
        "idle > 10 min",
        "at most 7",
        "database = orders",
        "role = app",
    ):
        assert part in text
