"""The db-pool-exhausted and pool-threshold flows end to end on a Prefect API and PostgreSQL."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from uuid import UUID, uuid4

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    DeploymentFilter,
    DeploymentFilterId,
)
from prefect.client.schemas.objects import StateType
from prefect.variables import Variable
from pydantic import ValidationError

from deployments.warm_pool import execute
from flows.db_pool_exhausted import (
    RUNBOOK,
    DbPoolParams,
    PoolStillExhausted,
    _cooldown_key,
    db_pool_exhausted,
    target_of,
)
from flows.pool_threshold import PoolThresholdExceeded, PoolThresholdParams, pool_threshold
from tasks.errors import TransientError
from tasks.postgres import TerminationGuard
from tests.fixtures.postgres import (
    PgWorld,
    Sessions,
    alive,
    pid,
    system_timeout_file_value,
    wait_gone,
)
from tests.fixtures.prefect_runs import (
    flow_run_artifacts,
    flow_run_logs,
    task_runs,
    wait_for_paused_run,
)

pytestmark = pytest.mark.usefixtures("prefect_api")


def guard(world: PgWorld, **kw: object) -> TerminationGuard:
    base: dict[str, object] = {
        "database": world.database,
        "idle_minutes": 1 / 60,
        "protected_roles": [world.protected_role],
    }
    return TerminationGuard.model_validate(base | kw)


def params(world: PgWorld, **kw: object) -> DbPoolParams:
    guard = TerminationGuard(
        database=world.database, idle_minutes=1 / 60, protected_roles=[world.protected_role]
    )
    base: dict[str, object] = {
        "guard": guard,
        "act_above_percent": 0,
        "healthy_below_percent": 100,
        "cooldown_minutes": 0,
        "auto_approve": True,
        "requested_by": "pytest",
    }
    return DbPoolParams.model_validate(base | kw)


def latest_artifact(key: str) -> str:
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
            limit=1,
            sort="CREATED_DESC",  # type: ignore[arg-type]
        )
    assert arts, f"no artifact {key}"
    return str(arts[0].data)


def test_dry_run_plans_and_kills_nothing(pg_env: PgWorld, sessions: Sessions) -> None:
    conns = [sessions.open(pg_env.app_role, "idle") for _ in range(2)]
    time.sleep(1.2)
    out = db_pool_exhausted(DbPoolParams(guard=params(pg_env).guard))
    assert out.outcome == "planned"
    assert out.result is None
    assert {s.pid for s in out.plan.sessions} == {pid(c) for c in conns}
    assert alive([pid(c) for c in conns]) == {pid(c) for c in conns}
    md = latest_artifact("db-pool-exhausted")
    assert "would be terminated" in md
    assert str(pid(conns[0])) in md
    assert "dry run" in md


def test_act_terminates_verifies_and_reports(pg_env: PgWorld, sessions: Sessions) -> None:
    victims = [sessions.open(pg_env.app_role, "idle") for _ in range(3)]
    keeper = sessions.open(pg_env.super_role, "idle in transaction")
    time.sleep(1.2)
    out = db_pool_exhausted(params(pg_env, dry_run=False))
    assert out.outcome == "acted"
    assert out.healthy is True
    assert out.result is not None
    assert {s.pid for s in out.result.terminated} == {pid(c) for c in victims}
    assert wait_gone([pid(c) for c in victims]) == set()
    assert alive([pid(keeper)]) == {pid(keeper)}
    assert out.after is not None
    md = latest_artifact("db-pool-exhausted")
    for text in ("## Findings", "## Plan", "## Done", "## Verify", "requested by", "pytest"):
        assert text.lower() in md.lower()


def test_below_act_threshold_changes_nothing(pg_env: PgWorld, sessions: Sessions) -> None:
    conn = sessions.open(pg_env.app_role, "idle")
    time.sleep(1.2)
    out = db_pool_exhausted(params(pg_env, dry_run=False, act_above_percent=100))
    assert out.outcome == "skipped"
    assert alive([pid(conn)]) == {pid(conn)}


def test_cooldown_refuses_second_remediation(pg_env: PgWorld, sessions: Sessions) -> None:
    Variable.unset(_cooldown_key(target_of(params(pg_env))))
    # The first run must end a session: an empty plan does nothing, so sets no cooldown.
    victim = sessions.open(pg_env.app_role, "idle")
    time.sleep(1.2)
    first = db_pool_exhausted(params(pg_env, dry_run=False, cooldown_minutes=30))
    assert first.outcome == "acted"
    assert wait_gone([pid(victim)]) == set()
    conn = sessions.open(pg_env.app_role, "idle")
    time.sleep(1.2)
    second = db_pool_exhausted(params(pg_env, dry_run=False, cooldown_minutes=30))
    assert second.outcome == "refused"
    assert "cooldown" in second.note
    assert alive([pid(conn)]) == {pid(conn)}
    Variable.unset(_cooldown_key(target_of(params(pg_env))))


@pytest.mark.parametrize("auto_approve", [True, False])
def test_an_empty_plan_asks_nobody_and_says_nothing_to_do(
    pg_env: PgWorld, sessions: Sessions, auto_approve: bool
) -> None:
    # An idle session that the guard spares (idle for a second, not an hour): none to end.
    spared = sessions.open(pg_env.app_role, "idle")
    p = params(
        pg_env,
        dry_run=False,
        auto_approve=auto_approve,
        approval_timeout_s=10,
        guard=guard(pg_env, idle_minutes=60),
    )
    state = db_pool_exhausted(p, return_state=True)
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    out = state.result()
    assert out.outcome == "nothing to do" and out.result is None
    assert "nobody was asked" in out.note
    assert alive([pid(spared)]) == {pid(spared)}
    with get_client(sync_client=True) as client:
        history = [s.type for s in client.read_flow_run_states(run_id)]
        (art,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    assert StateType.PAUSED not in history  # nobody was asked
    assert art.description == f"{RUNBOOK}: nothing to do"
    (md,) = flow_run_artifacts(run_id, RUNBOOK)
    assert "## Approval" not in md and "## Target lock" not in md
    assert "**nothing to do**: the plan is empty" in md
    assert "terminated" not in md.split("## Outcome")[1]


def test_an_empty_plan_on_an_exhausted_pool_fails_and_escalates(pg_env: PgWorld) -> None:
    p = params(
        pg_env, dry_run=False, healthy_below_percent=0.001, guard=guard(pg_env, idle_minutes=60)
    )
    with pytest.raises(PoolStillExhausted, match="no session the guard allows"):
        db_pool_exhausted(p)


def test_unhealthy_after_acting_fails_the_run(pg_env: PgWorld) -> None:
    with pytest.raises(PoolStillExhausted, match="escalate"):
        db_pool_exhausted(params(pg_env, dry_run=False, healthy_below_percent=0.001))


def test_bad_parameters_are_rejected_before_anything_runs(pg_env: PgWorld) -> None:
    with pytest.raises(ValidationError, match="max_sessions"):
        DbPoolParams.model_validate({"guard": {"max_sessions": 0}})
    with pytest.raises(ValidationError, match="idle_minutes"):
        DbPoolParams.model_validate({"guard": {"idle_minutes": -5}})
    with pytest.raises(ValidationError, match="states"):
        DbPoolParams.model_validate({"guard": {"states": ["active"]}})
    with pytest.raises(ValidationError, match="not a valid PostgreSQL name"):
        DbPoolParams.model_validate({"guard": {"database": "x; DROP DATABASE y"}})
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ParameterTypeError):
        db_pool_exhausted(params={"dry_run": False, "guard": {"max_sessions": -1}})  # type: ignore[call-overload]


def test_unreachable_postgres_fails_clearly_after_retries(
    pg_env: PgWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNBOOKS_PG_DSN", "postgresql://postgres:hunter2-secret@127.0.0.1:1/x")
    state = db_pool_exhausted(params(pg_env, dry_run=False), return_state=True)
    assert state.is_failed()
    with pytest.raises(TransientError) as err:
        state.result()
    assert "127.0.0.1:1" in str(err.value)
    assert "hunter2" not in str(err.value)
    # survey-pool failed after its retries (1 attempt + RUNBOOKS_RETRY_ATTEMPTS=2); nothing
    # after it ran.
    assert task_runs(state.state_details.flow_run_id) == {"survey-pool": 3}
    # ... and the audit record was still written, saying why the run stopped.
    (md,) = flow_run_artifacts(state.state_details.flow_run_id, RUNBOOK)
    assert "## Failed" in md
    assert "TransientError" in md


def test_pool_threshold_passes_and_fails(pg_env: PgWorld) -> None:
    ok = pool_threshold(PoolThresholdParams(threshold_percent=100))
    assert ok.passed and ok.outcome == "nothing to do"
    with pytest.raises(PoolThresholdExceeded, match="threshold"):
        pool_threshold(PoolThresholdParams(threshold_percent=0.001))
    assert "OVER" in latest_artifact("pool-threshold")


@pytest.mark.parametrize("approved", [True, False])
def test_approval_gate(pg_env: PgWorld, sessions: Sessions, approved: bool) -> None:
    from prefect.flow_runs import resume_flow_run

    Variable.unset(_cooldown_key(target_of(params(pg_env))))
    conn = sessions.open(pg_env.app_role, "idle")
    time.sleep(1.2)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(db_pool_exhausted, params(pg_env, dry_run=False, auto_approve=False))
        run_id = wait_for_paused_run("db-pool-exhausted")
        # Nothing happens while the run waits for a human.
        assert alive([pid(conn)]) == {pid(conn)}
        resume_flow_run(
            run_id, run_input={"approved": approved, "approver": "alice", "reason": "INC-42"}
        )
        out = fut.result(timeout=120)
    (md,) = flow_run_artifacts(run_id, RUNBOOK)
    assert "alice" in md
    assert "INC-42" in md
    if approved:
        assert out.outcome == "acted"
        assert wait_gone([pid(conn)]) == set()
    else:
        assert out.outcome == "refused"
        assert alive([pid(conn)]) == {pid(conn)}


def test_approval_timeout_does_nothing(pg_env: PgWorld, sessions: Sessions) -> None:
    conn = sessions.open(pg_env.app_role, "idle")
    time.sleep(1.2)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(
            db_pool_exhausted,
            params(pg_env, dry_run=False, auto_approve=False, approval_timeout_s=10),
        )
        run_id = wait_for_paused_run("db-pool-exhausted")
        out = fut.result(timeout=120)
    assert out.outcome == "refused"
    (md,) = flow_run_artifacts(run_id, RUNBOOK)
    assert "no answer within 10 s" in md
    assert alive([pid(conn)]) == {pid(conn)}
    # A timed-out approval is a refusal: the run ends as the flow says, not Failed by
    # Prefect's "paused and never resumed" rule.
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run_id).state_type == StateType.COMPLETED


def test_outside_text_in_the_request_is_inert(pg_env: PgWorld) -> None:
    evil = "db-1 | *x* [click](http://evil.example) <b>\n## Done"
    db_pool_exhausted(params(pg_env, reason=evil, requested_by="[me](http://evil.example)"))
    md = latest_artifact("db-pool-exhausted")
    assert "[click](http://evil.example)" not in md
    assert "[me](http://evil.example)" not in md
    assert "\n## Done" not in md


def test_pool_threshold_starts_the_remediation_deployment(pg_env: PgWorld) -> None:
    deployment_id: UUID = db_pool_exhausted.to_deployment(name="db-pool-exhausted").apply()  # type: ignore[union-attr,assignment]
    p = PoolThresholdParams(
        threshold_percent=0.001,
        start_remediation=True,
        remediation=params(pg_env, requested_by="pool-threshold"),
    )
    state = pool_threshold(p, return_state=True)
    assert state.is_failed()  # the check itself failed: usage over the threshold
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )
    assert len(runs) == 1
    run = runs[0]
    assert run.parameters["params"]["dry_run"] is True
    assert run.parameters["params"]["guard"]["database"] == pg_env.database
    # Started here, not by its schedule: the remediation says so.
    assert "source:local" in run.tags and "source:schedule" not in run.tags
    assert str(run.id) in latest_artifact("pool-threshold")


@pytest.mark.parametrize("source", ["ui", "alert"])
def test_pool_threshold_tags_the_remediation_with_its_own_source(
    pg_env: PgWorld, source: str
) -> None:
    """A pool-threshold run from the UI or an alert starts a remediation saying so."""
    remediation: UUID = db_pool_exhausted.to_deployment(name="db-pool-exhausted").apply()  # type: ignore[union-attr,assignment]
    check: UUID = pool_threshold.to_deployment(name="pool-threshold").apply()  # type: ignore[union-attr,assignment]
    fingerprint = "pt" + uuid4().hex[:10]
    # As the receiver tags an alert's run; a UI run carries no source tag of its own.
    tags = ["source:alert", f"alert:{fingerprint}", "alertname:DatabaseConnectionPoolHigh"]
    p = PoolThresholdParams(
        threshold_percent=0.001, start_remediation=True, remediation=params(pg_env)
    )

    def remediations() -> dict[UUID, list[str]]:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[remediation]))
            )
        return {r.id: r.tags for r in runs}

    before = remediations()
    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(
            check,
            parameters={"params": p.model_dump(mode="json")},
            tags=tags if source == "alert" else [],
        )
    execute(run.id, pool_threshold)
    started = {k: v for k, v in remediations().items() if k not in before}
    ((_, child_tags),) = started.items()
    assert f"source:{source}" in child_tags
    assert "source:schedule" not in child_tags
    if source == "alert":  # the remediation checks that alert still fires before acting
        assert {f"alert:{fingerprint}", "alertname:DatabaseConnectionPoolHigh"} <= set(child_tags)


@pytest.mark.parametrize("source", ["schedule", "alert"])
def test_a_started_remediation_keeps_the_source_it_was_started_with(
    pg_env: PgWorld, source: str
) -> None:
    """A remediation pool-threshold started from its schedule runs as `source:schedule`,
    not also `source:ui` (it is a deployment run that no schedule of its own made)."""
    remediation: UUID = db_pool_exhausted.to_deployment(name="db-pool-exhausted").apply()  # type: ignore[union-attr,assignment]
    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(
            remediation,
            parameters={"params": params(pg_env).model_dump(mode="json")},
            tags=[f"source:{source}", "runbook:db-pool-exhausted"],
        )
    execute(run.id, db_pool_exhausted)
    with get_client(sync_client=True) as client:
        tags = client.read_flow_run(run.id).tags
    assert [t for t in tags if t.startswith("source:")] == [f"source:{source}"]


def _resume(run_id: UUID, approved: bool = True) -> None:
    from prefect.flow_runs import resume_flow_run

    resume_flow_run(run_id, run_input={"approved": approved, "approver": "bob", "reason": "INC-7"})


def test_approved_run_acts_only_on_sessions_approved_and_still_matching(
    pg_env: PgWorld, sessions: Sessions
) -> None:
    Variable.unset(_cooldown_key(target_of(params(pg_env))))
    v1, v2, v3 = (sessions.open(pg_env.app_role, "idle") for _ in range(3))
    time.sleep(1.2)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(
            db_pool_exhausted,
            params(pg_env, dry_run=False, auto_approve=False),
            return_state=True,
        )
        run_id = wait_for_paused_run("db-pool-exhausted")
        # While the first run waits: a second run acts, one session turns busy, one appears.
        second = db_pool_exhausted(
            params(pg_env, dry_run=False, guard=guard(pg_env, max_sessions=1))
        )
        sessions.run_in_background(v3, "SELECT pg_sleep(30)")
        sessions.wait_for_state(pid(v3), "active")
        v4 = sessions.open(pg_env.app_role, "idle")
        time.sleep(1.2)  # v4 now matches the guard too, but nobody approved it
        _resume(run_id)
        state = first.result(timeout=120)
    assert second.result is not None
    assert [s.pid for s in second.result.terminated] == [pid(v1)]
    out = state.result()
    assert {s.pid for s in out.plan.sessions} == {pid(v1), pid(v2), pid(v3)}
    assert out.replan is not None
    assert {s.pid for s in out.replan.sessions} == {pid(v2), pid(v4)}
    assert out.result is not None
    assert [s.pid for s in out.result.terminated] == [pid(v2)]
    assert alive([pid(v3), pid(v4)]) == {pid(v3), pid(v4)}
    (md,) = flow_run_artifacts(run_id, RUNBOOK)
    assert "## Plan\n" in md
    assert "## Plan after approval" in md
    assert "**2** session(s) match the guard now" in md
    assert "Approved and still matching: **1**" in md


def test_approved_run_respects_a_cooldown_set_while_it_waited(
    pg_env: PgWorld, sessions: Sessions
) -> None:
    key = _cooldown_key(target_of(params(pg_env)))
    Variable.unset(key)
    _v1, v2 = (sessions.open(pg_env.app_role, "idle") for _ in range(2))
    time.sleep(1.2)
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(
                db_pool_exhausted,
                params(pg_env, dry_run=False, auto_approve=False, cooldown_minutes=30),
            )
            run_id = wait_for_paused_run("db-pool-exhausted")
            second = db_pool_exhausted(
                params(
                    pg_env,
                    dry_run=False,
                    cooldown_minutes=30,
                    guard=guard(pg_env, max_sessions=1),
                )
            )
            _resume(run_id)
            out = first.result(timeout=120)
    finally:
        Variable.unset(key)
    assert second.outcome == "acted"
    assert out.outcome == "refused"
    assert "cooldown" in out.note
    assert out.result is None
    assert alive([pid(v2)]) == {pid(v2)}
    (md,) = flow_run_artifacts(run_id, RUNBOOK)
    assert "## Plan after approval" in md


def test_postgres_lost_after_approval_fails_the_run_and_still_publishes(
    pg_env: PgWorld, sessions: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    Variable.unset(_cooldown_key(target_of(params(pg_env))))
    conn = sessions.open(pg_env.app_role, "idle")
    time.sleep(1.2)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(
            db_pool_exhausted,
            params(pg_env, dry_run=False, auto_approve=False),
            return_state=True,
        )
        run_id = wait_for_paused_run("db-pool-exhausted")
        # From here on the server is unreachable: nothing listens where the DSN points.
        monkeypatch.setenv("RUNBOOKS_PG_DSN", "postgresql://postgres@127.0.0.1:1/postgres")
        _resume(run_id)
        state = fut.result(timeout=120)
    assert state.is_failed()
    with pytest.raises(TransientError):
        state.result()
    (md,) = flow_run_artifacts(run_id, RUNBOOK)
    assert "## Approval" in md
    assert "## Failed" in md
    assert "TransientError" in md
    assert alive([pid(conn)]) == {pid(conn)}


def test_logs_name_each_terminated_session_and_the_previous_setting(
    pg_env: PgWorld, sessions: Sessions
) -> None:
    import psycopg

    Variable.unset(_cooldown_key(target_of(params(pg_env))))
    role = pg_env.app_role
    with psycopg.connect(pg_env.admin_dsn, autocommit=True) as admin:
        admin.execute(f"ALTER ROLE \"{role}\" SET idle_in_transaction_session_timeout = '45s'")
    victims = [sessions.open(role, "idle") for _ in range(2)]
    time.sleep(1.2)
    try:
        state = db_pool_exhausted(
            params(pg_env, dry_run=False, idle_in_transaction_timeout_s=90, timeout_role=role),
            return_state=True,
        )
    finally:
        with psycopg.connect(pg_env.admin_dsn, autocommit=True) as admin:
            admin.execute(f'ALTER ROLE "{role}" RESET idle_in_transaction_session_timeout')
    assert state.is_completed()
    logs = "\n".join(flow_run_logs(state.state_details.flow_run_id))
    for v in victims:
        assert f"terminated pid={pid(v)} role={role} database={pg_env.database}" in logs
    assert f"(role:{role}) was 45s before the change" in logs


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"timeout_role": 'app"; DROP ROLE postgres; --'}, "not a valid PostgreSQL name"),
        ({"timeout_role": None}, "timeout_role is required"),
        (
            {
                "timeout_role": None,
                "timeout_scope": "system",
                "idle_in_transaction_timeout_s": 30,
            },
            "at least 60 s",
        ),
        ({"guard": {"idle_minutes": 0.5}}, "idle_minutes must be at least 1"),
        ({"guard": {"max_sessions": 101}}, "max_sessions must be at most 100"),
    ],
)
def test_bad_parameters_change_nothing(
    pg_env: PgWorld,
    sessions: Sessions,
    monkeypatch: pytest.MonkeyPatch,
    system_timeout_restored: str | None,
    change: dict[str, object],
    error: str,
) -> None:
    from prefect.exceptions import ParameterTypeError

    Variable.unset(_cooldown_key(target_of(params(pg_env))))
    monkeypatch.setenv("RUNBOOKS_PG_MIN_IDLE_MINUTES", "1")  # the production floor
    conn = sessions.open(pg_env.app_role, "idle")
    time.sleep(1.2)
    raw: dict[str, object] = {
        "dry_run": False,
        "guard": {"database": pg_env.database, "idle_minutes": 1},
        "act_above_percent": 0,
        "cooldown_minutes": 0,
        "idle_in_transaction_timeout_s": 90,
        "timeout_role": pg_env.app_role,
    }
    if isinstance(change.get("guard"), dict):
        change = {"guard": raw["guard"] | change["guard"]}  # type: ignore[operator]
    with pytest.raises(ParameterTypeError, match=error):
        db_pool_exhausted(params=raw | change)  # type: ignore[call-overload]
    assert alive([pid(conn)]) == {pid(conn)}
    assert system_timeout_file_value() == system_timeout_restored


def test_pool_threshold_publishes_even_when_it_cannot_measure(
    pg_env: PgWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNBOOKS_PG_DSN", "postgresql://postgres@127.0.0.1:1/postgres")
    state = pool_threshold(PoolThresholdParams(), return_state=True)
    assert state.is_failed()
    (md,) = flow_run_artifacts(state.state_details.flow_run_id, "pool-threshold")
    assert "## Failed" in md
