"""The pool-size env-var write on the real API server: once on a lost answer, refused when the
entry moved since the plan, and its undo patch puts back exactly the previous entry."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client as k8s
from prefect import flow

from tasks.errors import SafetyViolation
from tasks.kubernetes.api import kube_session
from tasks.kubernetes.env import EnvChangeResult, apply_env_value, plan_env_value
from tasks.kubernetes.workload import ContainerFieldWrite, apply_container_field
from tests.fixtures.kube import KubeCluster
from tests.fixtures.prefect_runs import task_runs
from tests.integration.kube_helpers import deployment_body, status_settled, through_proxy

pytestmark = pytest.mark.kube
ENV = "DB_POOL_SIZE"


@pytest.fixture
def apps(kube_cluster: KubeCluster) -> Any:
    return k8s.AppsV1Api(kube_cluster.api())


def create(apps: Any, ns: str, name: str, entry: dict[str, Any] | None) -> None:
    body = deployment_body(name, replicas=1)
    if entry is not None:
        body["spec"]["template"]["spec"]["containers"][0]["env"].append(entry)
    apps.create_namespaced_deployment(ns, body)
    status_settled(apps.read_namespaced_deployment, ns, name)


def env_of(apps: Any, ns: str, name: str) -> list[dict[str, Any]]:
    dep = apps.read_namespaced_deployment(name, ns)
    entries = dep.spec.template.spec.containers[0].env or []
    return [k8s.ApiClient().sanitize_for_serialization(e) for e in entries]


def test_retried_env_write_lands_exactly_once(
    kube_cluster, kube_namespace, apps, prefect_api, response_dropping_proxy
):
    ns, name = kube_namespace, "env-once"
    create(apps, ns, name, {"name": ENV, "value": "4"})
    generation = apps.read_namespaced_deployment(name, ns).metadata.generation
    proxy, via_proxy = through_proxy(kube_cluster, response_dropping_proxy, ns)

    @flow
    def set_pool() -> EnvChangeResult:
        plan = plan_env_value(name, ns, "app", ENV, 6, 10, settings=via_proxy)
        return apply_env_value(plan, settings=via_proxy)

    state = set_pool(return_state=True)
    result = state.result()
    assert len(proxy.dropped) == 1
    assert proxy.count("PATCH") == 1
    assert task_runs(state.state_details.flow_run_id) == {
        f"plan-env-{ns}/{name}-{ENV}": 1,
        f"apply-env-{ns}/{name}-{ENV}": 2,
    }
    assert result.patched is False  # the retry found 6 in place
    assert {"name": ENV, "value": "6"} in env_of(apps, ns, name)
    assert apps.read_namespaced_deployment(name, ns).metadata.generation == generation + 1


def test_env_write_refuses_an_entry_changed_since_the_plan(kube_cluster, kube_namespace, apps):
    ns, name = kube_namespace, "env-moved"
    create(apps, ns, name, {"name": ENV, "value": "4"})
    admin = kube_cluster.settings(ns)
    plan = plan_env_value.fn(name, ns, "app", ENV, 6, 10, settings=admin)
    patch = {
        "spec": {
            "template": {
                "spec": {"containers": [{"name": "app", "env": [{"name": ENV, "value": "5"}]}]}
            }
        }
    }
    apps.patch_namespaced_deployment(name, ns, patch)
    with pytest.raises(SafetyViolation, match="changed since the plan"):
        apply_env_value.fn(plan, settings=admin)
    assert {"name": ENV, "value": "5"} in env_of(apps, ns, name)


def test_env_write_refuses_above_the_cap(kube_cluster, kube_namespace, apps):
    ns, name = kube_namespace, "env-cap"
    create(apps, ns, name, {"name": ENV, "value": "4"})
    admin = kube_cluster.settings(ns)
    with pytest.raises(SafetyViolation, match="above the cap of 10"):
        plan_env_value.fn(name, ns, "app", ENV, 11, 10, settings=admin)
    forged = plan_env_value.fn(name, ns, "app", ENV, 6, 10, settings=admin)
    forged = forged.model_construct(**(forged.model_dump() | {"target": 50}))
    with pytest.raises(SafetyViolation, match="above the cap"):
        apply_env_value.fn(forged, settings=admin)
    assert {"name": ENV, "value": "4"} in env_of(apps, ns, name)


@pytest.mark.parametrize(
    "entry",
    [
        {"name": ENV, "value": "4"},
        None,
        {"name": ENV, "valueFrom": {"configMapKeyRef": {"key": "pool", "name": "backend"}}},
    ],
    ids=["literal", "unset", "configmap"],
)
def test_undo_puts_back_exactly_the_previous_entry(
    kube_cluster, kube_namespace, apps, entry: dict[str, Any] | None
):
    ns, name = kube_namespace, "env-undo"
    create(apps, ns, name, entry)
    original = env_of(apps, ns, name)
    admin = kube_cluster.settings(ns)
    plan = plan_env_value.fn(name, ns, "app", ENV, 7, 10, settings=admin)
    assert apply_env_value.fn(plan, settings=admin).patched
    changed = env_of(apps, ns, name)
    assert {"name": ENV, "value": "7"} in changed
    assert all(e.get("valueFrom") is None for e in changed if e["name"] == ENV)
    apps.patch_namespaced_deployment(
        name, ns, plan.undo_patch, _content_type="application/strategic-merge-patch+json"
    )
    assert env_of(apps, ns, name) == original


def _raced_write(
    apps: Any, ns: str, name: str, other: dict[str, Any]
) -> ContainerFieldWrite[dict[str, Any] | None]:
    """An env write (4 -> 6) whose first read is followed by another writer's `other` patch."""
    raced: list[bool] = []

    def read(container: k8s.V1Container) -> dict[str, Any] | None:
        entry = next((e for e in container.env or [] if e.name == ENV), None)
        if not raced:
            raced.append(True)
            apps.patch_namespaced_deployment(name, ns, other)  # between our GET and PATCH
        return None if entry is None else {"name": ENV, "value": entry.value}

    return ContainerFieldWrite(
        kind="deployment",
        name=name,
        namespace=ns,
        container="app",
        read=read,
        at_target=lambda now: now == {"name": ENV, "value": "6"},
        as_planned=lambda now: now == {"name": ENV, "value": "4"},
        moved=lambda now: f"{ENV} changed since the plan (4 -> {now}); nothing patched",
        fields={"env": [{"name": ENV, "value": "6"}]},
    )


def test_a_write_between_read_and_patch_is_a_conflict_then_decided_again(
    kube_cluster, kube_namespace, apps
):
    ns = kube_namespace
    with kube_session(kube_cluster.settings(ns)) as kube:
        # Another writer touched something else: the pinned patch gets 409, the re-read
        # finds the entry still as planned, the second patch lands and keeps their change.
        create(apps, ns, "raced-other", {"name": ENV, "value": "4"})
        other = {"metadata": {"annotations": {"someone": "else"}}}
        patched, before = apply_container_field(
            kube, _raced_write(apps, ns, "raced-other", other), dry_run=False
        )
        assert (patched, before) == (True, {"name": ENV, "value": "4"})
        dep = apps.read_namespaced_deployment("raced-other", ns)
        assert dep.metadata.annotations["someone"] == "else"
        assert {"name": ENV, "value": "6"} in env_of(apps, ns, "raced-other")

        # Another writer changed the entry itself: the pinned patch gets 409, the re-read
        # finds it moved, nothing is written over their value.
        create(apps, ns, "raced-entry", {"name": ENV, "value": "4"})
        entry = {"name": "app", "env": [{"name": ENV, "value": "5"}]}
        theirs = {"spec": {"template": {"spec": {"containers": [entry]}}}}
        with pytest.raises(SafetyViolation, match="changed since the plan"):
            apply_container_field(kube, _raced_write(apps, ns, "raced-entry", theirs), False)
        assert {"name": ENV, "value": "5"} in env_of(apps, ns, "raced-entry")
