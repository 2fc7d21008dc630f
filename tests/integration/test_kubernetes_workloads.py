"""Issue 9's Kubernetes tasks against the real API server: pod restarts / OOMKilled,
StatefulSet restart + rollout status, and the 2x-capped memory-limit raise.
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client as k8s
from prefect import flow

from tasks.errors import PermanentError, SafetyViolation
from tasks.kubernetes import (
    RESTARTED_AT,
    ROLLOUT_FIELD_MANAGER,
    MemoryLimitChange,
    MemoryLimitResult,
    StatefulSetRestartResult,
    apply_memory_limit,
    apply_statefulset_restart,
    plan_memory_limit,
    plan_statefulset_restart,
    pod_restarts,
    raise_memory_limit,
    restart_statefulset,
    tail_logs,
    wait_for_statefulset,
)
from tasks.kubernetes.api import kube_session
from tasks.kubernetes.workload import apply_restart_value, get_workload, plan_restart_value
from tests.fixtures.kube import KubeCluster
from tests.fixtures.prefect_runs import task_runs
from tests.integration.kube_helpers import (
    deployment_body,
    pod_uids,
    rolled_out,
    statefulset_body,
    status_settled,
    through_proxy,
    wait_until,
)

pytestmark = pytest.mark.kube


@pytest.fixture
def apps(kube_cluster: KubeCluster) -> Any:
    return k8s.AppsV1Api(kube_cluster.api())


@pytest.fixture
def core(kube_cluster: KubeCluster) -> Any:
    return k8s.CoreV1Api(kube_cluster.api())


def _sts_ready(kube_cluster: KubeCluster, ns: str, name: str) -> Any:
    return wait_for_statefulset.fn(
        name, ns, timeout_s=60, poll_s=0.1, settings=kube_cluster.settings(ns)
    )


# ------------------------------------------------------------------------ pod restarts


def test_pod_restarts_report_oomkilled_and_crashloop(kube_cluster, kube_namespace, apps):
    ns = kube_namespace
    settings = kube_cluster.settings(ns)
    body = deployment_body(
        "oomy",
        replicas=1,
        template_annotations={
            "fake-kubelet/restarts": "4",
            "fake-kubelet/ready": "false",
            "fake-kubelet/last-terminated": "app=OOMKilled:137,sidecar=Error:1",
            "fake-kubelet/waiting": "app=CrashLoopBackOff",
        },
    )
    app = body["spec"]["template"]["spec"]["containers"][0]
    app["resources"] = {"limits": {"memory": "256Mi"}}
    body["spec"]["template"]["spec"]["containers"].append(
        {"name": "sidecar", "image": "registry.local/sidecar:1"}
    )
    apps.create_namespaced_deployment(ns, body)
    apps.create_namespaced_deployment(ns, deployment_body("healthy", replicas=1))
    rolled_out(settings, ns, "healthy")

    def reported() -> Any:
        found = pod_restarts.fn("component=oomy", ns, settings=settings)
        if found and found[0].containers and found[0].containers[0].waiting_reason:
            return found
        return None

    [pod] = wait_until(reported, what="oomy pod status")
    assert pod.pod.startswith("oomy-") and pod.phase == "Running"
    app_c, sidecar = pod.containers
    assert (app_c.container, app_c.restart_count, app_c.state) == ("app", 4, "waiting")
    assert (app_c.waiting_reason, app_c.last_terminated_reason) == ("CrashLoopBackOff", "OOMKilled")
    assert (app_c.last_exit_code, app_c.memory_limit, app_c.oom_killed) == (137, "256Mi", True)
    assert app_c.last_finished_at is not None
    assert (sidecar.state, sidecar.last_terminated_reason, sidecar.last_exit_code) == (
        "running",
        "Error",
        1,
    )
    assert not sidecar.oom_killed
    assert (pod.restarts, pod.oom_killed) == (8, ["app"])

    # The default selector (app=akig) sees both; the healthy pod has nothing to report.
    everything = {p.pod.split("-")[0]: p for p in pod_restarts.fn(None, ns, settings=settings)}
    healthy = everything["healthy"]
    assert (healthy.restarts, healthy.oom_killed) == (0, [])
    assert [(c.state, c.last_terminated_reason) for c in healthy.containers] == [("running", None)]


# ------------------------------------------------------------------ StatefulSet restart


def test_restart_statefulset_like_kubectl(kube_cluster, kube_namespace, apps, core):
    ns, name = kube_namespace, "akig-redis"
    settings = kube_cluster.settings(ns)
    apps.create_namespaced_stateful_set(ns, statefulset_body(name, replicas=2))
    first = _sts_ready(kube_cluster, ns, name)
    assert first.complete and first.ready_replicas == 2
    assert first.message == "partitioned roll out complete: 2 new pods have been updated..."
    before = pod_uids(core, ns, f"component={name}")
    assert sorted(before) == [f"{name}-0", f"{name}-1"]
    generation = apps.read_namespaced_stateful_set(name, ns).metadata.generation

    # A server dry run changes nothing.
    dry = restart_statefulset.fn(name, ns, dry_run=True, settings=settings)
    assert dry.patched and dry.dry_run
    assert apps.read_namespaced_stateful_set(name, ns).metadata.generation == generation

    result = restart_statefulset.fn(name, ns, settings=settings)
    assert result.patched and result.message == f"statefulset.apps/{name} restarted"
    sts = apps.read_namespaced_stateful_set(name, ns)
    assert sts.spec.template.metadata.annotations[RESTARTED_AT] == result.restarted_at
    assert sts.metadata.generation == generation + 1 == result.generation
    managers = {m.manager for m in sts.metadata.managed_fields or []}
    assert ROLLOUT_FIELD_MANAGER in managers

    status = _sts_ready(kube_cluster, ns, name)
    assert status.complete and status.observed_generation == generation + 1
    after = pod_uids(core, ns, f"component={name}")
    # Same stable names, every pod recreated.
    assert sorted(after) == sorted(before)
    assert all(after[pod] != before[pod] for pod in before)

    # The same plan again (a retry whose first answer was lost): nothing is written.
    plan = plan_statefulset_restart.fn(name, ns, result.restarted_at + "x", settings=settings)
    plan = plan.model_copy(update={"restarted_at": result.restarted_at})
    again = apply_statefulset_restart.fn(plan, settings=settings)
    assert not again.patched and "nothing patched" in again.message
    assert apps.read_namespaced_stateful_set(name, ns).metadata.generation == generation + 1

    # Asking for the value already set is kubectl's "within the past second" refusal.
    with pytest.raises(Exception, match="within the past second"):
        plan_statefulset_restart.fn(name, ns, result.restarted_at, settings=settings)
    with pytest.raises(PermanentError, match="statefulset missing not found"):
        restart_statefulset.fn("missing", ns, settings=settings)


def test_statefulset_status_waits_for_ready_pods(kube_cluster, kube_namespace, apps):
    ns, name = kube_namespace, "akig-postgres"
    settings = kube_cluster.settings(ns)
    body = statefulset_body(name, replicas=1, template_annotations={"fake-kubelet/ready": "false"})
    apps.create_namespaced_stateful_set(ns, body)
    with pytest.raises(
        PermanentError, match=r"timed out after 1 s .*Waiting for 1 pods to be ready"
    ):
        wait_for_statefulset.fn(name, ns, timeout_s=1, poll_s=0.1, settings=settings)
    # OnDelete: kubectl has no status for it, and neither do we.
    apps.create_namespaced_stateful_set(
        ns, statefulset_body("ondelete", replicas=1, updateStrategy={"type": "OnDelete"})
    )
    with pytest.raises(PermanentError, match="only available for RollingUpdate"):
        wait_for_statefulset.fn("ondelete", ns, timeout_s=5, poll_s=0.1, settings=settings)


def test_retried_statefulset_restart_restarts_exactly_once(
    kube_cluster, kube_namespace, apps, prefect_api, response_dropping_proxy
):
    ns, name = kube_namespace, "akig-redis"
    apps.create_namespaced_stateful_set(ns, statefulset_body(name, replicas=1))
    _sts_ready(kube_cluster, ns, name)
    generation = apps.read_namespaced_stateful_set(name, ns).metadata.generation
    proxy, via_proxy = through_proxy(kube_cluster, response_dropping_proxy, ns)

    @flow
    def restart() -> StatefulSetRestartResult:
        return restart_statefulset(name, ns, settings=via_proxy)

    state = restart(return_state=True)
    result = state.result()

    assert len(proxy.dropped) == 1
    assert proxy.count("PATCH") == 1
    assert task_runs(state.state_details.flow_run_id) == {
        f"plan-restart-{ns}/statefulset-{name}": 1,
        f"apply-restart-{ns}/statefulset-{name}": 2,
    }
    assert result.patched is False
    sts = apps.read_namespaced_stateful_set(name, ns)
    assert sts.spec.template.metadata.annotations[RESTARTED_AT] == result.restarted_at
    assert sts.metadata.generation == generation + 1


# ------------------------------------------------------------------- memory limit raise


def _limit(apps: Any, ns: str, name: str, kind: str = "deployment", container: int = 0) -> str:
    read = (
        apps.read_namespaced_deployment
        if kind == "deployment"
        else apps.read_namespaced_stateful_set
    )
    c = read(name, ns).spec.template.spec.containers[container]
    return str((c.resources.limits or {}).get("memory"))


def test_raise_memory_limit_capped_at_twice(kube_cluster, kube_namespace, apps):
    ns, name = kube_namespace, "akig-backend"
    settings = kube_cluster.settings(ns)
    body = deployment_body(name, replicas=1)
    containers = body["spec"]["template"]["spec"]["containers"]
    containers[0]["resources"] = {"limits": {"memory": "256Mi"}, "requests": {"memory": "128Mi"}}
    containers.append({"name": "sidecar", "image": "registry.local/sidecar:1"})
    apps.create_namespaced_deployment(ns, body)
    generation = apps.read_namespaced_deployment(name, ns).metadata.generation

    # Above 2x, lower, or a container without a limit: refused by the plan, nothing written.
    for target, why in (("513Mi", "more than 2x"), ("1Gi", "more than 2x"), ("200Mi", "lower")):
        with pytest.raises(SafetyViolation, match=why):
            raise_memory_limit.fn("deployment", name, ns, "app", target, settings=settings)
    with pytest.raises(SafetyViolation, match="has no memory limit"):
        raise_memory_limit.fn("deployment", name, ns, "sidecar", "64Mi", settings=settings)
    other = deployment_body("not-ours", replicas=0, labels={"app": "someone-else"})
    other["spec"]["template"]["spec"]["containers"][0]["resources"] = {
        "limits": {"memory": "256Mi"}
    }
    apps.create_namespaced_deployment(ns, other)
    with pytest.raises(SafetyViolation, match="do not match the platform selector 'app=akig'"):
        raise_memory_limit.fn("deployment", "not-ours", ns, "app", "300Mi", settings=settings)
    with pytest.raises(PermanentError, match="no container 'nope'"):
        raise_memory_limit.fn("deployment", name, ns, "nope", "300Mi", settings=settings)
    # The cap is in the model too: a hand-made plan past 2x never reaches the API server.
    with pytest.raises(ValueError, match="more than 2x"):
        MemoryLimitChange(
            kind="deployment",
            name=name,
            namespace=ns,
            container="app",
            current="256Mi",
            current_bytes=256 * 2**20,
            target="600Mi",
            target_bytes=600 * 2**20,
            generation=1,
        )
    forged = MemoryLimitChange.model_construct(
        kind="deployment",
        name=name,
        namespace=ns,
        container="app",
        current="256Mi",
        current_bytes=256 * 2**20,
        target="600Mi",
        target_bytes=600 * 2**20,
        generation=1,
    )
    with pytest.raises(SafetyViolation, match="more than 2x"):
        apply_memory_limit.fn(forged, settings=settings)
    assert apps.read_namespaced_deployment(name, ns).metadata.generation == generation

    dry = raise_memory_limit.fn(
        "deployment", name, ns, "app", "0.5Gi", dry_run=True, settings=settings
    )
    assert (dry.before, dry.after, dry.changed, dry.patched) == ("256Mi", "256Mi", False, True)
    assert _limit(apps, ns, name) == "256Mi"

    plan = plan_memory_limit.fn("deployment", name, ns, "app", "512Mi", settings=settings)
    done = apply_memory_limit.fn(plan, settings=settings)
    assert (done.before, done.after, done.changed, done.patched) == ("256Mi", "512Mi", True, True)
    dep = apps.read_namespaced_deployment(name, ns)
    app, sidecar = dep.spec.template.spec.containers
    assert app.resources.limits == {"memory": "512Mi"}
    assert app.resources.requests == {"memory": "128Mi"}  # the patch touched the limit only
    assert app.image == containers[0]["image"] and sidecar.resources.limits is None
    assert dep.metadata.generation == generation + 1

    # The same plan again (a retry): already at the target, nothing written.
    again = apply_memory_limit.fn(plan, settings=settings)
    assert (again.changed, again.patched, again.after) == (True, False, "512Mi")
    assert "nothing patched" in again.message
    # Planned from 512Mi, then someone else sets 600Mi: refused, theirs stays.
    stale = plan_memory_limit.fn("deployment", name, ns, "app", "1Gi", settings=settings)
    apps.patch_namespaced_deployment(
        name,
        ns,
        {
            "spec": {
                "template": {
                    "spec": {
                        "containers": [
                            {"name": "app", "resources": {"limits": {"memory": "600Mi"}}}
                        ]
                    }
                }
            }
        },
    )
    with pytest.raises(SafetyViolation, match="changed since the plan"):
        apply_memory_limit.fn(stale, settings=settings)
    assert _limit(apps, ns, name) == "600Mi"


def test_raise_memory_limit_on_a_statefulset(kube_cluster, kube_namespace, apps):
    ns, name = kube_namespace, "akig-redis"
    settings = kube_cluster.settings(ns)
    apps.create_namespaced_stateful_set(ns, statefulset_body(name, replicas=1, memory_limit="1Gi"))
    result = raise_memory_limit.fn("statefulset", name, ns, "main", "2Gi", settings=settings)
    assert (result.before, result.after, result.changed) == ("1Gi", "2Gi", True)
    assert _limit(apps, ns, name, "statefulset") == "2Gi"
    # 2Gi -> 2048Mi is the same quantity: already there.
    same = raise_memory_limit.fn("statefulset", name, ns, "main", "2048Mi", settings=settings)
    assert (same.before, same.after, same.changed, same.patched) == ("2Gi", "2Gi", False, False)


# -------------------------------------------------------- real backend lines as pod logs


def test_tail_logs_returns_the_sandbox_backends_real_lines(
    kube_cluster, kube_namespace, apps, make_sandbox_backend
):
    ns = kube_namespace
    settings = kube_cluster.settings(ns)
    apps.create_namespaced_deployment(ns, deployment_body("akig-backend", replicas=2))
    rolled_out(settings, ns, "akig-backend")
    sb = make_sandbox_backend()
    sb.faults(error_rate_pct=100)
    assert set(sb.traffic(5)) == {500}
    sb.faults(error_rate_pct=0)
    assert set(sb.traffic(3, "/api/health")) == {200}
    written = sb.log_lines()
    assert len(written) >= 8

    assert kube_cluster.kubelet is not None
    with kube_cluster.kubelet.serve_backend_logs(ns, sb.log_file):
        result = tail_logs.fn("akig-backend", lines=8, namespace=ns, settings=settings)
        errors = tail_logs.fn(
            "akig-backend", lines=100, grep=r" status=500 ", namespace=ns, settings=settings
        )
    # Every pod serves the backend's own last lines, through pods/log on the API server.
    assert len(result.logs) == 2
    assert all(p.lines == written[-8:] for p in result.logs)
    assert any("duration=" in line and "/api/health" in line for line in result.logs[0].lines)
    assert all(
        len(p.lines) == 5 and p.lines == [x for x in written if " status=500 " in x]
        for p in errors.logs
    )
    # Outside the block the pods are back to the fake kubelet's canned lines.
    canned = tail_logs.fn("akig-backend", lines=1, namespace=ns, settings=settings)
    assert all(p.lines[0].endswith("line 20") for p in canned.logs)


def test_retried_memory_limit_raise_writes_once(
    kube_cluster, kube_namespace, apps, prefect_api, response_dropping_proxy
):
    ns, name = kube_namespace, "akig-postgres"
    apps.create_namespaced_stateful_set(ns, statefulset_body(name, replicas=1, memory_limit="1Gi"))
    # A controller status write between the plan's read and the PATCH is a correct 409 and
    # a second PATCH: counted writes are measured on a settled StatefulSet (its pod ready,
    # the controller's last status write done).
    _sts_ready(kube_cluster, ns, name)
    status_settled(apps.read_namespaced_stateful_set, ns, name)
    generation = apps.read_namespaced_stateful_set(name, ns).metadata.generation
    proxy, via_proxy = through_proxy(kube_cluster, response_dropping_proxy, ns)

    @flow
    def resize() -> MemoryLimitResult:
        return raise_memory_limit("statefulset", name, ns, "main", "1536Mi", settings=via_proxy)

    state = resize(return_state=True)
    result = state.result()

    assert len(proxy.dropped) == 1
    assert proxy.count("PATCH") == 1
    assert task_runs(state.state_details.flow_run_id) == {
        f"plan-memory-limit-{ns}/statefulset-{name}-main": 1,
        f"apply-memory-limit-{ns}/statefulset-{name}-main": 2,
    }
    # The retry found the limit in place: changed (from the plan's 1Gi), not patched again.
    assert (result.before, result.after, result.changed, result.patched) == (
        "1Gi",
        "1536Mi",
        True,
        False,
    )
    assert _limit(apps, ns, name, "statefulset") == "1536Mi"
    assert apps.read_namespaced_stateful_set(name, ns).metadata.generation == generation + 1


# ---------------------------------------------------------------- DaemonSet restart


def test_daemonset_restart_is_the_same_restarted_at_write(kube_cluster, kube_namespace, apps):
    """The mechanism restarts any workload kind: a DaemonSet gets the same annotation."""
    ns, name = kube_namespace, "agent"
    body = deployment_body(name, replicas=1)
    body["kind"] = "DaemonSet"
    for key in ("replicas", "strategy"):
        del body["spec"][key]
    apps.create_namespaced_daemon_set(ns, body)
    with kube_session(kube_cluster.settings(ns)) as kube:
        ds = get_workload(kube, "daemonset", name, ns)
        value, previous = plan_restart_value("daemonset", ds, "2026-01-02T03:04:05Z")
        assert previous is None
        done = apply_restart_value(kube, "daemonset", name, ns, value, dry_run=False)
        assert done.patched and done.message == f"daemonset.apps/{name} restarted"
        again = apply_restart_value(kube, "daemonset", name, ns, value, dry_run=False)
    assert not again.patched and "nothing patched" in again.message
    ds = apps.read_namespaced_daemon_set(name, ns)
    assert ds.spec.template.metadata.annotations[RESTARTED_AT] == value
    assert ds.metadata.generation == done.generation == again.generation == 2
    assert ROLLOUT_FIELD_MANAGER in {m.manager for m in ds.metadata.managed_fields or []}
