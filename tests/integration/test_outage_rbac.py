"""system-outage's grants, proven with a real ServiceAccount token (as
tests/integration/test_kubernetes_rbac.py does for the others): the cascade's cluster-wide
reads and the two restarts are allowed, everything around them refused, and dropping any
one rule breaks the call that needs it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest
from kubernetes import client as k8s

from tasks.clients import kube_api_client
from tasks.errors import PermanentError
from tasks.kubernetes import node_status, restart_rollout, scale, undo_rollout, wait_for_rollout
from tests.integration.kube_helpers import deployment_body, wait_until
from tests.integration.test_kubernetes_rbac import (
    Cluster,
    forbidden,
    rbac_cluster,
    role,
    without_each_rule_something_breaks,
)

__all__ = ["rbac_cluster"]  # the fixture, shared with the other RBAC tests

pytestmark = pytest.mark.kube


@pytest.fixture
def outage_grants(rbac_cluster: Cluster) -> Iterator[Cluster]:
    """The shipped manifests, with system-outage's ClusterRole and binding applied too."""
    with rbac_cluster.cluster_grants("system-outage"):
        yield rbac_cluster


def test_system_outage_grants(outage_grants: Cluster) -> None:
    c, ns, ingress = outage_grants, outage_grants.platform, outage_grants.ingress
    apps: Any = k8s.AppsV1Api(c.admin)
    for name in ("akig-backend", "akig-frontend", "akig-intruder"):
        apps.create_namespaced_deployment(ns, deployment_body(name, replicas=1))
    apps.create_namespaced_deployment(
        ingress, deployment_body("ingress-nginx-controller", replicas=1)
    )
    apps.create_namespaced_deployment(ingress, deployment_body("other-controller", replicas=1))
    sa = c.token_settings("system-outage")
    sa_api = kube_api_client(sa)
    sa_apps: Any = k8s.AppsV1Api(sa_api)
    sa_core: Any = k8s.CoreV1Api(sa_api)
    wait_until(lambda: not forbidden(lambda: node_status.fn(settings=sa)), what="the binding")

    # The cascade's reads: Nodes, pods and events of every namespace, the ingress Deployment.
    assert [n.name for n in node_status.fn(settings=sa)] == ["fake-node"]
    pods = sa_core.list_pod_for_all_namespaces().items
    assert {p.metadata.namespace for p in pods} >= {ns, ingress}
    sa_core.list_event_for_all_namespaces()
    assert sa_apps.read_namespaced_deployment("ingress-nginx-controller", ingress)
    # The recovery: both restarts and their rollouts, with the token alone.
    for name in ("akig-backend", "akig-frontend"):
        assert restart_rollout.fn(name, ns, settings=sa).patched
        assert wait_for_rollout.fn(name, ns, timeout_s=30, poll_s=0.1, settings=sa).complete

    # Around it, refused: another Deployment, other writes, Secrets, the other controller.
    generation = apps.read_namespaced_deployment("akig-intruder", ns).metadata.generation
    with pytest.raises(PermanentError, match=r"forbidden: cannot get deployments"):
        restart_rollout.fn("akig-intruder", ns, settings=sa)
    assert apps.read_namespaced_deployment("akig-intruder", ns).metadata.generation == generation
    refused: list[Callable[[], Any]] = [
        lambda: undo_rollout.fn("akig-backend", ns, settings=sa),  # needs replicasets
        lambda: scale.fn("akig-backend", 0, ns, settings=sa),
        lambda: sa_apps.delete_namespaced_deployment("akig-backend", ns),
        lambda: sa_apps.list_namespaced_deployment(ns),
        lambda: sa_apps.read_namespaced_deployment("other-controller", ingress),
        lambda: sa_apps.patch_namespaced_deployment(
            "ingress-nginx-controller", ingress, {"metadata": {"labels": {"x": "y"}}}
        ),
        lambda: sa_core.list_secret_for_all_namespaces(),
        lambda: sa_core.list_namespaced_secret(ns),
        lambda: sa_core.delete_collection_namespaced_pod(ns),
        lambda: sa_core.read_namespaced_pod_log("any", ns),
        lambda: sa_core.delete_node("fake-node"),
        lambda: sa_core.patch_node_status("fake-node", {"status": {}}),
    ]
    for call in refused:
        assert forbidden(call)

    # Every rule is needed: the namespaced Roles here, the ClusterRole's rules below.
    platform_role = role(c.docs, "system-outage")
    assert [(r["resources"], r["verbs"]) for r in platform_role["rules"]] == [
        (["deployments"], ["get", "patch"])
    ]
    without_each_rule_something_breaks(
        c.admin,
        platform_role,
        [lambda: restart_rollout.fn("akig-backend", ns, dry_run=True, settings=sa)],
    )
    without_each_rule_something_breaks(
        c.admin,
        role(c.docs, "system-outage-ingress"),
        [lambda: sa_apps.read_namespaced_deployment("ingress-nginx-controller", ingress)],
    )
    (cluster_role,) = [
        d
        for d in c.cluster_scoped
        if d["kind"] == "ClusterRole" and "system-outage" in d["metadata"]["name"]
    ]
    assert [r["resources"][0] for r in cluster_role["rules"]] == ["nodes", "pods", "events"]
    needs: list[Callable[[], Any]] = [
        lambda: node_status.fn(settings=sa),
        lambda: sa_core.list_pod_for_all_namespaces(),
        lambda: sa_core.list_event_for_all_namespaces(),
    ]
    rbac: Any = k8s.RbacAuthorizationV1Api(c.admin)
    name = cluster_role["metadata"]["name"]
    for i, rule in enumerate(cluster_role["rules"]):
        fewer = {
            **cluster_role,
            "rules": cluster_role["rules"][:i] + cluster_role["rules"][i + 1 :],
        }
        rbac.replace_cluster_role(name, fewer)
        wait_until(partial(forbidden, needs[i]), timeout=10, what=f"{name} without {rule}")
    rbac.replace_cluster_role(name, cluster_role)
