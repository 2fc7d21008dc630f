"""security-breach's grants, proven with a real ServiceAccount token (as
tests/integration/test_kubernetes_rbac.py does for the others): isolation with cordon and its
undo, the rotation of a named Secret with its backup and the restart of its user, and the
evidence reads are allowed; other Secrets, other Deployments, deletes, scaling and other
namespaces are refused; dropping any one rule breaks the call that needs it."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from tasks.clients import kube_api_client
from tasks.errors import SafetyViolation, TransientError
from tasks.kubernetes import restart_rollout, scale
from tasks.kubernetes.netpol import apply_isolation, plan_isolation, undo_isolation
from tasks.kubernetes.secret_rotation import apply_rotation, plan_rotation
from tasks.security.assess import image_drift, recent_secret_changes
from tasks.security.evidence import capture_evidence, verify_bundle
from tasks.settings import KubernetesSettings, SecuritySettings
from tests.integration.kube_helpers import deployment_body, settled_pods, wait_until
from tests.integration.test_kubernetes_rbac import (
    Cluster,
    forbidden,
    rbac_cluster,
    role,
    without_each_rule_something_breaks,
)

__all__ = ["rbac_cluster"]  # the fixture, shared with the other RBAC tests

pytestmark = pytest.mark.kube

METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"


@pytest.fixture
def breach_grants(rbac_cluster: Cluster) -> Iterator[Cluster]:
    """The shipped manifests, with security-breach's ClusterRole and binding applied too."""
    with rbac_cluster.cluster_grants("security-breach"):
        yield rbac_cluster


def _secret(name: str) -> dict[str, Any]:
    value = base64.b64encode(b"pw-" + name.encode()).decode()
    return {"metadata": {"name": name}, "type": "Opaque", "data": {"password": value}}


def _list_secret_metadata(api: k8s.ApiClient, ns: str) -> Any:
    """The Secrets of `ns` as metadata only (how the assessment lists them)."""
    core: Any = k8s.CoreV1Api(api)
    resp = core.list_namespaced_secret(
        ns, _headers={"Accept": METADATA_ONLY}, _preload_content=False
    )
    return json.loads(resp.data)


def _plan_when_a_second_passed(incident: str, ns: str, sa: KubernetesSettings) -> Any:
    # A restart in the same second as the last one would be an empty patch: the plan is a
    # read and says so (TransientError, retried by Prefect; here by hand).
    try:
        return plan_rotation.fn(incident, ["akig-db-credentials"], ns, kube=sa)
    except TransientError:
        return None


def test_security_breach_grants(breach_grants: Cluster, tmp_path: Path) -> None:
    c, ns, ingress = breach_grants, breach_grants.platform, breach_grants.ingress
    admin_settings = c.kube.settings(ns)
    apps: Any = k8s.AppsV1Api(c.admin)
    core: Any = k8s.CoreV1Api(c.admin)
    backend = deployment_body("akig-backend", replicas=1)
    backend["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {
            "name": "DB_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": "akig-db-credentials", "key": "password"}},
        }
    )
    apps.create_namespaced_deployment(ns, backend)
    apps.create_namespaced_deployment(ns, deployment_body("akig-intruder", replicas=1))
    for name in ("akig-db-credentials", "akig-other-secret"):
        core.create_namespaced_secret(ns, _secret(name))
    (pod, _) = settled_pods(admin_settings, ns, "app=akig", 2)
    wait_until(lambda: core.read_namespaced_pod(pod.name, ns).spec.node_name, what="binding")
    sa = c.token_settings("security-breach")
    sa_api = kube_api_client(sa)
    sa_apps: Any = k8s.AppsV1Api(sa_api)
    sa_core: Any = k8s.CoreV1Api(sa_api)
    sa_net: Any = k8s.NetworkingV1Api(sa_api)
    wait_until(lambda: not forbidden(lambda: sa_core.list_namespaced_pod(ns)), what="binding")

    # The runbook's read-only steps first, with the token alone: evidence, assessments.
    security = SecuritySettings(evidence_dir=tmp_path)
    bundle = capture_evidence.fn("SEC-1", "app=akig", ns, settings=security, kube=sa)
    assert len(bundle.pods) == 2 and not [e for e in bundle.errors if "forbidden" in e]
    assert verify_bundle.fn(bundle.directory).ok
    assert len(image_drift.fn("app=akig", ns, kube=sa).containers) == 2
    assert {c.name for c in recent_secret_changes.fn(ns, kube=sa).changed} >= {
        "akig-db-credentials",
        "akig-other-secret",
    }

    # Isolate (with cordon) and undo, with the token alone.
    plan = plan_isolation.fn("SEC-1", "component=akig-intruder", ns, cordon=True, kube=sa)
    try:
        done = apply_isolation.fn(plan, kube=sa)
        assert done.created and done.cordoned == plan.nodes != []
    finally:
        undone = undo_isolation.fn("SEC-1", ns, kube=sa)
    assert undone == [f"networkpolicy/{plan.policy_name}", f"node/{plan.nodes[0]}"]
    # Rotate the named Secret: backup created, value updated, its user restarted.
    rotation = plan_rotation.fn("SEC-1", ["akig-db-credentials"], ns, kube=sa)
    assert [(r.kind, r.name) for r in rotation.restarts] == [("deployment", "akig-backend")]
    result = apply_rotation.fn(rotation, kube=sa)
    assert result.rotated == ["akig-db-credentials"] and result.restarts[0].patched
    assert core.read_namespaced_secret(rotation.secrets[0].backup_name, ns)
    # The evidence reads.
    assert sa_core.read_namespaced_pod_log(pod.name, ns) is not None
    sa_core.list_namespaced_event(ns)
    assert sa_apps.list_namespaced_replica_set(ns).items
    assert _list_secret_metadata(sa_api, ns)["kind"] == "PartialObjectMetadataList"

    # Around it, refused.
    with pytest.raises(Exception, match="forbidden"):
        plan_rotation.fn("SEC-1", ["akig-other-secret"], ns, kube=sa)
    generation = apps.read_namespaced_deployment("akig-intruder", ns).metadata.generation
    refused: list[Callable[[], Any]] = [
        lambda: restart_rollout.fn("akig-intruder", ns, settings=sa),
        lambda: scale.fn("akig-backend", 0, ns, settings=sa),
        lambda: sa_apps.delete_namespaced_deployment("akig-backend", ns),
        lambda: sa_core.read_namespaced_secret("akig-other-secret", ns),
        lambda: sa_core.replace_namespaced_secret(
            "akig-other-secret", ns, _secret("akig-other-secret")
        ),
        lambda: sa_core.delete_namespaced_secret("akig-db-credentials", ns),
        lambda: sa_core.delete_namespaced_secret(rotation.secrets[0].backup_name, ns),
        lambda: sa_core.delete_namespaced_pod(pod.name, ns),
        lambda: sa_core.connect_get_namespaced_pod_exec(pod.name, ns, command=["sh"]),
        lambda: sa_net.list_namespaced_network_policy(ingress),
        lambda: sa_net.create_namespaced_network_policy(
            ingress, {"metadata": {"name": "x"}, "spec": {"podSelector": {}}}
        ),
        lambda: sa_core.list_namespaced_secret(ingress),
        lambda: sa_core.delete_node(plan.nodes[0]),
    ]
    for call in refused:
        assert forbidden(call), call
    assert apps.read_namespaced_deployment("akig-intruder", ns).metadata.generation == generation
    # A backup already there cannot be checked with this Role: refused, nothing written.
    version = core.read_namespaced_secret("akig-db-credentials", ns).metadata.resource_version
    again = wait_until(partial(_plan_when_a_second_passed, "SEC-2", ns, sa), what="a plan")
    core.create_namespaced_secret(ns, _secret(again.secrets[0].backup_name))
    with pytest.raises(SafetyViolation, match="cannot be checked"):
        apply_rotation.fn(again, kube=sa)
    assert core.read_namespaced_secret("akig-db-credentials", ns).metadata.resource_version == (
        version
    )

    # Every rule is needed.
    the_role = role(c.docs, "security-breach")
    backup = _secret("akig-db-credentials-backup-probe")
    needs: list[Callable[[], Any]] = [
        lambda: sa_net.list_namespaced_network_policy(ns),
        lambda: sa_core.list_namespaced_pod(ns),
        lambda: sa_core.read_namespaced_pod_log(pod.name, ns),
        lambda: sa_core.list_namespaced_event(ns),
        lambda: sa_apps.list_namespaced_replica_set(ns),
        lambda: sa_apps.list_namespaced_deployment(ns),
        lambda: sa_apps.list_namespaced_stateful_set(ns),
        lambda: restart_rollout.fn("akig-backend", ns, dry_run=True, settings=sa),
        lambda: sa_core.read_namespaced_secret("akig-db-credentials", ns),
        lambda: sa_core.create_namespaced_secret(ns, backup, dry_run="All"),
        lambda: _list_secret_metadata(sa_api, ns),
    ]
    without_each_rule_something_breaks(c.admin, the_role, needs)
    (cluster_role,) = [
        d
        for d in c.cluster_scoped
        if d["kind"] == "ClusterRole" and d["metadata"]["name"].startswith("security-breach")
    ]
    rbac: Any = k8s.RbacAuthorizationV1Api(c.admin)
    name = cluster_role["metadata"]["name"]
    rbac.replace_cluster_role(name, {**cluster_role, "rules": []})
    wait_until(partial(forbidden, lambda: sa_core.list_node()), timeout=10, what="no nodes")
    rbac.replace_cluster_role(name, cluster_role)
