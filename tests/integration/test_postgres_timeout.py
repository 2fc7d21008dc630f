"""idle_in_transaction_session_timeout: read once, write idempotently, undo exactly; retries.

Tests that ALTER SYSTEM put back the value they found (`system_timeout_restored`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg
import pytest
from prefect import flow

from flows.db_pool_exhausted import DbPoolParams, db_pool_exhausted
from tasks.errors import PermanentError, TransientError
from tasks.postgres import (
    TerminationGuard,
    TimeoutChange,
    plan_terminations,
    read_idle_in_transaction_timeout,
    select_sessions,
    set_idle_in_transaction_timeout,
    terminate_sessions,
)
from tasks.retry import RETRY_IDEMPOTENT_WRITE, RETRY_READ
from tests.fixtures.postgres import (
    PgWorld,
    ReplyDropper,
    Sessions,
    pid,
    system_timeout_file_value,
    wait_gone,
)
from tests.fixtures.prefect_runs import flow_run_artifacts, task_runs

pytestmark = pytest.mark.usefixtures("prefect_api")

GUC = "idle_in_transaction_session_timeout"
# Long enough that no other test on this server notices it while it is in place.
SYSTEM_SECONDS = 7200


@flow
def apply_timeout(seconds: int, role: str | None) -> TimeoutChange:
    """Read, then write: the two steps as the runbook runs them."""
    reading = read_idle_in_transaction_timeout(role)
    return set_idle_in_transaction_timeout(seconds, reading)


def run_sql(dsn: str, statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for stmt in statements.split(";"):
            if stmt.strip():
                conn.execute(stmt)


def role_value(world: PgWorld) -> str:
    with psycopg.connect(world.dsn(world.app_role), autocommit=True) as conn:
        row = conn.execute("SELECT current_setting(%s)", (GUC,)).fetchone()
    assert row is not None
    return str(row[0])


def wait_for_setting(dsn: str, wanted: str) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT current_setting(%s)", (GUC,)).fetchone()
        if row and row[0] == wanted:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def role_timeout_reset(pg_env: PgWorld) -> PgWorld:
    run_sql(pg_env.admin_dsn, f'ALTER ROLE "{pg_env.app_role}" RESET {GUC}')
    return pg_env


def test_tasks_carry_the_right_retry_policy() -> None:
    assert read_idle_in_transaction_timeout.retries == RETRY_READ["retries"]
    assert set_idle_in_transaction_timeout.retries == RETRY_IDEMPOTENT_WRITE["retries"]
    assert plan_terminations.retries == RETRY_READ["retries"]
    # Killing sessions is not idempotent: never retried automatically.
    assert terminate_sessions.retries == 0


def test_system_timeout_applies_and_its_undo_restores(
    pg_env: PgWorld, system_timeout_restored: str | None
) -> None:
    change = apply_timeout(SYSTEM_SECONDS, None)
    assert change.new == f"{SYSTEM_SECONDS}s"
    assert wait_for_setting(pg_env.admin_dsn, "2h")
    run_sql(pg_env.admin_dsn, change.undo_sql)
    assert system_timeout_file_value() == system_timeout_restored


def test_role_timeout_applies_and_its_undo_restores(role_timeout_reset: PgWorld) -> None:
    world = role_timeout_reset
    run_sql(world.admin_dsn, f"ALTER ROLE \"{world.app_role}\" SET {GUC} = '45s'")
    change = apply_timeout(90, world.app_role)
    assert change.previous == "45s"
    assert role_value(world) == "90s"
    run_sql(world.admin_dsn, change.undo_sql)
    assert role_value(world) == "45s"


def test_role_timeout_without_previous_value_undoes_to_reset(role_timeout_reset: PgWorld) -> None:
    world = role_timeout_reset
    change = apply_timeout(60, world.app_role)
    assert change.previous is None
    run_sql(world.admin_dsn, change.undo_sql)
    assert role_value(world) == "0"


def test_retry_after_a_lost_reply_keeps_the_original_undo_in_the_flow(
    role_timeout_reset: PgWorld,
    reply_dropper: Callable[[bytes], ReplyDropper],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ALTER ROLE lands, its reply is lost, the task retries: the undo still restores 45s."""
    world = role_timeout_reset
    run_sql(world.admin_dsn, f"ALTER ROLE \"{world.app_role}\" SET {GUC} = '45s'")
    proxy = reply_dropper(b"ALTER ROLE")
    monkeypatch.setenv("RUNBOOKS_PG_DSN", f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres")
    params = DbPoolParams.model_validate(
        {
            "dry_run": False,
            "guard": TerminationGuard(database=world.database, idle_minutes=1 / 60),
            "act_above_percent": 0,
            "healthy_below_percent": 100,
            "cooldown_minutes": 0,
            "idle_in_transaction_timeout_s": 90,
            "timeout_role": world.app_role,
            "auto_approve": True,
        }
    )
    state = db_pool_exhausted(params, return_state=True)
    assert state.is_completed(), state.message
    assert proxy.fired
    runs = task_runs(state.state_details.flow_run_id)
    writes = {name: n for name, n in runs.items() if name.startswith("set-idle-in-transaction")}
    assert list(writes.values()) == [2]  # the write ran twice: the retry happened
    change = state.result().timeout_change
    assert change is not None
    assert change.previous == "45s"
    assert change.already_set is True
    assert role_value(world) == "90s"
    (md,) = flow_run_artifacts(state.state_details.flow_run_id, "db-pool-exhausted")
    assert "was 45s" in md
    run_sql(world.admin_dsn, change.undo_sql)
    assert role_value(world) == "45s"


def test_retry_after_a_lost_reload_reply_keeps_the_original_undo(
    pg_env: PgWorld,
    system_timeout_restored: str | None,
    reply_dropper: Callable[[bytes], ReplyDropper],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ALTER SYSTEM and the reload land, the reload's reply is lost: one change, same undo."""
    proxy = reply_dropper(b"pg_reload_conf")
    monkeypatch.setenv("RUNBOOKS_PG_DSN", f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres")
    state = apply_timeout(SYSTEM_SECONDS, None, return_state=True)
    assert state.is_completed(), state.message
    assert proxy.fired
    assert task_runs(state.state_details.flow_run_id)["set-idle-in-transaction-timeout-system"] == 2
    change = state.result()
    assert isinstance(change, TimeoutChange)
    assert change.previous == system_timeout_restored
    assert change.already_set is True
    assert system_timeout_file_value() == f"{SYSTEM_SECONDS}s"
    run_sql(pg_env.admin_dsn, change.undo_sql)
    assert system_timeout_file_value() == system_timeout_restored


def test_a_kill_whose_reply_is_lost_is_not_retried(
    pg_env: PgWorld,
    sessions: Sessions,
    reply_dropper: Callable[[bytes], ReplyDropper],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    victim = sessions.open(pg_env.app_role, "idle")
    time.sleep(1.2)
    plan = select_sessions(TerminationGuard(database=pg_env.database, idle_minutes=1 / 60))
    proxy = reply_dropper(b"pg_terminate_backend")
    monkeypatch.setenv("RUNBOOKS_PG_DSN", f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres")

    @flow
    def kill() -> None:
        terminate_sessions(plan)

    state = kill(return_state=True)
    assert state.is_failed()
    with pytest.raises(TransientError):
        state.result()
    assert proxy.fired
    # The kill landed; one attempt only: the flow re-measures, a human decides the rest.
    assert task_runs(state.state_details.flow_run_id) == {f"terminate-sessions-{plan.target}": 1}
    assert wait_gone([pid(victim)]) == set()


def test_set_timeout_rejects_bad_input(pg_env: PgWorld) -> None:
    with pytest.raises(PermanentError, match="does not exist"):
        read_idle_in_transaction_timeout.fn(role="no_such_role_xyz")


def test_read_rejects_an_invalid_role_name(pg_env: PgWorld) -> None:
    with pytest.raises(ValueError, match="not a valid PostgreSQL name"):
        read_idle_in_transaction_timeout.fn(role='x"; DROP ROLE postgres; --')


def test_a_system_timeout_under_a_minute_is_refused(pg_env: PgWorld) -> None:
    reading = read_idle_in_transaction_timeout.fn(role=None)
    with pytest.raises(PermanentError, match="at least 60 s"):
        set_idle_in_transaction_timeout.fn(seconds=59, reading=reading)
