"""The `high-error-rate` runbook on the whole sandbox platform: the test Kubernetes API server
(the backend's release is its Deployment's image tag, its log lines are the pods' logs through
the fake kubelet), PostgreSQL, the private Redis and a real Prometheus. Nothing is mocked."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from kubernetes import client as k8s
from prefect.flow_runs import resume_flow_run
from pydantic import SecretStr

from flows.common import md_escape
from flows.high_error_rate import (
    RUNBOOK,
    ErrorRateNotRecovered,
    HighErrorRateParams,
    RollbackAction,
    ScenarioVerdict,
    high_error_rate,
    make_plan,
)
from sandbox.db import create_database
from sandbox.server import free_port
from tests.fixtures.approvals import vote
from tests.fixtures.kube import KubeCluster
from tests.fixtures.pg_private import private_cluster
from tests.fixtures.prefect_runs import flow_run_artifacts, wait_for_paused_run
from tests.fixtures.prometheus import ScrapedSandbox
from tests.integration.kube_helpers import (
    deployment_body,
    revision_of,
    rolled_out,
    set_image,
    statefulset_body,
    wait_until,
)
from tests.integration.test_high_error_rate_flow import (
    cache_keys,
    held,
    latest_artifact,
    one_cleared_one_not,
    point_runbook_at,
    row,
    run_two_at_once,
    wait_ratio,
)
from tests.integration.test_kubernetes_kubectl import Kubectl

pytestmark = [pytest.mark.kube, pytest.mark.usefixtures("prefect_api")]
IMAGE = "registry.local/akig-backend"
DEPLOYMENT = "akig-backend"


@dataclass
class Platform:
    """The backend Deployment on the test cluster and the scraped sandbox that plays it."""

    scraped: ScrapedSandbox
    apps: Any
    namespace: str
    cluster: KubeCluster

    @property
    def sandbox(self) -> Any:
        return self.scraped.sandbox

    def deployment(self) -> Any:
        return self.apps.read_namespaced_deployment(DEPLOYMENT, self.namespace)

    def image(self) -> str:
        return str(self.deployment().spec.template.spec.containers[0].image)

    def roll_out_v2(self) -> None:
        """`kubectl set image ...:v2`: the backend starts failing 30 % of /api."""
        set_image(self.apps, self.namespace, DEPLOYMENT, f"{IMAGE}:v2", change_cause="v2")
        wait_until(lambda: revision_of(self.apps, self.namespace, DEPLOYMENT) == 2, what="rev 2")
        wait_until(lambda: self.sandbox.backend.release.current() == "v2", what="release v2")
        rolled_out(self.cluster.settings(self.namespace), self.namespace, DEPLOYMENT)


@pytest.fixture
def platform(
    kube_cluster: KubeCluster,
    kube_namespace: str,
    sandbox_db: str,
    scraped_sandbox: Callable[..., ScrapedSandbox],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[..., Platform]]:
    """Build the platform: Deployment akig-backend :v1 (revision 1), a sandbox backend whose
    release follows it, its logs served as the pods' logs, the runbook pointed at all of it."""
    stack = ExitStack()
    ns = kube_namespace
    apps: Any = k8s.AppsV1Api(kube_cluster.api())

    def make(template_annotations: dict[str, str] | None = None, **overrides: Any) -> Platform:
        body = deployment_body(
            DEPLOYMENT,
            image=f"{IMAGE}:v1",
            replicas=1,
            annotations={"kubernetes.io/change-cause": "v1"},
            template_annotations=template_annotations,
        )
        apps.create_namespaced_deployment(ns, body)
        wait_until(lambda: revision_of(apps, ns, DEPLOYMENT) == 1, what="revision 1")
        rolled_out(kube_cluster.settings(ns), ns, DEPLOYMENT)
        scraped = scraped_sandbox(
            release_source="kube",
            kube_url=kube_cluster.server,
            kube_token=SecretStr(kube_cluster.admin_token),
            kube_ca_file=kube_cluster.workdir / "ca.pem",
            kube_namespace=ns,
            kube_poll_s=0.2,
            **overrides,
        )
        assert kube_cluster.kubelet is not None
        stack.enter_context(kube_cluster.kubelet.serve_backend_logs(ns, scraped.sandbox.log_file))
        point_runbook_at(scraped, monkeypatch, sandbox_db)
        monkeypatch.setenv("RUNBOOKS_K8S_KUBECONFIG", str(kube_cluster.kubeconfig))
        monkeypatch.setenv("RUNBOOKS_K8S_NAMESPACE", ns)
        return Platform(scraped=scraped, apps=apps, namespace=ns, cluster=kube_cluster)

    with stack:
        yield make


def test_bad_v2_rollout_is_undone_and_prometheus_shows_the_recovery(
    platform: Callable[..., Platform],
) -> None:
    p = platform()
    with p.sandbox.background_traffic(("/api/products", "/api/users/3")):
        wait_ratio(p.scraped, lambda v: v < 0.01, "v1 traffic scraped")
        p.roll_out_v2()
        wait_ratio(p.scraped, lambda v: v > 0.1, "v2's 5xx in Prometheus")
        out = high_error_rate(
            HighErrorRateParams(
                dry_run=False,
                auto_approve=True,
                verify_window="10s",
                verify_timeout_s=120,
                rollout_timeout_s=60,
            )
        )
    assert held(out) == {"D"}, out.scenarios
    (d,) = out.scenarios
    assert any("after revision 2" in e and ":v2" in e and ":v1" in e for e in d.evidence)
    logs = row(out, "backend logs")
    assert logs.verdict == "FAIL" and "release v2 bug" in logs.detail
    assert out.outcome == "acted"
    (done,) = out.actions
    assert done.kind == "rollback"
    assert "revision 2" in done.before and f"{IMAGE}:v2" in done.before
    assert f"{IMAGE}:v1" in done.after
    # The Deployment runs v1's template again, and the backend reads it.
    assert p.image() == f"{IMAGE}:v1"
    assert revision_of(p.apps, p.namespace, DEPLOYMENT) == 3
    assert p.sandbox.backend.release.current() == "v1"
    # Real Prometheus: from above 10 % to under 5 %.
    assert out.error_rate_before is not None and out.error_rate_before > 0.1
    assert out.verify is not None and out.verify.recovered
    assert out.error_rate_after is not None and out.error_rate_after < 0.05
    md = latest_artifact()
    assert "Undo record (rollback)" in md and "revision **2**" in md
    assert "recovered" in md


def test_bad_rollout_and_full_redis_both_hold_and_a_dry_run_changes_nothing(
    platform: Callable[..., Platform],
) -> None:
    p = platform()
    with p.sandbox.background_traffic(("/api/products",)):
        wait_ratio(p.scraped, lambda v: v < 0.01, "v1 traffic scraped")
        p.roll_out_v2()
        p.sandbox.admin("POST", "/admin/redis-fill", json={"fraction": 0.95})
        wait_ratio(p.scraped, lambda v: v > 0.1, "v2's 5xx in Prometheus")
        generation = p.deployment().metadata.generation
        keys = cache_keys(p.scraped)
        out = high_error_rate(HighErrorRateParams())
    assert held(out) == {"C", "D"}, out.scenarios
    assert out.outcome == "planned"
    kinds = {a.kind: a for a in out.plan}
    assert set(kinds) == {"rollback", "cache-clear"}
    rollback = kinds["rollback"]
    assert isinstance(rollback, RollbackAction) and rollback.rollback.to_revision == 1
    # The planned patch went to the API server as a dry run: validated, not stored.
    assert "would roll back to revision 1" in rollback.dry_run_result
    assert p.deployment().metadata.generation == generation
    assert p.image() == f"{IMAGE}:v2"
    assert set(keys) <= set(cache_keys(p.scraped))


def test_a_credential_in_a_pod_log_line_reaches_the_artifact_masked(
    platform: Callable[..., Platform],
) -> None:
    p = platform()
    password, token = "pw-" + uuid.uuid4().hex[:12], "tk" + uuid.uuid4().hex[:16]
    # The backend logs a failure that quotes its DSN and a header: the pods' logs (the
    # fake kubelet serves the backend's log file) carry the credentials.
    p.sandbox.backend.log.write(
        "2026-12-06T12:00:00.000Z level=error method=GET path=/api/products status=500 "
        f'error="connect postgresql://akig:{password}@db.internal/akig; '
        f'password={password}; Authorization: Bearer {token}"'
    )
    out = high_error_rate(HighErrorRateParams())  # a dry run
    logs = row(out, "backend logs")
    assert logs.verdict == "FAIL"
    assert "postgresql://***@db.internal" in logs.detail
    assert "password=***" in logs.detail and "Bearer ***" in logs.detail
    md = latest_artifact()
    assert md_escape("postgresql://***@db.internal/akig") in md  # the line is there, masked
    assert password not in md and token not in md
    assert password not in out.model_dump_json() and token not in out.model_dump_json()


def test_oomkilled_pod_is_scenario_b_and_the_backend_is_restarted(
    platform: Callable[..., Platform],
) -> None:
    p = platform(
        template_annotations={
            "fake-kubelet/last-terminated": "app=OOMKilled:137",
            "fake-kubelet/restarts": "4",
        }
    )
    wait_until(lambda: row_oom(p), what="OOMKilled in the pod status (set by the fake kubelet)")
    before = p.deployment()
    with p.sandbox.background_traffic(("/api/products",)):
        wait_ratio(p.scraped, lambda v: v < 0.01, "traffic scraped")
        out = high_error_rate(
            HighErrorRateParams(
                dry_run=False, auto_approve=True, verify_window="10s", rollout_timeout_s=60
            )
        )
    assert held(out) == {"B"}, out.scenarios
    (b,) = out.scenarios
    assert any("OOMKilled" in e for e in b.evidence) and any("4 container" in e for e in b.evidence)
    (done,) = out.actions
    assert done.kind == "restart" and done.before == "restartedAt never"
    after = p.deployment()
    stamp = after.spec.template.metadata.annotations["kubectl.kubernetes.io/restartedAt"]
    assert done.after == f"restartedAt {stamp}"
    assert after.metadata.generation == before.metadata.generation + 1
    assert out.verify is not None and out.verify.recovered


def row_oom(p: Platform) -> bool:
    core: Any = k8s.CoreV1Api(p.cluster.api())
    pods = core.list_namespaced_pod(p.namespace, label_selector="app=akig").items
    return any(
        c.last_state and c.last_state.terminated and c.last_state.terminated.reason == "OOMKilled"
        for pod in pods
        for c in (pod.status.container_statuses or [])
    )


def test_database_restart_waits_for_approval_even_with_auto_approve(
    platform: Callable[..., Platform],
) -> None:
    p = platform(database_dsn=f"postgresql://postgres@127.0.0.1:{free_port()}/akig")
    p.apps.create_namespaced_stateful_set(
        p.namespace, statefulset_body("akig-postgres", image="registry.local/postgres:16")
    )
    sts_generation = p.apps.read_namespaced_stateful_set(
        "akig-postgres", p.namespace
    ).metadata.generation
    with p.sandbox.background_traffic(("/api/users/5",)):
        wait_ratio(p.scraped, lambda v: v > 0.5, "5xx from the dead database")
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(
                high_error_rate, HighErrorRateParams(dry_run=False, auto_approve=True)
            )
            run_id = wait_for_paused_run(RUNBOOK)
            # A name typed into the Resume form does not count for a database restart
            # (verified approvers only): recorded and ignored; the database team refuses.
            resume_flow_run(
                run_id, run_input={"approved": True, "approver": "carol", "reason": "go"}
            )
            vote(run_id, "db-team", "refuse", reason="DBA on it")
            out = fut.result(timeout=120)
    assert "A" in held(out)
    (a,) = [s for s in out.scenarios if s.scenario == "A"]
    assert any("name the database" in e for e in a.evidence), a.evidence
    assert any(x.kind == "database-restart" and x.possible for x in out.plan)
    assert out.outcome == "refused" and out.actions == []
    sts = p.apps.read_namespaced_stateful_set("akig-postgres", p.namespace)
    assert sts.metadata.generation == sts_generation
    (md,) = flow_run_artifacts(run_id, RUNBOOK)
    assert "carol" in md and "self-declared answers do not count here" in md
    assert "db-team" in md and "DBA on it" in md and "database-restart" in md


def test_database_restart_under_the_runs_own_lock_ends_by_its_verification(
    platform: Callable[..., Platform], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scenario A on a private PostgreSQL cluster that the StatefulSet's pod *is*: deleting the
    pod restarts the cluster (the fake kubelet stops the container), so the restart kills the
    run's advisory-lock session. That death was the run's own doing: released quietly, then
    the 5xx ratio decides, not the dead lock."""
    with ExitStack() as stack:
        cluster = stack.enter_context(private_cluster())
        dsn = create_database(cluster.admin_dsn, "akig", users=50, products=20, orders=200)
        # A stuck session holds the users table: every request for a user waits, the backend's
        # two pooled connections are soon all busy and the rest answer 503 PoolExhausted.
        hog = psycopg.connect(dsn, autocommit=True)
        stack.callback(hog.close)  # closed, not committed: its session dies in the restart
        hog.execute("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        p = platform(database_dsn=dsn, db_pool_size=2, db_pool_wait_s=0.3)
        monkeypatch.setenv("RUNBOOKS_PG_DSN", dsn)  # the runbook measures (and locks) it too
        p.apps.create_namespaced_stateful_set(
            p.namespace,
            statefulset_body("akig-postgres", image="registry.local/postgres:16", replicas=1),
        )
        kubelet = p.cluster.kubelet
        assert kubelet is not None
        stack.enter_context(
            kubelet.on_pod_stop(p.namespace, "component=akig-postgres", cluster.restart)
        )
        started = server_start(cluster.admin_dsn)
        stack.enter_context(p.sandbox.background_traffic(("/api/users/5",), workers=4))
        wait_ratio(p.scraped, lambda v: v > 0.5, "5xx from the stuck database")
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(
                high_error_rate,
                HighErrorRateParams(
                    dry_run=False,
                    auto_approve=True,
                    verify_window="10s",
                    verify_timeout_s=120,
                    rollout_timeout_s=60,
                ),
            )
            run_id = wait_for_paused_run(RUNBOOK)
            assert server_start(cluster.admin_dsn) == started  # nothing before the approval
            vote(run_id, "db-team")  # a database restart: verified approvers only
            out = fut.result(timeout=300)
        # The StatefulSet's restart really restarted the server (and ended the stuck session).
        assert server_start(cluster.admin_dsn) > started
    assert "A" in held(out)
    assert out.outcome == "acted", out.note
    (done,) = out.actions
    assert done.kind == "database-restart"
    assert out.verify is not None and out.verify.recovered, out.verify
    (md,) = flow_run_artifacts(run_id, RUNBOOK)
    assert "its session ended with this run's restart of statefulset/akig-postgres" in md
    assert "recovered" in md and "db-team" in md and "signed link" in md


def server_start(admin_dsn: str) -> Any:
    """When the PostgreSQL server last started."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
    assert row is not None
    return row[0]


@pytest.mark.parametrize("meanwhile", ["nothing", "v3 rolled out"])
def test_rollback_after_approval_goes_only_to_the_approved_revision(
    platform: Callable[..., Platform], meanwhile: str
) -> None:
    p = platform()
    with p.sandbox.background_traffic(("/api/products",)):
        wait_ratio(p.scraped, lambda v: v < 0.01, "v1 traffic scraped")
        p.roll_out_v2()
        wait_ratio(p.scraped, lambda v: v > 0.1, "v2's 5xx in Prometheus")
        params = HighErrorRateParams(dry_run=False, verify_window="10s", verify_timeout_s=120)
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(high_error_rate, params)
            run_id = wait_for_paused_run(RUNBOOK)
            # Nothing changes while the run waits for a human.
            assert p.image() == f"{IMAGE}:v2"
            if meanwhile != "nothing":
                # A fix rolled out by someone else while the approval was pending: the
                # "previous revision" is now v2, which nobody approved rolling back to.
                set_image(p.apps, p.namespace, DEPLOYMENT, f"{IMAGE}:v3", change_cause="v3")
                wait_until(lambda: revision_of(p.apps, p.namespace, DEPLOYMENT) == 3, what="v3")
            resume_flow_run(run_id, run_input={"approved": True, "approver": "dave"})
            out = fut.result(timeout=240)
    (md,) = flow_run_artifacts(run_id, RUNBOOK)
    assert "Re-planned after approval" in md and "dave" in md
    (approved,) = [a for a in out.plan if a.kind == "rollback"]
    assert isinstance(approved, RollbackAction) and approved.rollback.to_revision == 1
    if meanwhile == "nothing":
        assert out.outcome == "acted"
        assert p.image() == f"{IMAGE}:v1"
        assert out.verify is not None and out.verify.recovered
    else:
        assert out.outcome == "skipped" and out.actions == []
        assert p.image() == f"{IMAGE}:v3"
        assert revision_of(p.apps, p.namespace, DEPLOYMENT) == 3


def test_its_service_account_is_enough(
    platform: Callable[..., Platform],
    kube_cluster: KubeCluster,
    kube_namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The catalog runs it as `incident-runbooks`: with that Role alone (deployments/k8s, as
    shipped) every check answers and the rollback, its wait and the verify go through."""
    from tests.integration.test_kubernetes_rbac import Cluster

    p = platform()
    core: Any = k8s.CoreV1Api(kube_cluster.api())
    ingress = f"ingress-{kube_namespace}"
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=ingress)))
    try:
        rbac = Cluster(kube_cluster, kube_namespace, ingress)
        sa = rbac.token_settings("incident-runbooks")
        monkeypatch.setenv("RUNBOOKS_K8S_KUBECONFIG", str(sa.kubeconfig))
        with p.sandbox.background_traffic(("/api/products",)):
            wait_ratio(p.scraped, lambda v: v < 0.01, "v1 traffic scraped")
            p.roll_out_v2()
            wait_ratio(p.scraped, lambda v: v > 0.1, "v2's 5xx in Prometheus")
            out = high_error_rate(
                HighErrorRateParams(
                    dry_run=False, auto_approve=True, verify_window="10s", verify_timeout_s=120
                )
            )
    finally:
        core.delete_namespace(ingress)
    for prefix in ("backend logs", "pods", "rollout history"):
        assert row(out, prefix).verdict != "unavailable", row(out, prefix)
    assert held(out) == {"D"} and out.outcome == "acted"
    assert out.verify is not None and out.verify.recovered
    assert p.image() == f"{IMAGE}:v1"


def test_poisoned_cache_is_scenario_c_and_its_clear_ends_the_errors(
    platform: Callable[..., Platform],
) -> None:
    p = platform()
    with p.sandbox.background_traffic(("/api/products", "/api/users/3")):
        wait_ratio(p.scraped, lambda v: v < 0.01, "healthy traffic scraped")
        p.sandbox.admin("POST", "/admin/cache-poison", params={"users": 20})
        wait_ratio(p.scraped, lambda v: v > 0.5, "5xx from the poisoned entries")
        out = high_error_rate(
            HighErrorRateParams(
                dry_run=False, auto_approve=True, verify_window="10s", verify_timeout_s=120
            )
        )
    # Only the logs say it: Redis itself is healthy, the reads are hits that fail to decode.
    assert held(out) == {"C"}, out.scenarios
    (c,) = out.scenarios
    assert len(c.evidence) == 1 and "error line(s) in the logs name the cache" in c.evidence[0]
    assert "JSONDecodeError" in row(out, "backend logs").detail
    (done,) = out.actions
    assert done.kind == "cache-clear"
    assert out.verify is not None and out.verify.recovered
    assert p.sandbox.traffic(5, "/api/users/3") == [200] * 5


@pytest.mark.parametrize("undo_by", ["the runbook", "kubectl rollout undo"])
def test_a_rerun_never_rolls_forward_onto_the_release_just_undone(
    platform: Callable[..., Platform], kubectl: Any, world_env: Any, undo_by: str
) -> None:
    """v1, then v2 (bad): 5xx. v2 is undone (v1 is revision 3 on its old ReplicaSet, created
    minutes before) while the 5xx go on for another reason. A re-run that may act on its own
    must not plan "revision 3 (v1) -> revision 2 (v2)"."""
    world_env()  # the first run's failed verification pages local sinks only
    p = platform()
    with p.sandbox.background_traffic(("/api/products", "/api/users/3")):
        wait_ratio(p.scraped, lambda v: v < 0.01, "v1 traffic scraped")
        p.roll_out_v2()
        wait_ratio(p.scraped, lambda v: v > 0.1, "v2's 5xx in Prometheus")
        p.sandbox.faults(error_rate_pct=30)  # the other reason: it outlives v2
        if undo_by == "the runbook":
            with pytest.raises(ErrorRateNotRecovered):
                high_error_rate(
                    HighErrorRateParams(
                        dry_run=False,
                        auto_approve=True,
                        verify_window="10s",
                        verify_timeout_s=5,
                        rollout_timeout_s=60,
                    )
                )
        else:
            done = Kubectl(kubectl, p.cluster.kubeconfig, p.namespace)(
                "rollout", "undo", f"deployment/{DEPLOYMENT}"
            )
            assert done.returncode == 0, done.stderr
        wait_until(lambda: revision_of(p.apps, p.namespace, DEPLOYMENT) == 3, what="rev 3")
        wait_until(lambda: p.sandbox.backend.release.current() == "v1", what="release v1")
        rolled_out(p.cluster.settings(p.namespace), p.namespace, DEPLOYMENT)
        wait_ratio(p.scraped, lambda v: v > 0.1, "the 5xx go on under v1")
        out = high_error_rate(
            HighErrorRateParams(
                dry_run=False, auto_approve=True, verify_window="10s", verify_timeout_s=5
            )
        )
    # Nothing rolled back: v1 stays, at revision 3.
    assert p.image() == f"{IMAGE}:v1"
    assert revision_of(p.apps, p.namespace, DEPLOYMENT) == 3
    assert "D" not in held(out), out.scenarios
    assert out.actions == [] and out.outcome == "nothing to do"
    # The rollout-history row and the plan say why.
    rollout = row(out, "rollout history")
    assert f"revision 3 ({IMAGE}:v1) current since" in rollout.observed, rollout
    assert "an undo (it was revision 1 before)" in rollout.observed
    assert f"revision 2 ({IMAGE}:v2) was rolled back from" in rollout.detail
    assert "never a rollback target: it is the release just undone" in rollout.detail
    (rollback,) = [a for a in out.plan if a.kind == "rollback"]
    assert not rollback.possible and "not planned (D not claimed)" in rollback.summary
    # The artifact's cells (200 characters) keep the reason.
    plan = latest_artifact().split("## Plan", 1)[1].split("## ", 1)[0]
    assert "not planned \\(D not claimed\\)" in plan and "the release just undone" in plan
    # Had D been claimed from older evidence (an undo between the evidence and the plan),
    # the plan's own read refuses the same target.
    d = ScenarioVerdict(scenario="D", name="code", evidence=["read before the undo"])
    (late,) = make_plan(HighErrorRateParams(), [d])
    assert isinstance(late, RollbackAction) and late.rollback.to_revision == 2
    assert not late.possible and late.summary.startswith("not planned: revision 2")


def test_two_runs_on_a_poisoned_cache_the_second_finds_the_errors_ended(
    platform: Callable[..., Platform],
) -> None:
    """Two `auto_approve` runs started together on a poisoned cache: both plan the clear. The
    first to get the target lock clears and verifies before letting go; the second, whose
    evidence (the log tail) still names the cache, measures the 5xx ratio again under the
    lock, finds the errors over and clears nothing."""
    p = platform()
    with p.sandbox.background_traffic(("/api/products", "/api/users/3")):
        wait_ratio(p.scraped, lambda v: v < 0.01, "healthy traffic scraped")
        p.sandbox.admin("POST", "/admin/cache-poison", params={"users": 20})
        wait_ratio(p.scraped, lambda v: v > 0.5, "5xx from the poisoned entries")
        params = HighErrorRateParams(
            dry_run=False, auto_approve=True, verify_window="10s", verify_timeout_s=120
        )
        runs = run_two_at_once(params, planned="redis-cache-clear-True")
    first, second_id, second = one_cleared_one_not(runs)
    assert first.verify is not None and first.verify.recovered
    assert held(second) == {"C"} and second.actions == [] and second.outcome == "skipped"
    assert "the errors ended while this run waited" in second.note, second.note
    (md,) = flow_run_artifacts(second_id, RUNBOOK)
    assert "Re-planned under the lock" in md and "errors ended while this run waited" in md
