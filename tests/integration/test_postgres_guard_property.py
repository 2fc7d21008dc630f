"""Property: the Python guard and the SQL guard select exactly the same sessions.

Hypothesis draws synthetic `pg_stat_activity` rows and guards; the SQL predicate runs in the
real PostgreSQL over a VALUES list, so the text of the statement that kills is what is tested.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from tasks.postgres import (
    GUARD_SQL,
    IDLE_STATES,
    Session,
    TerminationGuard,
    guard_params,
    is_terminable,
)
from tasks.settings import PostgresSettings
from tests.fixtures.postgres import ADMIN_DSN

ROLES = ["app", "batch", "postgres", "replication", "ops"]
STATES = [*IDLE_STATES, "active", "disabled", "fastpath function call", None]
TYPES = ["client backend", "autovacuum worker", "walsender", "background worker"]


def _mostly(usual: object, others: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually `usual`, sometimes anything: most rows are near the edge of terminable."""
    return st.one_of(st.just(usual), st.just(usual), st.just(usual), others)


rows_st = st.fixed_dictionaries(
    {
        "backend_type": _mostly("client backend", st.sampled_from(TYPES)),
        "usename": _mostly("app", st.one_of(st.none(), st.sampled_from(ROLES))),
        "datname": _mostly("app", st.one_of(st.none(), st.sampled_from(["analytics", "x"]))),
        "state": _mostly("idle", st.sampled_from(STATES)),
        "age_s": st.one_of(st.none(), st.integers(0, 7200), st.integers(5400, 7200)),
        "rolsuper": _mostly(False, st.booleans()),
        "is_self": _mostly(False, st.booleans()),
    }
)
guards_st = st.builds(
    TerminationGuard,
    states=st.lists(st.sampled_from(IDLE_STATES), min_size=1, max_size=3, unique=True),
    idle_minutes=st.floats(0.5, 90),
    database=st.one_of(st.none(), st.sampled_from(["app", "analytics"])),
    username=st.one_of(st.none(), st.sampled_from(ROLES)),
    protected_roles=st.lists(st.sampled_from(ROLES), max_size=2),
    max_sessions=st.just(50),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(rows_st, min_size=1, max_size=12), guard=guards_st)
def test_python_and_sql_guards_agree(rows: list[dict[str, Any]], guard: TerminationGuard) -> None:
    config = PostgresSettings()
    protected = set(config.protected_roles) | set(guard.protected_roles)
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        cur = conn.execute("SELECT now()")
        now: datetime = cur.fetchone()[0]  # type: ignore[index]
        sessions = [
            Session(
                pid=i + 1,
                backend_start=datetime(2026, 1, 1, tzinfo=UTC),
                state_change=None if r["age_s"] is None else now - timedelta(seconds=r["age_s"]),
                **{k: v for k, v in r.items() if k != "age_s"},
            )
            for i, r in enumerate(rows)
        ]
        values = sql.SQL(", ").join(
            sql.SQL(
                "({}::int, {}::text, {}::text, {}::text, {}::timestamptz, {}::text, {}, {})"
            ).format(
                s.pid,
                s.backend_type,
                s.usename,
                s.datname,
                s.state_change,
                s.state,
                s.rolsuper,
                s.is_self,
            )
            for s in sessions
        )
        query = (
            sql.SQL(
                "SELECT s.pid FROM (VALUES {}) AS s(pid, backend_type, usename, datname,"
                " state_change, state, rolsuper, is_self) WHERE "
            )
            .format(values)
            .as_string(conn)
            + GUARD_SQL
        )
        got = {r[0] for r in conn.execute(query, guard_params(guard, config)).fetchall()}
    expected = {s.pid for s in sessions if is_terminable(s, guard, protected, now)}
    assert got == expected
