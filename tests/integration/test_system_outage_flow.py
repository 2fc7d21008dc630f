"""The `system-outage` runbook on real components: the test Kubernetes API (backend, frontend
and ingress controller Deployments; the fake kubelet crash-loops the backend's pods), the
sandbox backend behind nginx (TLS) as the endpoint a user reaches, the local PostgreSQL and
Redis (read only: the DR figures), Prefect, and sinks for the pages. Nothing of ours is
mocked."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

import pytest
from kubernetes import client as k8s

from flows.outage.dr import ARTIFACT_KEY
from flows.system_outage import (
    RUNBOOK,
    OutageNotRecovered,
    SystemOutageOutcome,
    SystemOutageParams,
    system_outage,
)
from tasks.kubernetes import RESTARTED_AT
from tests.fixtures.approvals import vote
from tests.fixtures.kube import KubeCluster
from tests.fixtures.outage import Nginx, NginxFactory
from tests.fixtures.prefect_runs import flow_run_artifacts, paused_runs, wait_for_paused_run
from tests.fixtures.sandbox import Sandbox
from tests.integration.kube_helpers import deployment_body, rolled_out, wait_until

pytestmark = [pytest.mark.kube, pytest.mark.usefixtures("prefect_api")]

BACKEND, FRONTEND, INGRESS = "akig-backend", "akig-frontend", "ingress-nginx-controller"
STAGGER_S = 1.5
CRASH = {"fake-kubelet/waiting": "CrashLoopBackOff", "fake-kubelet/restarts": "7"}


@dataclass
class Platform:
    """The platform's Deployments in a test namespace, and the sandbox as its endpoint."""

    cluster: KubeCluster
    namespace: str
    sandbox: Sandbox
    world: Any
    endpoint: Nginx

    @property
    def apps(self) -> Any:
        return k8s.AppsV1Api(self.cluster.api())

    @property
    def core(self) -> Any:
        return k8s.CoreV1Api(self.cluster.api())

    def generation(self, name: str) -> int:
        return int(self.apps.read_namespaced_deployment(name, self.namespace).metadata.generation)

    def restarted_at(self, name: str) -> str | None:
        dep = self.apps.read_namespaced_deployment(name, self.namespace)
        return (dep.spec.template.metadata.annotations or {}).get(RESTARTED_AT)

    def crash_backend(self) -> None:
        """The backend's running pods start crash-looping (their own annotations: a
        restart's new pods are healthy, as when a restart does help)."""
        pods = self.core.list_namespaced_pod(
            self.namespace, label_selector=f"component={BACKEND}"
        ).items
        for pod in pods:
            self.core.patch_namespaced_pod(
                pod.metadata.name, self.namespace, {"metadata": {"annotations": CRASH}}
            )

        def crashing() -> bool:
            found = self.core.list_namespaced_pod(
                self.namespace, label_selector=f"component={BACKEND}"
            ).items
            return bool(found) and all(
                any(
                    c.state and c.state.waiting and c.state.waiting.reason == "CrashLoopBackOff"
                    for c in (p.status.container_statuses or [])
                )
                for p in found
            )

        wait_until(crashing, what="backend pods in CrashLoopBackOff")

    def heal_backend(self) -> None:
        """The crash-loop annotations removed: the backend's pods run again."""
        selector = f"component={BACKEND}"
        for pod in self.core.list_namespaced_pod(self.namespace, label_selector=selector).items:
            self.core.patch_namespaced_pod(
                pod.metadata.name,
                self.namespace,
                {"metadata": {"annotations": dict.fromkeys(CRASH)}},
            )

        def running() -> bool:
            found = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
            return all(
                not (c.state and c.state.waiting) and c.ready
                for p in found
                for c in (p.status.container_statuses or [])
            )

        wait_until(running, what="backend pods running again")


@pytest.fixture
def platform(
    kube_cluster: KubeCluster,
    kube_namespace: str,
    sandbox_backend: Sandbox,
    make_nginx: NginxFactory,
    world_env: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[[], Platform]:
    def make() -> Platform:
        ns = kube_namespace
        apps: Any = k8s.AppsV1Api(kube_cluster.api())
        for name in (BACKEND, FRONTEND):
            apps.create_namespaced_deployment(ns, deployment_body(name, replicas=1))
        ingress = {"app": "ingress-nginx", "component": INGRESS}
        apps.create_namespaced_deployment(ns, deployment_body(INGRESS, replicas=1, labels=ingress))
        settings = kube_cluster.settings(ns)
        for name in (BACKEND, FRONTEND, INGRESS):
            rolled_out(settings, ns, name)
        # The path a user takes: a TLS load balancer in front of the backend, by name.
        endpoint = make_nginx(sandbox_backend.url)
        env = {
            "RUNBOOKS_K8S_KUBECONFIG": str(kube_cluster.kubeconfig),
            "RUNBOOKS_K8S_NAMESPACE": ns,
            "RUNBOOKS_OUTAGE_INGRESS_NAMESPACE": ns,
            "RUNBOOKS_OUTAGE_INGRESS_DEPLOYMENT": INGRESS,
            "RUNBOOKS_OUTAGE_ENDPOINT_URL": endpoint.url("/api/health"),
            "RUNBOOKS_OUTAGE_ENDPOINT_CA_FILE": str(endpoint.ca_file),
            "RUNBOOKS_OUTAGE_RESTART_STAGGER_S": str(STAGGER_S),
            "RUNBOOKS_BACKEND_URL": sandbox_backend.url,
        }
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        for key in ("RUNBOOKS_OUTAGE_HOSTNAMES", "RUNBOOKS_OUTAGE_DEPENDENCIES"):
            monkeypatch.delenv(key, raising=False)
        return Platform(kube_cluster, ns, sandbox_backend, world_env(), endpoint)

    return make


def acting(**kw: Any) -> SystemOutageParams:
    base: dict[str, Any] = {"dry_run": False, "rollout_timeout_s": 60, "verify_timeout_s": 10}
    return SystemOutageParams(**{**base, **kw})


def start(params: SystemOutageParams) -> tuple[Future[Any], UUID, ThreadPoolExecutor]:
    """Run the flow in a thread; its id once it pauses for the approval."""
    before = set(paused_runs(RUNBOOK))
    pool = ThreadPoolExecutor(1)
    fut = pool.submit(system_outage, params, return_state=True)
    return fut, wait_for_paused_run(RUNBOOK, ignore=before), pool


def outcome(state: Any) -> SystemOutageOutcome:
    assert state.is_completed(), state.message
    out = state.result()
    assert isinstance(out, SystemOutageOutcome)
    return out


def test_dry_run_names_the_backend_plans_the_staggered_restart_and_pages(
    platform: Callable[[], Platform],
) -> None:
    p = platform()
    p.crash_backend()
    generations = {n: p.generation(n) for n in (BACKEND, FRONTEND)}
    state = system_outage(SystemOutageParams(), return_state=True)
    out = outcome(state)
    assert out.outcome == "planned"
    assert out.first_broken == "backend"
    rows = {c.item: c for c in out.checks}
    assert rows["Backend pods"].verdict == "FAIL" and "CrashLoopBackOff" in str(
        rows["Backend pods"].model_dump()
    )
    assert [(a.kind, a.target) for a in out.plan] == [
        ("restart", f"k8s:{p.namespace}/{BACKEND}"),
        ("restart", f"k8s:{p.namespace}/{FRONTEND}"),
    ]
    # The restarts went to the API server as server-side dry runs: nothing changed.
    assert all("server dry run" in a.dry_run_result for a in out.plan)
    assert {n: p.generation(n) for n in (BACKEND, FRONTEND)} == generations
    assert p.world.counts().get("on-call") == 1  # critical at the start
    run_id = state.state_details.flow_run_id
    (md,) = flow_run_artifacts(run_id, RUNBOOK)
    assert "Likely cause: **Backend pods**" in md and "Cluster events (all namespaces)" in md
    assert "Disaster-recovery readiness" in md and "Paged" in md
    (checklist,) = flow_run_artifacts(run_id, ARTIFACT_KEY)
    assert checklist.count("### ") == 5 and "cannot meet an RPO of 0" in checklist
    assert f"kubectl -n {p.namespace} scale deployment/{BACKEND}" in checklist
    assert {c.item.split(" (")[0] for c in out.dr_checks} == {
        "WAL archive",
        "Base backup",
        "Redis persistence",
    }


def test_approved_restart_is_staggered_and_verified_from_outside(
    platform: Callable[[], Platform],
) -> None:
    p = platform()
    p.crash_backend()
    fut, run_id, pool = start(acting())
    with pool:
        assert p.restarted_at(BACKEND) is None  # nothing before the approval
        vote(run_id, "on-call")
        out = outcome(fut.result(timeout=180))
    assert out.outcome == "acted", out.note
    assert [r.target for r in out.actions] == [
        f"k8s:{p.namespace}/{BACKEND}",
        f"k8s:{p.namespace}/{FRONTEND}",
    ]
    assert p.restarted_at(BACKEND) and p.restarted_at(FRONTEND)
    s = out.stagger
    assert s is not None and s.stagger_s == STAGGER_S
    assert s.backend_rolled_out_at and s.frontend_started_at and s.backend_started_at
    # Both rollouts were waited for, the frontend's after its own restart.
    assert s.frontend_rolled_out_at and s.frontend_started_at < s.frontend_rolled_out_at
    # The stagger holds: the frontend restart starts no earlier than the backend's rollout
    # finished plus the stagger.
    assert s.backend_started_at < s.backend_rolled_out_at
    assert s.frontend_started_at >= s.backend_rolled_out_at + timedelta(seconds=STAGGER_S)
    assert out.verify is not None and out.verify.healthy and out.verify.check.via == "endpoint"
    # Verified from outside through the load balancer (TLS, by name), not at the backend.
    assert out.verify.check.url == p.endpoint.url("/api/health")
    assert out.verify.check.timings and out.verify.check.timings.tls_ms
    (md,) = flow_run_artifacts(run_id, RUNBOOK)
    assert "Undo record (restart)" in md and "restartedAt was never set" in md
    # The spec's lock, then the backend's own (the other runbooks that change it take it).
    assert f"k8s:{p.namespace}/{BACKEND}+{FRONTEND}" in md.replace("\\", "")
    assert "Backend lock" in md
    assert "Verify (from outside)" in md and "**recovered**" in md


def test_refused_approval_changes_nothing(platform: Callable[[], Platform]) -> None:
    p = platform()
    p.crash_backend()
    generations = {n: p.generation(n) for n in (BACKEND, FRONTEND)}
    fut, run_id, pool = start(acting())
    with pool:
        vote(run_id, "on-call", "refuse", reason="investigating first")
        out = outcome(fut.result(timeout=120))
    assert out.outcome == "refused" and out.actions == []
    assert {n: p.generation(n) for n in (BACKEND, FRONTEND)} == generations
    assert p.restarted_at(BACKEND) is None and p.restarted_at(FRONTEND) is None


def test_approval_timing_out_changes_nothing(platform: Callable[[], Platform]) -> None:
    p = platform()
    p.crash_backend()
    generations = {n: p.generation(n) for n in (BACKEND, FRONTEND)}
    started = time.monotonic()
    out = outcome(system_outage(acting(approval_timeout_s=10), return_state=True))
    assert out.outcome == "refused" and out.actions == []
    assert time.monotonic() - started >= 10
    assert {n: p.generation(n) for n in (BACKEND, FRONTEND)} == generations


@pytest.mark.parametrize("cause", ["dns", "database", "dependencies"])
def test_no_restart_when_the_cause_is_not_the_platforms_pods(
    platform: Callable[[], Platform], monkeypatch: pytest.MonkeyPatch, cause: str
) -> None:
    p = platform()
    p.crash_backend()  # broken too, but downstream of the cause: a restart cannot help
    if cause == "dns":
        # A resolver that refuses at once (nothing listens on port 1): the names fail.
        monkeypatch.setenv("RUNBOOKS_OUTAGE_HOSTNAMES", '["akig.test"]')
        monkeypatch.setenv("RUNBOOKS_OUTAGE_RESOLVER", "127.0.0.1:1")
        monkeypatch.setenv("RUNBOOKS_OUTAGE_DNS_TIMEOUT_S", "1")
    elif cause == "database":
        monkeypatch.setenv("RUNBOOKS_PG_DSN", "postgresql://postgres@127.0.0.1:1/postgres")
        monkeypatch.setenv("RUNBOOKS_PG_CONNECT_TIMEOUT_S", "1")
    else:
        monkeypatch.setenv("RUNBOOKS_OUTAGE_DEPENDENCIES", '["http://127.0.0.1:1/gateway"]')
        monkeypatch.setenv("RUNBOOKS_OUTAGE_DEPENDENCY_TIMEOUT_S", "1")
        p.heal_backend()  # the backend comes before dependencies in the order
    generations = {n: p.generation(n) for n in (BACKEND, FRONTEND)}
    # Not a dry run and no auto-approve: had a restart been planned, the run would pause.
    out = outcome(system_outage(acting(), return_state=True))
    # The database comes after the backend in the order: the crash-looping backend is named
    # first, and the database below it is why no restart is planned.
    named = "backend" if cause == "database" else cause
    assert out.first_broken == named, [(r.layer, r.status, r.summary) for r in out.layers]
    assert out.outcome == "nothing to do" and out.approval is None
    (action,) = out.plan
    assert action.possible is False and action.summary.startswith("not planned: ")
    assert ("Database is broken too" in action.summary) == (cause == "database")
    if cause == "database":  # the DR figure it cannot read is a row, not a crash
        wal = next(c for c in out.dr_checks if c.item.startswith("WAL archive"))
        assert wal.verdict == "unavailable" and "unavailable" in wal.detail
    assert {n: p.generation(n) for n in (BACKEND, FRONTEND)} == generations
    assert p.world.counts().get("on-call") == 1  # still paged at the start


def test_verification_failing_pages_a_follow_up_and_fails(
    platform: Callable[[], Platform],
) -> None:
    p = platform()
    p.crash_backend()
    fut, run_id, pool = start(acting(verify_timeout_s=2))
    with pool:
        vote(run_id, "on-call")
        # The backend goes down once the restarts began: they did not bring it back; the
        # load balancer in front of it still answers, with a 502.
        wait_until(lambda: p.restarted_at(BACKEND) is not None, timeout=60, what="restart")
        p.sandbox.server.stop()
        state = fut.result(timeout=180)
    assert state.is_failed()
    with pytest.raises(OutageNotRecovered, match="not recovered after the restarts"):
        state.result()
    assert p.world.counts().get("on-call", 0) >= 2  # the start, then the follow-up
    (md,) = flow_run_artifacts(run_id, RUNBOOK)
    assert "Follow-up page (not-recovered)" in md and "**NOT recovered**" in md
    assert "HTTP 502" in md
