"""After the approval, db-pool-exhausted measures the pool again before it acts (issue #8, 2).

On a private cluster (max_connections = 20, nobody else's sessions), the pool is over the
act threshold when the run plans and asks, and back under it when the approval comes (the
application closed its connections meanwhile). The approved run must see that and change
nothing, with both measurements in its artifact.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from prefect.flow_runs import resume_flow_run

from flows.db_pool_exhausted import RUNBOOK, DbPoolParams, db_pool_exhausted
from tasks.postgres import TerminationGuard
from tests.fixtures.pg_private import PrivateCluster, private_cluster
from tests.fixtures.prefect_runs import flow_run_artifacts, task_runs, wait_for_paused_run

pytestmark = pytest.mark.usefixtures("prefect_api")

MAX_CONNECTIONS = 20
APP = "rb_app"


@pytest.fixture
def small_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[PrivateCluster]:
    with private_cluster(max_connections=MAX_CONNECTIONS) as cluster:
        with psycopg.connect(cluster.admin_dsn, autocommit=True) as admin:
            admin.execute(f"CREATE ROLE {APP} LOGIN")
        monkeypatch.setenv("RUNBOOKS_PG_DSN", cluster.admin_dsn)
        monkeypatch.setenv("RUNBOOKS_PG_CONNECT_TIMEOUT_S", "2")
        monkeypatch.setenv("RUNBOOKS_PG_MIN_IDLE_MINUTES", str(1 / 60))
        yield cluster


def test_an_approval_after_the_pool_recovered_changes_nothing(
    small_cluster: PrivateCluster,
) -> None:
    # 12 application sessions: 60 % or more of 20 with the runbook's own connection.
    app = [
        psycopg.connect(small_cluster.dsn(role=APP), autocommit=True, connect_timeout=5)
        for _ in range(12)
    ]
    keeper = app[0]
    try:
        time.sleep(1.2)  # idle longer than the guard's 1 s test floor
        params = DbPoolParams(
            dry_run=False,
            act_above_percent=40,
            cooldown_minutes=0,
            guard=TerminationGuard(database="postgres", idle_minutes=1 / 60),
            requested_by="pytest",
        )
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(db_pool_exhausted, params, return_state=True)
            run_id = wait_for_paused_run(RUNBOOK)
            for conn in app[1:]:  # the application lets go while the run waits
                conn.close()
            resume_flow_run(
                run_id, run_input={"approved": True, "approver": "alice", "reason": "INC-8"}
            )
            state = fut.result(timeout=120)
        out = state.result()
        assert out.outcome == "skipped"
        assert "below act_above_percent" in out.note
        assert out.result is None
        assert out.before.percent_used >= 60
        # The approved plan named the keeper; it was not terminated.
        assert keeper.info.backend_pid in {s.pid for s in out.plan.sessions}
        keeper.execute("SELECT 1")
        runs = task_runs(state.state_details.flow_run_id)
        assert runs.get("measure-pool-usage") == 1  # measured again, after the approval
        assert not any(name.startswith("terminate-sessions") for name in runs)
        (md,) = flow_run_artifacts(run_id, RUNBOOK)
        assert "## Plan after approval" in md
        assert "usage is now" in md
    finally:
        for conn in app:
            conn.close()
