"""One remediation per target on real PostgreSQL: databases in parallel, one database serialized,
the whole server excluded by either, and a run whose alert resolved while it waited acts on nothing.

"Another run acting" is the test holding the target's lock (`tasks.locks.target_lock`) exactly
as a run does, so nothing here depends on two flows racing.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest
from prefect import tags

from deployments.receiver import create_app
from deployments.serve import to_deployments
from flows.db_pool_exhausted import DbPoolParams, db_pool_exhausted, lock_targets
from tasks.locks import target_lock
from tasks.postgres import TerminationGuard
from tests.fixtures.postgres import ADMIN_DSN, PgWorld, Sessions, alive, pid, wait_gone
from tests.fixtures.stub_runbooks import STUB_RUNBOOKS
from tests.fixtures.triggers import TOKEN, alert, bearer, payload, receiver_settings, serve_app
from tests.fixtures.triggers import stub_table as stub_routing

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture
def second_db(pg_env: PgWorld) -> Iterator[str]:
    """Another database on the same server: another target."""
    name = f"rb_lock_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def act(world: PgWorld, database: str | None, **kw: Any) -> DbPoolParams:
    """Acting parameters, limited to the test's own role (never another test's sessions)."""
    guard = TerminationGuard(
        database=database,
        username=world.app_role,
        idle_minutes=1 / 60,
        protected_roles=[world.protected_role],
    )
    base: dict[str, Any] = {
        "dry_run": False,
        "guard": guard,
        "act_above_percent": 0,
        "healthy_below_percent": 100,
        "cooldown_minutes": 0,
        "auto_approve": True,
    }
    return DbPoolParams.model_validate(base | kw)


def test_two_databases_act_in_parallel_and_one_database_waits(
    pg_env: PgWorld, sessions: Sessions, second_db: str
) -> None:
    mine = sessions.open(pg_env.app_role, "idle")
    other = psycopg.connect(pg_env.dsn(pg_env.app_role, second_db), autocommit=True)
    time.sleep(1.2)  # idle for longer than the guard's 1 s floor
    target, server = lock_targets(act(pg_env, pg_env.database))
    assert (target, server) == ("pg:127.0.0.1:5432/" + pg_env.database, "pg:127.0.0.1:5432")
    pool = ThreadPoolExecutor(1)
    with target_lock(target, within=server):  # another run acts on the test's database
        parallel = db_pool_exhausted(act(pg_env, second_db, lock_timeout_s=5))
        assert parallel.outcome == "acted"
        assert wait_gone([pid(other)]) == set()
        same = db_pool_exhausted(act(pg_env, pg_env.database, lock_timeout_s=2))
        whole = db_pool_exhausted(act(pg_env, None, lock_timeout_s=2))
        assert (same.outcome, whole.outcome) == ("refused", "refused")
        assert "being remediated by another run" in same.note
        assert alive([pid(mine)]) == {pid(mine)}
        waiting = pool.submit(db_pool_exhausted, act(pg_env, pg_env.database))
        time.sleep(1.5)
        assert not waiting.done()  # it waits for the target, it does not act beside it
        assert alive([pid(mine)]) == {pid(mine)}
    # The other run released the target: the waiting one acts now.
    assert waiting.result(timeout=120).outcome == "acted"
    pool.shutdown()
    assert wait_gone([pid(mine)]) == set()
    other.close()


def test_the_whole_server_waits_for_and_excludes_its_databases(
    pg_env: PgWorld, sessions: Sessions
) -> None:
    mine = sessions.open(pg_env.app_role, "idle")
    time.sleep(1.2)
    _, server = lock_targets(act(pg_env, None))
    with target_lock(server, within=server):  # a server-wide remediation is acting
        one_db = db_pool_exhausted(act(pg_env, pg_env.database, lock_timeout_s=2))
    assert one_db.outcome == "refused"
    assert alive([pid(mine)]) == {pid(mine)}


def test_two_runs_at_once_the_second_re_measures_under_the_lock_and_changes_nothing(
    pg_env: PgWorld, sessions: Sessions
) -> None:
    """Two runs on one database, both planned while the target was busy: the first to get it
    terminates the idle session; the second measures again under the lock, finds it gone and
    terminates nothing."""
    victim = sessions.open(pg_env.app_role, "idle")
    time.sleep(1.2)
    params = act(pg_env, pg_env.database)
    target, server = lock_targets(params)
    with ThreadPoolExecutor(2) as pool:
        with target_lock(target, within=server):  # busy until both runs have planned
            runs = [pool.submit(db_pool_exhausted, params) for _ in range(2)]
            time.sleep(3.0)
            assert not any(r.done() for r in runs)
            assert alive([pid(victim)]) == {pid(victim)}
        outcomes = [r.result(timeout=120) for r in runs]
    assert sorted(o.outcome for o in outcomes) == ["acted", "skipped"], outcomes
    first, second = sorted(outcomes, key=lambda o: o.outcome != "acted")
    assert first.result is not None and [s.pid for s in first.result.terminated] == [pid(victim)]
    # The second planned the same session before it waited, then touched nothing, and says why.
    assert [s.pid for s in second.plan.sessions] == [pid(victim)]
    assert second.result is None and second.replan is not None and not second.replan.sessions
    assert "none of the 1 planned session(s) still matches" in second.note, second.note


@pytest.fixture(scope="module")
def stub_deployments(prefect_api: None) -> None:
    for deployment in to_deployments(STUB_RUNBOOKS):
        deployment.apply()


@pytest.mark.usefixtures("stub_deployments")
@pytest.mark.parametrize("resolves", [True, False])
def test_a_run_whose_alert_resolved_while_it_waited_acts_on_nothing(
    pg_env: PgWorld, sessions: Sessions, monkeypatch: pytest.MonkeyPatch, resolves: bool
) -> None:
    firing = alert("StubStorm", namespace=f"stale-{uuid.uuid4().hex[:6]}")
    fp = firing["fingerprint"]
    app = create_app(
        receiver_settings(sync_wait_s=10), stub_routing(), STUB_RUNBOOKS, api_url=_api()
    )
    victim = sessions.open(pg_env.app_role, "idle")
    time.sleep(1.2)
    params = act(pg_env, pg_env.database)
    target, server = lock_targets(params)
    with serve_app(app) as receiver:
        monkeypatch.setenv("RUNBOOKS_ALERTS_RECEIVER_URL", receiver.url)
        monkeypatch.setenv("RUNBOOKS_ALERTS_RECEIVER_TOKEN", TOKEN)
        send(receiver.url, firing)
        with ThreadPoolExecutor(1) as pool:
            with target_lock(target, within=server):  # the run waits behind another one
                waiting = pool.submit(run_as_alert, params, fp)
                time.sleep(1.0)
                if resolves:
                    send(receiver.url, {**firing, "status": "resolved"}, status="resolved")
            outcome = waiting.result(timeout=120)
    if resolves:
        assert outcome.outcome == "skipped"
        assert f"the alert that started this run ({fp}) has resolved" in outcome.note
        assert alive([pid(victim)]) == {pid(victim)}
    else:
        assert outcome.outcome == "acted"
        assert wait_gone([pid(victim)]) == set()


@pytest.mark.usefixtures("stub_deployments")
def test_an_approved_run_acts_when_its_alert_fired_again_within_the_cooldown(
    pg_env: PgWorld, sessions: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 18, item 5: fire -> the run waits for approval -> resolve -> re-fire (a new
    startsAt, inside the route's cooldown: no new run). The alert fires: once approved, the
    run of the first occurrence acts (it used to read "resolved" and skip)."""
    from prefect.flow_runs import resume_flow_run

    from tests.fixtures.prefect_runs import paused_runs, wait_for_paused_run

    first = alert(
        "StubStorm", namespace=f"refire-{uuid.uuid4().hex[:6]}", starts_at="2026-11-27T03:00:00Z"
    )
    fp = first["fingerprint"]
    app = create_app(
        receiver_settings(sync_wait_s=10), stub_routing(), STUB_RUNBOOKS, api_url=_api()
    )
    victim = sessions.open(pg_env.app_role, "idle")
    time.sleep(1.2)
    params = act(pg_env, pg_env.database, auto_approve=False)
    before = set(paused_runs("db-pool-exhausted"))
    monkeypatch.delenv("RUNBOOKS_ALERTS_ALERTMANAGER_URL", raising=False)
    with serve_app(app) as receiver:
        monkeypatch.setenv("RUNBOOKS_ALERTS_RECEIVER_URL", receiver.url)
        monkeypatch.setenv("RUNBOOKS_ALERTS_RECEIVER_TOKEN", TOKEN)
        started = send(receiver.url, first)
        # The receiver's run of occurrence 1 has started (here: the run below stands for
        # it), so the resolve leaves it alone and it holds the route's cooldown.
        executing(UUID(started["flow_run_id"]))
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(run_as_alert, params, fp)
            run_id = wait_for_paused_run("db-pool-exhausted", ignore=before)
            send(receiver.url, {**first, "status": "resolved"}, status="resolved")
            refire = send(receiver.url, {**first, "startsAt": "2026-11-27T03:07:00Z"})
            resume_flow_run(
                run_id, run_input={"approved": True, "approver": "alice", "reason": "INC-5"}
            )
            outcome = waiting.result(timeout=120)
        finished(UUID(started["flow_run_id"]))
    assert refire["outcome"] == "cooldown"  # no second run ...
    assert outcome.outcome == "acted", outcome.note  # ... but the alert fires again
    assert wait_gone([pid(victim)]) == set()


def executing(run_id: UUID) -> None:
    """Move a run to Running as a worker and the engine would."""
    from prefect.client.orchestration import get_client
    from prefect.states import Pending, Running

    states: list[Any] = [Pending(), Running()]
    with get_client(sync_client=True) as client:
        for state in states:
            assert client.set_flow_run_state(run_id, state).status.value == "ACCEPT"


def finished(run_id: UUID) -> None:
    """End a run that `executing` started (nothing else would)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Completed

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Completed())


def _api() -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def send(url: str, one: dict[str, Any], status: str = "firing") -> dict[str, Any]:
    """POST one alert to the receiver; its answer for that alert."""
    r = httpx.post(f"{url}/alerts", json=payload(one, status=status), headers=bearer(), timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json()["alerts"][0])


def run_as_alert(params: DbPoolParams, fingerprint: str) -> Any:
    """The flow as an alert-started run sees itself: `source:alert` and `alert:<fp>` tags."""
    with tags("source:alert", f"alert:{fingerprint}", "alertname:StubStorm"):
        return db_pool_exhausted(params)
