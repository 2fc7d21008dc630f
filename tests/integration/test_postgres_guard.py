"""The termination guard against real sessions on the local PostgreSQL."""

from __future__ import annotations

import time

import pytest

from tasks.postgres import (
    TerminationGuard,
    kill_planned,
    read_pool_usage,
    select_sessions,
    survey_pool,
)
from tests.fixtures.postgres import PgBouncer, PgWorld, Sessions, alive, pid, wait_gone

ONE_SECOND = 1.0 / 60  # idle_minutes for "older than one second"


def guard(world: PgWorld, **kw: object) -> TerminationGuard:
    base: dict[str, object] = {
        "database": world.database,
        "idle_minutes": ONE_SECOND,
        "protected_roles": [world.protected_role],
    }
    return TerminationGuard.model_validate(base | kw)


def test_only_the_right_sessions_die(pg_env: PgWorld, sessions: Sessions) -> None:
    w = pg_env
    old_idle = sessions.open(w.app_role, "idle")
    old_iit = sessions.open(w.app_role, "idle in transaction")
    super_iit = sessions.open(w.super_role, "idle in transaction")
    protected_idle = sessions.open(w.protected_role, "idle")
    time.sleep(1.3)
    young_idle = sessions.open(w.app_role, "idle")
    young_iit = sessions.open(w.app_role, "idle in transaction")
    active = sessions.open(w.app_role, "active")
    time.sleep(0.2)

    plan = select_sessions(guard(w))
    assert {s.pid for s in plan.sessions} == {pid(old_idle), pid(old_iit)}
    assert not plan.more_than_cap

    result = kill_planned(plan)
    assert {s.pid for s in result.terminated} == {pid(old_idle), pid(old_iit)}
    assert result.spared_pids == []
    assert result.failed_pids == []
    assert wait_gone([pid(old_idle), pid(old_iit)]) == set()
    survivors = [super_iit, protected_idle, young_idle, young_iit, active]
    assert alive([pid(c) for c in survivors]) == {pid(c) for c in survivors}


def test_states_and_user_filters(pg_env: PgWorld, sessions: Sessions) -> None:
    w = pg_env
    idle = sessions.open(w.app_role, "idle")
    iit = sessions.open(w.app_role, "idle in transaction")
    time.sleep(1.2)
    only_idle = select_sessions(guard(w, states=["idle"]))
    assert {s.pid for s in only_idle.sessions} == {pid(idle)}
    other_user = select_sessions(guard(w, username=w.protected_role, protected_roles=[]))
    assert other_user.sessions == []
    other_db = select_sessions(guard(w, database="postgres"))
    assert pid(iit) not in {s.pid for s in other_db.sessions}


def test_session_turned_active_after_plan_survives(pg_env: PgWorld, sessions: Sessions) -> None:
    w = pg_env
    victim = sessions.open(w.app_role, "idle")
    bystander = sessions.open(w.app_role, "idle")
    time.sleep(1.2)
    plan = select_sessions(guard(w))
    assert {s.pid for s in plan.sessions} == {pid(victim), pid(bystander)}

    sessions.run_in_background(bystander, "SELECT pg_sleep(3)")
    sessions.wait_for_state(pid(bystander), "active")
    result = kill_planned(plan)

    assert [s.pid for s in result.terminated] == [pid(victim)]
    assert result.spared_pids == [pid(bystander)]
    assert alive([pid(bystander)]) == {pid(bystander)}


def test_cap_holds(pg_env: PgWorld, sessions: Sessions) -> None:
    w = pg_env
    conns = [sessions.open(w.app_role, "idle") for _ in range(5)]
    time.sleep(1.2)
    plan = select_sessions(guard(w, max_sessions=2))
    assert len(plan.sessions) == 2
    assert plan.more_than_cap
    # Oldest idle first: the first two opened.
    assert [s.pid for s in plan.sessions] == [pid(c) for c in conns[:2]]
    result = kill_planned(plan)
    assert len(result.terminated) == 2
    assert wait_gone([pid(c) for c in conns[:2]]) == set()
    assert alive([pid(c) for c in conns[2:]]) == {pid(c) for c in conns[2:]}


def test_plan_alone_kills_nothing(pg_env: PgWorld, sessions: Sessions) -> None:
    w = pg_env
    conns = [sessions.open(w.app_role, "idle") for _ in range(3)]
    time.sleep(1.2)
    plan = select_sessions(guard(w))
    assert len(plan.sessions) == 3
    time.sleep(0.3)
    assert alive([pid(c) for c in conns]) == {pid(c) for c in conns}


def test_usage_counts_the_sessions(pg_env: PgWorld, sessions: Sessions) -> None:
    before = read_pool_usage()
    for _ in range(3):
        sessions.open(pg_env.app_role, "idle")
    after = read_pool_usage()
    by_db = {c.key: c.count for c in after.by_database}
    assert by_db.get(pg_env.database) == 3
    assert after.max_connections == before.max_connections > 0
    assert after.percent_used == pytest.approx(
        100 * after.client_connections / after.max_connections, abs=0.01
    )
    assert after.free_for_applications == (
        after.max_connections - after.superuser_reserved - after.reserved - after.client_connections
    )


def test_the_survey_reads_findings_and_plan_at_one_moment(
    pg_env: PgWorld, sessions: Sessions
) -> None:
    """One transaction: the same now() and the same pg_stat_activity for both halves."""
    w = pg_env
    idle = sessions.open(w.app_role, "idle")
    iit = sessions.open(w.app_role, "idle in transaction")
    time.sleep(1.2)
    survey = survey_pool.fn(guard(w))
    assert survey.snapshot.usage.taken_at == survey.plan.planned_at
    assert {s.pid for s in survey.plan.sessions} == {pid(idle), pid(iit)}
    by_db = {c.key: c.count for c in survey.snapshot.usage.by_database}
    assert by_db.get(w.database) == 2
    assert [t.pid for t in survey.snapshot.idle_in_transaction] == [pid(iit)]
    assert alive([pid(idle), pid(iit)]) == {pid(idle), pid(iit)}


def test_pgbouncer_show_pools_read_only(
    pg_env: PgWorld, pgbouncer: PgBouncer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    from tasks.postgres import show_pgbouncer_pools

    assert show_pgbouncer_pools.fn() == []  # not configured: nothing read
    monkeypatch.setenv("RUNBOOKS_PGBOUNCER_DSN", pgbouncer.admin_dsn)
    dsn = f"postgresql://{pg_env.app_role}@127.0.0.1:{pgbouncer.port}/{pgbouncer.database}"
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as client:
        client.execute("SELECT 1")
        pools = show_pgbouncer_pools.fn()
    mine = [p for p in pools if p.database == pgbouncer.database and p.user == pg_env.app_role]
    assert len(mine) == 1
    assert mine[0].cl_active == 1
    assert mine[0].cl_waiting == 0
