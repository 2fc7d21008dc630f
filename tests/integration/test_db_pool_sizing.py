"""db-pool-exhausted's pool sizing on the real Kubernetes API server and PostgreSQL.

The backend Deployment lives on the test control plane; its pool size is a container env var
(or a ConfigMap key it references); other clients are real sessions of another role.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from kubernetes import client as k8s
from prefect.flow_runs import resume_flow_run

from flows.db_pool_exhausted import RUNBOOK, db_pool_exhausted
from tasks.kubernetes import RESTARTED_AT
from tests.fixtures.kube import KubeCluster, free_port, write_kubeconfig
from tests.fixtures.postgres import PgWorld, Sessions
from tests.fixtures.prefect_runs import flow_run_artifacts, paused_runs, wait_for_paused_run
from tests.integration.kube_helpers import deployment_body
from tests.integration.test_db_pool_flow import guard, latest_artifact, params

pytestmark = [pytest.mark.kube, pytest.mark.usefixtures("prefect_api")]
BACKEND = "akig-backend"


class Backend:
    """The akig-backend Deployment in a test namespace, seen as the admin."""

    def __init__(self, cluster: KubeCluster, namespace: str) -> None:
        self.namespace = namespace
        self.apps: Any = k8s.AppsV1Api(cluster.api())
        self.core: Any = k8s.CoreV1Api(cluster.api())

    def create(self, replicas: int, env: dict[str, Any]) -> None:
        body = deployment_body(BACKEND, replicas=replicas)
        body["spec"]["template"]["spec"]["containers"][0]["env"].append(env)
        self.apps.create_namespaced_deployment(self.namespace, body)

    def read(self) -> Any:
        return self.apps.read_namespaced_deployment(BACKEND, self.namespace)

    def env(self) -> list[dict[str, Any]]:
        container = self.read().spec.template.spec.containers[0]
        return [k8s.ApiClient().sanitize_for_serialization(e) for e in container.env or []]

    def restarted_at(self) -> str | None:
        return (self.read().spec.template.metadata.annotations or {}).get(RESTARTED_AT)


@pytest.fixture
def backend(
    kube_cluster: KubeCluster,
    kube_namespace: str,
    pg_env: PgWorld,
    monkeypatch: pytest.MonkeyPatch,
) -> Backend:
    monkeypatch.setenv("RUNBOOKS_K8S_KUBECONFIG", str(kube_cluster.kubeconfig))
    monkeypatch.setenv("RUNBOOKS_K8S_NAMESPACE", kube_namespace)
    monkeypatch.setenv("RUNBOOKS_BACKEND_POOL_ENV", "DB_POOL_SIZE")
    monkeypatch.setenv("RUNBOOKS_BACKEND_POOL_DB_ROLE", pg_env.app_role)
    monkeypatch.setenv("RUNBOOKS_BACKEND_POOL_HEADROOM", "5")
    return Backend(kube_cluster, kube_namespace)


def max_connections(sessions: Sessions, world: PgWorld) -> int:
    conn = sessions.open(world.protected_role, "idle")
    row = conn.execute("SELECT current_setting('max_connections')::int").fetchone()
    assert row is not None
    return int(str(row[0]))


def test_oversubscribed_pool_is_flagged(
    backend: Backend, pg_env: PgWorld, sessions: Sessions
) -> None:
    limit = max_connections(sessions, pg_env)
    others = [sessions.open(pg_env.protected_role, "idle") for _ in range(3)]
    backend.create(2, {"name": "DB_POOL_SIZE", "value": str(limit)})
    out = db_pool_exhausted(params(pg_env))
    view = out.pool_sizing
    assert view is not None and view.sizing is not None and view.backend is not None
    s = view.sizing
    assert (view.backend.pods, s.pool_size, s.demand) == (2, limit, 2 * limit)
    assert s.other_clients >= len(others) + 1  # our sessions of another role, at least
    assert s.oversubscribed is True
    assert s.recommended == max(1, (limit - s.reserved - s.other_clients - 5) // 2)
    md = latest_artifact(RUNBOOK)
    assert "## Pool sizing" in md
    assert "OVER-SUBSCRIBED" in md
    assert f"Recommended pool size per pod (the cap for a raise): **{s.recommended}**" in md


def test_pool_size_from_a_configmap_that_fits(backend: Backend, pg_env: PgWorld) -> None:
    backend.core.create_namespaced_config_map(
        backend.namespace,
        k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="backend-config"), data={"pool": "2"}),
    )
    ref = {"configMapKeyRef": {"name": "backend-config", "key": "pool"}}
    backend.create(1, {"name": "DB_POOL_SIZE", "valueFrom": ref})
    out = db_pool_exhausted(params(pg_env))
    assert out.pool_sizing is not None and out.pool_sizing.sizing is not None
    assert out.pool_sizing.sizing.pool_size == 2
    assert out.pool_sizing.sizing.oversubscribed is False
    assert "ConfigMap backend-config key pool" in latest_artifact(RUNBOOK)


@pytest.mark.parametrize("how", ["not configured", "unreachable"])
def test_kubernetes_unavailable_is_reported_not_fatal(
    pg_env: PgWorld,
    kube_cluster: KubeCluster,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
    how: str,
) -> None:
    config = tmp_path / "missing.kubeconfig"
    if how == "unreachable":  # a closed port: refused at once, tried once (no retry backoff)
        dead = f"https://127.0.0.1:{free_port()}"
        config = write_kubeconfig(config, dead, kube_cluster.ca_pem, "t", "dead")
    monkeypatch.setenv("RUNBOOKS_K8S_KUBECONFIG", str(config))
    started = time.monotonic()
    # A plan-only run; the guard matches nothing (the test opens no session to end).
    out = db_pool_exhausted(params(pg_env, dry_run=True, guard=guard(pg_env, idle_minutes=60)))
    assert out.outcome == "nothing to do"
    assert out.pool_sizing is not None and out.pool_sizing.unavailable
    md = latest_artifact(RUNBOOK)
    assert "## Pool sizing\n\nnot available" in md
    assert ("unreachable" if how == "unreachable" else "configuration unusable") in md
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("approved", [True, False])
def test_raise_within_the_cap_only_after_approval(
    backend: Backend, pg_env: PgWorld, approved: bool
) -> None:
    backend.create(1, {"name": "DB_POOL_SIZE", "value": "2"})
    before = backend.env()
    # auto_approve (the helper's default) covers terminations, never a raise: it asks.
    p = params(pg_env, dry_run=False, act_above_percent=100, raise_pool_size_to=3)
    ignore = frozenset(paused_runs(RUNBOOK))
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(db_pool_exhausted, p)
        run_id = wait_for_paused_run(RUNBOOK, ignore=ignore)
        # Nothing changes while the run waits for a human.
        time.sleep(0.5)
        assert backend.env() == before
        assert backend.restarted_at() is None
        resume_flow_run(run_id, run_input={"approved": approved, "approver": "carol"})
        out = fut.result(timeout=120)
    action = out.pool_size_action
    assert action is not None
    (md,) = flow_run_artifacts(run_id, RUNBOOK)
    assert "## Approval" in md
    if not approved:
        assert action.outcome == "refused"
        assert backend.env() == before
        assert backend.restarted_at() is None
        return
    assert action.outcome == "acted", action.note
    assert action.cap_after_approval is not None and action.cap_after_approval >= 3
    assert {"name": "DB_POOL_SIZE", "value": "3"} in backend.env()
    assert {"name": "MODE", "value": "prod"} in backend.env()  # the other entries untouched
    assert backend.restarted_at() is not None
    assert action.change is not None and action.change.before == "'2'"
    assert '"value":"2"' in md  # the undo: the exact previous entry
    assert "Before: '2'; after: '3'" in md


def test_a_raise_to_the_value_already_set_asks_nobody(backend: Backend, pg_env: PgWorld) -> None:
    backend.create(1, {"name": "DB_POOL_SIZE", "value": "3"})
    generation = backend.read().metadata.generation
    p = params(
        pg_env,
        dry_run=False,
        approval_timeout_s=10,
        act_above_percent=100,
        raise_pool_size_to=3,
    )
    state = db_pool_exhausted(p, return_state=True)
    out = state.result()
    action = out.pool_size_action
    assert action is not None and action.outcome == "nothing to do", action
    assert "nothing to do" in action.note
    (md,) = flow_run_artifacts(state.state_details.flow_run_id, RUNBOOK)
    assert "## Approval" not in md  # nobody was asked
    assert backend.read().metadata.generation == generation
    assert backend.restarted_at() is None


def test_above_the_cap_or_without_approval_changes_nothing(
    backend: Backend, pg_env: PgWorld
) -> None:
    backend.create(1, {"name": "DB_POOL_SIZE", "value": "2"})
    generation = backend.read().metadata.generation
    above = db_pool_exhausted(
        params(pg_env, dry_run=False, act_above_percent=100, raise_pool_size_to=10_000)
    )
    assert above.pool_size_action is not None
    assert above.pool_size_action.outcome == "refused"
    assert "above the cap" in above.pool_size_action.note
    # auto_approve on (the helper's default): the raise is an `always` action, it still
    # asks, and no answer is a refusal.
    no_answer = db_pool_exhausted(
        params(
            pg_env,
            dry_run=False,
            act_above_percent=100,
            raise_pool_size_to=3,
            approval_timeout_s=10,
        )
    )
    assert no_answer.outcome == "refused"
    assert no_answer.pool_size_action is not None
    assert no_answer.pool_size_action.outcome == "refused"
    assert "not approved" in no_answer.pool_size_action.note
    dry = db_pool_exhausted(params(pg_env, raise_pool_size_to=3))
    assert dry.pool_size_action is not None and dry.pool_size_action.outcome == "planned"
    assert "server dry run" in dry.pool_size_action.note
    assert backend.read().metadata.generation == generation
    assert {"name": "DB_POOL_SIZE", "value": "2"} in backend.env()


def test_entry_changed_while_waiting_for_approval_is_left_alone(
    backend: Backend, pg_env: PgWorld
) -> None:
    backend.create(1, {"name": "DB_POOL_SIZE", "value": "2"})
    p = params(pg_env, dry_run=False, act_above_percent=100, raise_pool_size_to=3)
    ignore = frozenset(paused_runs(RUNBOOK))
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(db_pool_exhausted, p)
        run_id = wait_for_paused_run(RUNBOOK, ignore=ignore)
        # Someone else edits the pool size while the run waits.
        env = [{"name": "DB_POOL_SIZE", "value": "4"}]
        patch = {"spec": {"template": {"spec": {"containers": [{"name": "app", "env": env}]}}}}
        backend.apps.patch_namespaced_deployment(BACKEND, backend.namespace, patch)
        generation = backend.read().metadata.generation
        resume_flow_run(run_id, run_input={"approved": True, "approver": "dave"})
        out = fut.result(timeout=120)
    assert out.pool_size_action is not None
    assert (out.outcome, out.pool_size_action.outcome) == ("skipped", "skipped")
    assert "changed while waiting for approval" in out.pool_size_action.note
    assert {"name": "DB_POOL_SIZE", "value": "4"} in backend.env()
    assert backend.read().metadata.generation == generation
    assert backend.restarted_at() is None


def test_paused_backend_is_refused_before_approval(backend: Backend, pg_env: PgWorld) -> None:
    backend.create(1, {"name": "DB_POOL_SIZE", "value": "2"})
    backend.apps.patch_namespaced_deployment(BACKEND, backend.namespace, {"spec": {"paused": True}})
    generation = backend.read().metadata.generation
    out = db_pool_exhausted(
        params(pg_env, dry_run=False, act_above_percent=100, raise_pool_size_to=3)
    )
    assert out.pool_size_action is not None
    assert out.pool_size_action.outcome == "refused"
    assert "paused" in out.pool_size_action.note
    assert backend.read().metadata.generation == generation


def test_terminations_and_a_raise_are_asked_once(
    backend: Backend, pg_env: PgWorld, sessions: Sessions
) -> None:
    """Issue 19: terminations and a pool-size raise are one plan, so the
    run pauses once for all of them (it used to pause a second time for the raise)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType

    from tests.fixtures.postgres import pid, wait_gone

    backend.create(1, {"name": "DB_POOL_SIZE", "value": "2"})
    victim = sessions.open(pg_env.app_role, "idle")
    time.sleep(1.2)
    p = params(pg_env, dry_run=False, auto_approve=False, raise_pool_size_to=3)
    ignore = frozenset(paused_runs(RUNBOOK))
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(db_pool_exhausted, p, return_state=True)
        run_id = wait_for_paused_run(RUNBOOK, ignore=ignore)
        resume_flow_run(run_id, run_input={"approved": True, "approver": "erin"})
        state = fut.result(timeout=120)
    out = state.result()
    assert out.outcome == "acted", out.note
    assert out.result is not None and [s.pid for s in out.result.terminated] == [pid(victim)]
    assert out.pool_size_action is not None and out.pool_size_action.outcome == "acted"
    assert wait_gone([pid(victim)]) == set()
    assert {"name": "DB_POOL_SIZE", "value": "3"} in backend.env()
    assert backend.restarted_at() is not None
    with get_client(sync_client=True) as client:
        history = [s.type for s in client.read_flow_run_states(run_id)]
    assert history.count(StateType.PAUSED) == 1, history
    (md,) = flow_run_artifacts(run_id, RUNBOOK)
    assert md.count("## Approval") == 1
