"""Network faults between the runbook and PostgreSQL: cut connections, a port that never answers."""

from __future__ import annotations

import pytest

from flows.pool_threshold import PoolThresholdParams, pool_threshold
from tasks.errors import TransientError
from tests.fixtures.faults import DeafPort, ProxyFactory
from tests.fixtures.postgres import PgWorld
from tests.fixtures.prefect_runs import task_runs

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_connection_reset_is_retried_and_the_check_completes(
    pg_env: PgWorld, cutting_proxy: ProxyFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = cutting_proxy(("127.0.0.1", 5432), cut_first=1)
    monkeypatch.setenv("RUNBOOKS_PG_DSN", f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres")
    state = pool_threshold(PoolThresholdParams(threshold_percent=100), return_state=True)
    assert state.is_completed(), state.message
    assert task_runs(state.state_details.flow_run_id) == {"measure-pool-usage": 2}
    assert proxy.accepted >= 2


def test_port_that_never_answers_times_out_then_fails_clearly(
    pg_env: PgWorld, silent_port: DeafPort, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNBOOKS_PG_DSN", f"postgresql://postgres@127.0.0.1:{silent_port.port}/db")
    monkeypatch.setenv("RUNBOOKS_PG_CONNECT_TIMEOUT_S", "1")
    state = pool_threshold(PoolThresholdParams(threshold_percent=100), return_state=True)
    assert state.is_failed()
    # libpq's own words for connect_timeout firing: the attempt was cut, not left hanging.
    with pytest.raises(TransientError, match="timeout expired"):
        state.result()
    # 1 attempt + RUNBOOKS_RETRY_ATTEMPTS=2 retries, counted by Prefect, not timed.
    assert task_runs(state.state_details.flow_run_id) == {"measure-pool-usage": 3}


def test_the_timeout_error_names_the_target(
    pg_env: PgWorld, silent_port: DeafPort, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNBOOKS_PG_DSN", f"postgresql://postgres@127.0.0.1:{silent_port.port}/db")
    monkeypatch.setenv("RUNBOOKS_PG_CONNECT_TIMEOUT_S", "1")
    state = pool_threshold(PoolThresholdParams(threshold_percent=100), return_state=True)
    with pytest.raises(TransientError, match=f"127.0.0.1:{silent_port.port}/db unavailable"):
        state.result()
