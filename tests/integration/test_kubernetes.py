"""tasks.kubernetes against a real kube-apiserver + controller-manager (tests/fixtures/kube.py)."""

from __future__ import annotations

import re
import socket
import threading
from typing import Any

import pytest
from kubernetes import client as k8s

from tasks.errors import PermanentError, SafetyViolation, TransientError
from tasks.kubernetes import (
    RESTARTED_AT,
    REVISION,
    EventInfo,
    list_events,
    list_pods,
    node_status,
    restart_rollout,
    rollout_history,
    scale,
    tail_logs,
    undo_rollout,
    wait_for_rollout,
)
from tasks.settings import KubernetesSettings
from tests.fixtures.kube import NODE_NAME, KubeCluster
from tests.fixtures.prefect_runs import task_runs
from tests.integration.kube_helpers import (
    IMAGE,
    create_with_revisions,
    deployment_body,
    replica_set_revisions,
    revision_of,
    rolled_out,
    settled_pods,
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


def image(apps: Any, ns: str, name: str) -> str:
    return str(apps.read_namespaced_deployment(name, ns).spec.template.spec.containers[0].image)


def test_undo_rollout_like_kubectl(kube_cluster, kube_namespace, apps):
    ns, name = kube_namespace, "web"
    settings = kube_cluster.settings(ns)
    create_with_revisions(apps, settings, ns, name, revisions=3)

    history = rollout_history.fn(name, ns, settings=settings)
    assert [(r.revision, r.images, r.change_cause) for r in history.revisions] == [
        (1, [f"{IMAGE}:1"], "v1"),
        (2, [f"{IMAGE}:2"], "v2"),
        (3, [f"{IMAGE}:3"], "v3"),
    ]
    assert [r.current for r in history.revisions] == [False, False, True]
    assert history.current_revision == 3

    # Undo to the previous revision: template and change-cause come back from revision 2.
    result = undo_rollout.fn(name, ns, settings=settings)
    assert result.outcome == "rolled back"
    assert result.message == f"deployment.apps/{name} rolled back"
    assert (result.from_revision, result.to_revision) == (3, 2)
    assert (result.images_before, result.images_after) == ([f"{IMAGE}:3"], [f"{IMAGE}:2"])
    assert image(apps, ns, name) == f"{IMAGE}:2"
    dep = apps.read_namespaced_deployment(name, ns)
    assert dep.metadata.annotations["kubernetes.io/change-cause"] == "v2"
    assert "pod-template-hash" not in dep.spec.template.metadata.labels
    wait_until(lambda: revision_of(apps, ns, name) == 4, what="revision 4")
    rolled_out(settings, ns, name)
    # The controller re-used revision 2's ReplicaSet and gave it revision 4.
    assert replica_set_revisions(apps, ns, name) == [
        (1, f"{IMAGE}:1"),
        (3, f"{IMAGE}:3"),
        (4, f"{IMAGE}:2"),
    ]

    # Undo to a given revision.
    result = undo_rollout.fn(name, ns, to_revision=1, settings=settings)
    assert (result.to_revision, result.images_after) == (1, [f"{IMAGE}:1"])
    wait_until(lambda: revision_of(apps, ns, name) == 5, what="revision 5")
    rolled_out(settings, ns, name)
    assert image(apps, ns, name) == f"{IMAGE}:1"
    pods = settled_pods(settings, ns, f"component={name}", 2)
    assert [(p.ready, p.phase, p.node) for p in pods] == [(True, "Running", NODE_NAME)] * 2

    # Undo to the revision already running: kubectl's "skipped rollback", nothing patched.
    generation = apps.read_namespaced_deployment(name, ns).metadata.generation
    result = undo_rollout.fn(name, ns, to_revision=5, settings=settings)
    assert result.outcome == "skipped rollback"
    assert result.message == (
        f"deployment.apps/{name} skipped rollback (current template already matches revision 5)"
    )
    assert apps.read_namespaced_deployment(name, ns).metadata.generation == generation

    # A revision that does not exist (4 was consumed, 2 became 4).
    with pytest.raises(PermanentError, match=r"^unable to find specified revision 2 in history$"):
        undo_rollout.fn(name, ns, to_revision=2, settings=settings)
    with pytest.raises(PermanentError, match="unable to find specified revision 99 in history"):
        undo_rollout.fn(name, ns, to_revision=99, settings=settings)
    assert apps.read_namespaced_deployment(name, ns).metadata.generation == generation


def test_undo_refusals(kube_cluster, kube_namespace, apps):
    ns = kube_namespace
    settings = kube_cluster.settings(ns)
    apps.create_namespaced_deployment(ns, deployment_body("single", replicas=1))
    wait_until(lambda: revision_of(apps, ns, "single") == 1, what="revision 1")
    with pytest.raises(PermanentError, match=r'^no rollout history found for deployment "single"$'):
        undo_rollout.fn("single", ns, settings=settings)
    with pytest.raises(PermanentError, match=f"^deployment nope not found in namespace {ns}$"):
        undo_rollout.fn("nope", ns, settings=settings)
    with pytest.raises(PermanentError, match="unable to find specified revision -1"):
        undo_rollout.fn("single", ns, to_revision=-1, settings=settings)

    # Paused: refused before anything is patched, with kubectl's wording.
    create_with_revisions(apps, settings, ns, "paused", revisions=2, replicas=1)
    apps.patch_namespaced_deployment(
        "paused", ns, {"spec": {"paused": True}}, _content_type="application/merge-patch+json"
    )
    generation = apps.read_namespaced_deployment("paused", ns).metadata.generation
    with pytest.raises(SafetyViolation) as refused:
        undo_rollout.fn("paused", ns, settings=settings)
    assert str(refused.value) == (
        "you cannot rollback a paused deployment; resume it first with "
        "'kubectl rollout resume' and try again"
    )
    with pytest.raises(SafetyViolation, match=r"can't restart paused deployment"):
        restart_rollout.fn("paused", ns, settings=settings)
    dep = apps.read_namespaced_deployment("paused", ns)
    assert dep.metadata.generation == generation
    assert dep.spec.template.spec.containers[0].image == f"{IMAGE}:2"


def test_undo_dry_run_changes_nothing(kube_cluster, kube_namespace, apps):
    ns = kube_namespace
    settings = kube_cluster.settings(ns)
    create_with_revisions(apps, settings, ns, "dry", revisions=2, replicas=1)
    generation = apps.read_namespaced_deployment("dry", ns).metadata.generation
    result = undo_rollout.fn("dry", ns, dry_run=True, settings=settings)
    assert result.outcome == "dry run"
    assert result.images_after == [f"{IMAGE}:1"]
    assert [(op["op"], op["path"]) for op in result.patch] == [
        ("test", "/metadata/generation"),
        ("replace", "/spec/template"),
        ("replace", "/metadata/annotations"),
    ]
    dep = apps.read_namespaced_deployment("dry", ns)
    assert dep.metadata.generation == generation
    assert dep.spec.template.spec.containers[0].image == f"{IMAGE}:2"


def test_restart_then_wait_until_ready(kube_cluster, kube_namespace, apps):
    ns = kube_namespace
    settings = kube_cluster.settings(ns)
    apps.create_namespaced_deployment(ns, deployment_body("api", replicas=3))
    rolled_out(settings, ns, "api")
    before = {p.name for p in settled_pods(settings, ns, "component=api", 3)}

    result = restart_rollout.fn("api", ns, settings=settings)
    assert result.message == "deployment.apps/api restarted"
    assert result.patched
    dep = apps.read_namespaced_deployment("api", ns)
    assert dep.spec.template.metadata.annotations[RESTARTED_AT] == result.restarted_at
    assert result.restarted_at.endswith("Z")
    managers = {m.manager for m in dep.metadata.managed_fields or []}
    assert "kubectl-rollout" in managers

    status = wait_for_rollout.fn("api", ns, timeout_s=30, poll_s=0.1, settings=settings)
    assert status.complete
    assert status.message == 'deployment "api" successfully rolled out'
    assert status.revision == 2
    assert status.updated_replicas == 3
    assert status.available_replicas == 3
    after = {p.name for p in settled_pods(settings, ns, "component=api", 3)}
    assert after & before == set(), "every pod was replaced"


def test_wait_fails_on_progress_deadline_and_times_out(
    kube_cluster, kube_namespace, apps, response_dropping_proxy
):
    ns = kube_namespace
    settings = kube_cluster.settings(ns)
    stuck = deployment_body(
        "stuck", replicas=1, template_annotations={"fake-kubelet/ready": "false"}
    )
    stuck["spec"]["progressDeadlineSeconds"] = 1
    apps.create_namespaced_deployment(ns, stuck)
    with pytest.raises(PermanentError, match='deployment "stuck" exceeded its progress deadline'):
        wait_for_rollout.fn("stuck", ns, timeout_s=30, poll_s=0.2, settings=settings)

    slow = deployment_body("slow", replicas=1, template_annotations={"fake-kubelet/ready": "false"})
    apps.create_namespaced_deployment(ns, slow)
    proxy, counted = through_proxy(kube_cluster, response_dropping_proxy, ns, drop_first=0)
    with pytest.raises(PermanentError, match=r"timed out after 1\.5 s .*slow.*last status: Wait"):
        wait_for_rollout.fn("slow", ns, timeout_s=1.5, poll_s=0.2, settings=counted)
    # It polled at its interval, then gave up: at most timeout / poll + the first and last.
    polls = proxy.count("GET")
    assert polls >= 2
    assert polls <= 1.5 / 0.2 + 2
    assert apps.read_namespaced_deployment("slow", ns).status.available_replicas is None


def test_tail_logs_through_pods_log(kube_cluster, kube_namespace, apps):
    ns = kube_namespace
    settings = kube_cluster.settings(ns)
    lines = [f"{i} INFO request ok {{pod}}" for i in range(1, 9)]
    lines[5] = "6 ERROR payment declined {pod}"
    lines[7] = "8 ERROR db timeout {pod}"
    apps.create_namespaced_deployment(
        ns,
        deployment_body(
            "logs", replicas=2, template_annotations={"fake-kubelet/logs": "\n".join(lines)}
        ),
    )
    rolled_out(settings, ns, "logs")
    kube_cluster.kubelet.log_requests.clear()

    result = tail_logs.fn("logs", lines=3, namespace=ns, settings=settings)
    assert len(result.logs) == 2
    assert [p.error for p in result.logs] == [None, None]
    for pod_logs in result.logs:
        assert pod_logs.lines == [
            f"6 ERROR payment declined {pod_logs.pod}",
            f"7 INFO request ok {pod_logs.pod}",
            f"8 ERROR db timeout {pod_logs.pod}",
        ]
    # The apiserver proxied to our kubelet, passing tailLines along.
    assert len(kube_cluster.kubelet.log_requests) == 2
    assert all("tailLines=3" in r for r in kube_cluster.kubelet.log_requests)

    grepped = tail_logs.fn(
        "logs", lines=100, grep=r"ERROR (payment|card)", namespace=ns, settings=settings
    )
    assert [len(p.lines) for p in grepped.logs] == [1, 1]
    assert [line.startswith("[pod/logs-") for line in grepped.all_lines] == [True, True]
    assert ["payment declined" in line for line in grepped.all_lines] == [True, True]
    with pytest.raises(PermanentError, match="invalid grep pattern"):
        tail_logs.fn("logs", grep="(", namespace=ns, settings=settings)
    with pytest.raises(PermanentError, match=f"deployment missing not found in namespace {ns}"):
        tail_logs.fn("missing", namespace=ns, settings=settings)


def test_events_pods_nodes(kube_cluster, kube_namespace, apps):
    ns = kube_namespace
    settings = kube_cluster.settings(ns)
    apps.create_namespaced_deployment(
        ns, deployment_body("ev", replicas=2, template_annotations={"fake-kubelet/restarts": "4"})
    )
    rolled_out(settings, ns, "ev")
    # Events are recorded asynchronously: wait for the deployment's and the ReplicaSet's.
    expected = {"ScalingReplicaSet", "SuccessfulCreate"}

    def both_recorded() -> list[EventInfo] | None:
        evs = list_events.fn(ns, settings=settings)
        return evs if expected <= {e.reason for e in evs} else None

    events = wait_until(both_recorded, what=f"{expected} events")
    times = [e.last_seen for e in events]
    assert times == sorted(times)
    only_deployment = list_events.fn(ns, object_name="ev", settings=settings)
    assert {e.kind for e in only_deployment} == {"Deployment"}

    pods = list_pods.fn("component=ev", ns, settings=settings)
    assert [(p.restarts, p.ready, p.node, p.ready_containers, p.containers) for p in pods] == [
        (4, True, NODE_NAME, 1, 1)
    ] * 2
    assert list_pods.fn("component=none", ns, settings=settings) == []

    nodes = node_status.fn(settings=settings)
    assert [(n.name, n.ready, n.unschedulable, n.problems) for n in nodes] == [
        (NODE_NAME, True, False, [])
    ]


def test_scale_isolates_and_guards(kube_cluster, kube_namespace, apps):
    ns = kube_namespace
    settings = kube_cluster.settings(ns)
    apps.create_namespaced_deployment(ns, deployment_body("iso", replicas=2))
    rolled_out(settings, ns, "iso")

    result = scale.fn("iso", 0, ns, settings=settings)
    assert (result.replicas_before, result.replicas_after, result.changed) == (2, 0, True)
    generation = apps.read_namespaced_deployment("iso", ns).metadata.generation
    again = scale.fn("iso", 0, ns, settings=settings)
    assert (again.replicas_before, again.changed) == (0, False)
    assert apps.read_namespaced_deployment("iso", ns).metadata.generation == generation
    wait_until(lambda: not list_pods.fn("component=iso", ns, settings=settings), what="no pods")
    assert wait_for_rollout.fn("iso", ns, timeout_s=10, poll_s=0.1, settings=settings).complete

    dry = scale.fn("iso", 1, dry_run=True, settings=settings)  # namespace from settings
    assert (dry.replicas_before, dry.replicas_after) == (0, 0)
    assert apps.read_namespaced_deployment("iso", ns).spec.replicas == 0

    with pytest.raises(SafetyViolation, match="cap is 20"):
        scale.fn("iso", 50, ns, settings=settings)
    with pytest.raises(SafetyViolation):
        scale.fn("iso", -1, ns, settings=settings)
    foreign = deployment_body("other", replicas=1, labels={"app": "billing"})
    apps.create_namespaced_deployment(ns, foreign)
    with pytest.raises(SafetyViolation, match="do not match the platform selector 'app=akig'"):
        scale.fn("other", 0, ns, settings=settings)
    assert apps.read_namespaced_deployment("other", ns).spec.replicas == 1
    with pytest.raises(PermanentError, match=f"deployment ghost not found in namespace {ns}"):
        scale.fn("ghost", 0, ns, settings=settings)


# --- unreachable API, through Prefect's task engine (retries) --------------------------------


class DeafServer:
    """Accepts TCP connections and never answers; counts them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(50)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for c in self.accepted:
            c.close()


def test_unreachable_api_is_retried_then_fails_clearly(kube_cluster, prefect_api, tmp_path):
    from prefect import flow

    deaf = DeafServer()
    refused_port = DeafServer()
    refused_port.close()  # nothing listens there any more: connection refused
    try:
        for port, expect in (
            (deaf.port, "ReadTimeoutError|TimeoutError"),
            (refused_port.port, "NewConnection|Refused"),
        ):
            kubeconfig = tmp_path / f"k{port}"
            text = kube_cluster.kubeconfig.read_text().replace(
                kube_cluster.server, f"https://127.0.0.1:{port}"
            )
            kubeconfig.write_text(text)
            unreachable = kube_cluster.settings(
                "default", kubeconfig=kubeconfig, request_timeout_s=0.3
            )

            @flow
            def restart_flow(settings: KubernetesSettings = unreachable) -> None:
                restart_rollout("akig-backend", "default", settings=settings)

            before = len(deaf.accepted)
            state = restart_flow(return_state=True)
            with pytest.raises(TransientError) as failed:
                state.result()
            message = str(failed.value)
            assert "unreachable while trying to get deployments akig-backend" in message
            assert f"127.0.0.1:{port}" in message
            assert re.search(expect, message), message
            # RUNBOOKS_RETRY_ATTEMPTS=2 in conftest: 1 try + 2 retries of the read step, and
            # the write step never ran.
            assert task_runs(state.state_details.flow_run_id) == {
                "plan-restart-default/akig-backend": 3
            }
            if port == deaf.port:
                assert len(deaf.accepted) - before == 3
    finally:
        deaf.close()


def test_tasks_run_inside_a_flow(kube_cluster, kube_namespace, apps, prefect_api):
    from prefect import flow

    ns = kube_namespace
    settings = kube_cluster.settings(ns)
    create_with_revisions(apps, settings, ns, "flowy", revisions=2, replicas=1)

    @flow
    def rollback_and_verify() -> tuple[str, bool]:
        undone = undo_rollout("flowy", ns, settings=settings)
        status = wait_for_rollout("flowy", ns, timeout_s=30, poll_s=0.1, settings=settings)
        return undone.outcome, status.complete

    assert rollback_and_verify() == ("rolled back", True)
    assert image(apps, ns, "flowy") == f"{IMAGE}:1"
    assert revision_of(apps, ns, "flowy") == 3
    assert (apps.read_namespaced_deployment("flowy", ns).metadata.annotations or {})[
        REVISION
    ] == "3"
