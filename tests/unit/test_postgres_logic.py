"""Pure parts of the PostgreSQL actions: redaction, validation, guard wording."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from flows.db_pool_exhausted import DbPoolParams, DbPoolRunbook, PoolFindings
from flows.driver import needs_approval
from flows.report_text import guard_summary
from tasks.clients import classify_pg_error, pg_connect, pg_target
from tasks.errors import PermanentError
from tasks.postgres import (
    PoolUsage,
    TerminationGuard,
    TerminationPlan,
    redact_query,
)
from tasks.settings import PostgresSettings


def test_string_literals_are_masked() -> None:
    q = "ALTER ROLE app PASSWORD 'hunter2''s secret' VALID UNTIL 'infinity'"
    assert redact_query(q) == "ALTER ROLE app PASSWORD '…' VALID UNTIL '…'"


@pytest.mark.parametrize(
    ("query", "masked"),
    [
        ("DO $$ BEGIN PERFORM 'x'; secret; END $$", "DO $$…$$"),
        ("SELECT $body$ a $$ secret $body$, $1", "SELECT $body$…$body$, $1"),
        ("SELECT E'it\\'s secret'", "SELECT E'…'"),
        ("SELECT e'a\\\\' , 'secret'", "SELECT E'…' , '…'"),
        ("SELECT E'two '' quotes secret'", "SELECT E'…'"),
        ("-- it's\nALTER ROLE x PASSWORD 'secret'", "--… ALTER ROLE x PASSWORD '…'"),
        ("SELECT /* 'secret' */ 1", "SELECT /*…*/ 1"),
        ("SELECT 'unterminated secret", "SELECT '…'"),
        ("SELECT $$unterminated secret", "SELECT $$…$$"),
        ("SELECT \"it's\" FROM t WHERE x = 'secret'", "SELECT \"it's\" FROM t WHERE x = '…'"),
        ("SELECT price$ FROM t WHERE note$x$ = 1", "SELECT price$ FROM t WHERE note$x$ = 1"),
        ("SELECTE'secret'", "SELECTE'…'"),
    ],
)
def test_every_literal_form_is_masked(query: str, masked: str) -> None:
    assert redact_query(query) == masked


# The marker at both ends: a literal closed too early would show the closing one.
_SECRET = st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=0, max_size=40).map(
    lambda s: "SeCrEt" + s + "SeCrEt"
)


def _quoted(secret: str, form: str) -> str:
    """`secret` written as a PostgreSQL literal of the given form, correctly escaped."""
    if form == "standard":
        return "'" + secret.replace("'", "''") + "'"
    if form == "escape":
        return "E'" + secret.replace("\\", "\\\\").replace("'", "\\'") + "'"
    tags = ["$$"] if form == "dollar" else []
    tags += [f"$t{i}$" for i in range(50)]
    tag = next(t for t in tags if t not in secret)
    return tag + secret + tag


@given(
    secret=_SECRET,
    form=st.sampled_from(["standard", "escape", "dollar", "tagged"]),
    prefix=st.sampled_from(["SELECT ", "ALTER ROLE app PASSWORD ", "INSERT INTO t VALUES ("]),
)
def test_no_literal_survives_redaction(secret: str, form: str, prefix: str) -> None:
    out = redact_query(prefix + _quoted(secret, form) + " , 1", limit=10_000)
    assert "SeCrEt" not in out


def test_long_queries_are_truncated() -> None:
    assert len(redact_query("SELECT " + "x, " * 500, limit=80)) == 80


def test_target_never_shows_the_password() -> None:
    s = PostgresSettings(dsn=SecretStr("postgresql://app:p%40ss-w0rd@db.internal:6432/orders"))
    assert pg_target(s) == "db.internal:6432/orders"


def test_settings_repr_hides_the_dsn() -> None:
    s = PostgresSettings(dsn=SecretStr("postgresql://app:p%40ss-w0rd@db.internal:6432/orders"))
    assert "w0rd" not in repr(s)


def test_target_from_keyword_form() -> None:
    kv = PostgresSettings(dsn=SecretStr("host=db port=5433 dbname=x user=u password=zz"))
    assert pg_target(kv) == "db:5433/x"


# A password with / @ % : and a space, written wrongly (not percent-encoded) or unquoted:
# libpq either refuses it quoting the text, or "parses" pieces of it into host and port.
MISWRITTEN = [
    "postgresql://app:Kq7vX/Wm3zR@Jt9pL@db:5432/orders",
    "postgresql://app:Kq7vX@Wm3zR@db/orders",
    "postgresql://app:Kq7vX%Wm3zR@db/orders",
    "postgresql://app:Kq7vX Wm3zR@db/orders",
    "host=db dbname=orders password=Kq7vX Wm3zR",
]


@pytest.mark.parametrize("dsn", MISWRITTEN)
def test_target_of_a_miswritten_dsn_shows_no_piece_of_it(dsn: str) -> None:
    assert pg_target(PostgresSettings(dsn=SecretStr(dsn))) == "<malformed DSN>"


@pytest.mark.parametrize("dsn", MISWRITTEN)
def test_connecting_with_a_miswritten_dsn_fails_with_a_fixed_message(dsn: str) -> None:
    with pytest.raises(PermanentError) as err, pg_connect(PostgresSettings(dsn=SecretStr(dsn))):
        pass
    assert "DSN is malformed" in str(err.value)
    assert not re.search("Kq7vX|Wm3zR|Jt9pL", str(err.value))


def test_error_messages_blot_out_the_password() -> None:
    import psycopg

    exc = psycopg.OperationalError('connection failed: bad "p/ss w0rd:x" and p%2Fss%20w0rd%3Ax')
    text = str(classify_pg_error(exc, "db:5432/x", secret="p/ss w0rd:x"))
    assert "w0rd" not in text


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


def _params(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {"guard": {"database": "orders"}}
    return base | kw


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"guard": {"idle_minutes": 0.5}}, "idle_minutes must be at least 1"),
        ({"guard": {"max_sessions": 101}}, "max_sessions must be at most 100"),
        ({"timeout_role": "x';--"}, "not a valid PostgreSQL name"),
        ({"idle_in_transaction_timeout_s": 300}, "timeout_role is required"),
        (
            {"idle_in_transaction_timeout_s": 59, "timeout_scope": "system"},
            "at least 60 s",
        ),
        (
            {
                "idle_in_transaction_timeout_s": 300,
                "timeout_scope": "system",
                "timeout_role": "app",
            },
            "timeout_role must be unset",
        ),
    ],
)
def test_blast_radius_floors(bad: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DbPoolParams.model_validate(_params(**bad))


@pytest.mark.parametrize(
    "good",
    [
        {"guard": {"idle_minutes": 1}},
        {"guard": {"max_sessions": 100}},
        {"idle_in_transaction_timeout_s": 5, "timeout_role": "app"},
        {"idle_in_transaction_timeout_s": 60, "timeout_scope": "system"},
    ],
)
def test_values_on_the_floor_are_accepted(good: dict[str, object]) -> None:
    DbPoolParams.model_validate(_params(**good))


def test_the_per_role_timeout_is_the_default_scope() -> None:
    assert DbPoolParams().timeout_scope == "role"


def test_the_max_sessions_cap_comes_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBOOKS_PG_MAX_SESSIONS_CAP", "500")
    assert (
        DbPoolParams.model_validate(_params(guard={"max_sessions": 500})).guard.max_sessions == 500
    )


def test_defaults_stay_inside_a_stricter_floor_and_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBOOKS_PG_MAX_SESSIONS_CAP", "20")
    monkeypatch.setenv("RUNBOOKS_PG_MIN_IDLE_MINUTES", "30")
    guard = DbPoolParams().guard
    assert (guard.max_sessions, guard.idle_minutes) == (20, 30.0)


def _findings() -> PoolFindings:
    usage = PoolUsage.model_validate(
        {
            "taken_at": datetime.now(UTC),
            "target": "db:5432/x",
            "max_connections": 100,
            "reserved": 0,
            "superuser_reserved": 3,
            "client_connections": 90,
            "percent_used": 90.0,
            "free_for_applications": 7,
            "by_state": [],
            "by_database": [],
            "by_user": [],
        }
    )
    plan = TerminationPlan(
        target="db:5432/x",
        guard=TerminationGuard(),
        planned_at=datetime.now(UTC),
        sessions=[],
        more_than_cap=False,
    )
    return PoolFindings(usage=usage, sessions=plan)


@pytest.mark.parametrize(
    ("scope", "asks_with_auto_approve"),
    [({"timeout_role": "app"}, False), ({"timeout_scope": "system"}, True)],
)
def test_a_system_wide_timeout_always_asks_a_human(
    scope: dict[str, object], asks_with_auto_approve: bool
) -> None:
    """Without `require_approval` any more, the system-wide change is an `always` action:
    `auto_approve` covers a per-role timeout, never ALTER SYSTEM."""
    params = DbPoolParams.model_validate(
        _params(idle_in_transaction_timeout_s=60, auto_approve=True, **scope)
    )
    (action,) = DbPoolRunbook().plan(params, _findings())
    assert action.kind == "set-idle-in-transaction-timeout"
    assert needs_approval([action], auto_approve=True) is asks_with_auto_approve
    assert needs_approval([action], auto_approve=False) is True
