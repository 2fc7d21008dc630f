"""A retried Kubernetes write never repeats or reverses a change (issue #8, items 1 and 7).

A real HTTPS proxy (tests/fixtures/faults.py) sits between the tasks and the real API
server. It forwards the first PATCH, so the API server applies it, then resets the client's
connection instead of answering: the task sees a transient error and Prefect's task engine
retries it. The Deployment must change exactly once. Other cases let another writer change
the Deployment just before our write lands, to prove the preconditions refuse.
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client as k8s
from prefect import flow

from tasks.errors import SafetyViolation
from tasks.kubernetes import (
    RESTARTED_AT,
    RestartResult,
    RollbackResult,
    ScaleResult,
    apply_rollback,
    plan_rollback,
    restart_rollout,
    scale,
    undo_rollout,
)
from tests.fixtures.kube import KubeCluster
from tests.fixtures.prefect_runs import task_runs
from tests.integration.kube_helpers import (
    IMAGE,
    create_with_revisions,
    deployment_body,
    replica_set_revisions,
    revision_of,
    rolled_out,
    set_image,
    through_proxy,
    wait_until,
)

pytestmark = pytest.mark.kube


@pytest.fixture
def apps(kube_cluster: KubeCluster) -> Any:
    return k8s.AppsV1Api(kube_cluster.api())


def _generation(apps: Any, ns: str, name: str) -> int:
    return int(apps.read_namespaced_deployment(name, ns).metadata.generation)


def test_retried_undo_rolls_back_exactly_once(
    kube_cluster, kube_namespace, apps, prefect_api, response_dropping_proxy
):
    ns, name = kube_namespace, "undo-once"
    admin = kube_cluster.settings(ns)
    create_with_revisions(apps, admin, ns, name, revisions=3, replicas=1)
    generation = _generation(apps, ns, name)
    proxy, via_proxy = through_proxy(kube_cluster, response_dropping_proxy, ns)

    @flow
    def rollback() -> RollbackResult:
        return undo_rollout(name, ns, settings=via_proxy)

    state = rollback(return_state=True)
    result = state.result()

    # The first PATCH landed and its answer was lost; the retry found revision 2's
    # template in place and sent nothing.
    assert len(proxy.dropped) == 1
    assert proxy.count("PATCH") == 1
    assert task_runs(state.state_details.flow_run_id) == {
        f"plan-rollback-{ns}/{name}": 1,
        f"apply-rollback-{ns}/{name}": 2,
    }
    assert result.outcome == "already rolled back"
    assert result.to_revision == 2
    assert _generation(apps, ns, name) == generation + 1
    wait_until(lambda: revision_of(apps, ns, name) == 4, what="revision 4")
    rolled_out(admin, ns, name)
    assert replica_set_revisions(apps, ns, name) == [
        (1, f"{IMAGE}:1"),
        (3, f"{IMAGE}:3"),
        (4, f"{IMAGE}:2"),
    ]

    # Why the target is resolved once: resolved again now, "the previous revision" is the
    # bad image :3, so a retry that re-resolves rolls the rollback back (the old code did).
    again = plan_rollback.fn(name, ns, settings=admin)
    assert (again.to_revision, again.images_after) == (3, [f"{IMAGE}:3"])


def test_retried_restart_restarts_exactly_once(
    kube_cluster, kube_namespace, apps, prefect_api, response_dropping_proxy
):
    ns, name = kube_namespace, "restart-once"
    admin = kube_cluster.settings(ns)
    apps.create_namespaced_deployment(ns, deployment_body(name, replicas=1))
    rolled_out(admin, ns, name)
    generation = _generation(apps, ns, name)
    proxy, via_proxy = through_proxy(kube_cluster, response_dropping_proxy, ns)

    @flow
    def restart() -> RestartResult:
        return restart_rollout(name, ns, settings=via_proxy)

    state = restart(return_state=True)
    result = state.result()

    assert len(proxy.dropped) == 1
    assert proxy.count("PATCH") == 1
    assert task_runs(state.state_details.flow_run_id) == {
        f"plan-restart-{ns}/{name}": 1,
        f"apply-restart-{ns}/{name}": 2,
    }
    assert result.patched is False
    dep = apps.read_namespaced_deployment(name, ns)
    assert dep.spec.template.metadata.annotations[RESTARTED_AT] == result.restarted_at
    assert dep.metadata.generation == generation + 1
    wait_until(lambda: revision_of(apps, ns, name) == 2, what="revision 2")
    rolled_out(admin, ns, name)
    assert [rev for rev, _ in replica_set_revisions(apps, ns, name)] == [1, 2]


def test_retried_scale_scales_exactly_once(
    kube_cluster, kube_namespace, apps, prefect_api, response_dropping_proxy
):
    ns, name = kube_namespace, "scale-once"
    admin = kube_cluster.settings(ns)
    apps.create_namespaced_deployment(ns, deployment_body(name, replicas=2))
    rolled_out(admin, ns, name)
    generation = _generation(apps, ns, name)
    proxy, via_proxy = through_proxy(kube_cluster, response_dropping_proxy, ns)

    @flow
    def isolate() -> ScaleResult:
        return scale(name, 0, ns, settings=via_proxy)

    state = isolate(return_state=True)
    result = state.result()

    assert proxy.count("PATCH") == 1
    assert task_runs(state.state_details.flow_run_id) == {f"scale-{name}-to-0": 2}
    assert result.changed is False
    assert result.message == f"deployment.apps/{name} already at 0 replicas; nothing written"
    assert apps.read_namespaced_deployment(name, ns).spec.replicas == 0
    assert _generation(apps, ns, name) == generation + 1


def test_scale_refuses_when_someone_else_scaled_first(
    kube_cluster, kube_namespace, apps, response_dropping_proxy
):
    ns, name = kube_namespace, "scale-race"
    admin = kube_cluster.settings(ns)
    apps.create_namespaced_deployment(ns, deployment_body(name, replicas=2))
    rolled_out(admin, ns, name)

    def someone_scales_to_3(method: str, path: str) -> None:
        if method == "PATCH":
            apps.patch_namespaced_deployment_scale(
                name, ns, {"spec": {"replicas": 3}}, _content_type="application/merge-patch+json"
            )

    proxy, via_proxy = through_proxy(
        kube_cluster, response_dropping_proxy, ns, drop_first=0, before_forward=someone_scales_to_3
    )
    with pytest.raises(SafetyViolation, match=r"scaled from 2 to 3 by someone else .*409"):
        scale.fn(name, 0, ns, settings=via_proxy)
    assert [status for method, _, status in proxy.forwarded if method == "PATCH"] == [409]
    assert apps.read_namespaced_deployment(name, ns).spec.replicas == 3


def test_scale_retries_the_precondition_after_unrelated_changes(
    kube_cluster, kube_namespace, apps, response_dropping_proxy
):
    ns, name = kube_namespace, "scale-churn"
    admin = kube_cluster.settings(ns)
    apps.create_namespaced_deployment(ns, deployment_body(name, replicas=2))
    rolled_out(admin, ns, name)
    touched: list[str] = []

    def someone_annotates_once(method: str, path: str) -> None:
        # A write that moves resourceVersion but not replicas (a label, a status update).
        if method == "PATCH" and not touched:
            touched.append(path)
            apps.patch_namespaced_deployment(
                name,
                ns,
                {"metadata": {"annotations": {"team": "payments"}}},
                _content_type="application/merge-patch+json",
            )

    proxy, via_proxy = through_proxy(
        kube_cluster,
        response_dropping_proxy,
        ns,
        drop_first=0,
        before_forward=someone_annotates_once,
    )
    result = scale.fn(name, 1, ns, settings=via_proxy)
    statuses = [status for method, _, status in proxy.forwarded if method == "PATCH"]
    assert statuses[0] == 409  # the annotation moved resourceVersion: refused as written
    assert statuses[-1] == 200  # re-read, replicas unchanged: written with the fresh one
    assert (result.replicas_before, result.replicas_after, result.changed) == (2, 1, True)
    assert apps.read_namespaced_deployment(name, ns).spec.replicas == 1


def test_undo_refuses_when_the_deployment_changed_after_the_plan(
    kube_cluster, kube_namespace, apps, response_dropping_proxy
):
    ns, name = kube_namespace, "undo-race"
    admin = kube_cluster.settings(ns)
    create_with_revisions(apps, admin, ns, name, revisions=2, replicas=1)

    def someone_deploys(method: str, path: str) -> None:
        if method == "PATCH":
            set_image(apps, ns, name, f"{IMAGE}:9")

    proxy, via_proxy = through_proxy(
        kube_cluster, response_dropping_proxy, ns, drop_first=0, before_forward=someone_deploys
    )
    with pytest.raises(SafetyViolation, match=r"changed since the rollback was planned"):
        undo_rollout.fn(name, ns, settings=via_proxy)
    # The JSON patch's generation `test` failed on the server: nothing of ours was written.
    assert [status for method, _, status in proxy.forwarded if method == "PATCH"] == [422]
    dep = apps.read_namespaced_deployment(name, ns)
    assert dep.spec.template.spec.containers[0].image == f"{IMAGE}:9"


def test_apply_refuses_a_plan_older_than_the_spec(kube_cluster, kube_namespace, apps):
    ns, name = kube_namespace, "stale-plan"
    admin = kube_cluster.settings(ns)
    create_with_revisions(apps, admin, ns, name, revisions=2, replicas=1)
    plan = plan_rollback.fn(name, ns, settings=admin)
    set_image(apps, ns, name, f"{IMAGE}:7")
    generation = _generation(apps, ns, name)

    with pytest.raises(SafetyViolation, match=r"generation \d+ -> \d+\); nothing patched"):
        apply_rollback.fn(plan, settings=admin)
    assert _generation(apps, ns, name) == generation
