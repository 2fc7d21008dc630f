"""deployments/k8s/ grants exactly what tasks.kubernetes needs: proven with a real SA token."""

from __future__ import annotations

import subprocess
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from tasks.clients import kube_api_client
from tasks.errors import PermanentError
from tasks.kubernetes import (
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
from tests.fixtures.kube import KubeCluster
from tests.integration.kube_helpers import (
    create_with_revisions,
    deployment_body,
    settled_pods,
    wait_until,
)

pytestmark = pytest.mark.kube

MANIFESTS = Path(__file__).resolve().parents[2] / "deployments" / "k8s"
SA = "incident-runbooks"


def load_manifests(namespace: str, suffix: str) -> list[dict[str, Any]]:
    """The shipped manifests, re-targeted at a test namespace (cluster-scoped names suffixed)."""
    docs: list[dict[str, Any]] = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") == "Kustomization":
                continue
            meta = doc["metadata"]
            if doc["kind"] in ("ClusterRole", "ClusterRoleBinding"):
                meta["name"] = f"{meta['name']}-{suffix}"
                if doc["kind"] == "ClusterRoleBinding":
                    doc["roleRef"]["name"] = f"{doc['roleRef']['name']}-{suffix}"
            else:
                meta["namespace"] = namespace
            for subject in doc.get("subjects", []):
                subject["namespace"] = namespace
            docs.append(doc)
    return docs


def apply(api: k8s.ApiClient, doc: dict[str, Any]) -> None:
    ns = doc["metadata"].get("namespace")
    kind = doc["kind"]
    core: Any = k8s.CoreV1Api(api)
    rbac: Any = k8s.RbacAuthorizationV1Api(api)
    if kind == "ServiceAccount":
        core.create_namespaced_service_account(ns, doc)
    elif kind == "Role":
        rbac.create_namespaced_role(ns, doc)
    elif kind == "RoleBinding":
        rbac.create_namespaced_role_binding(ns, doc)
    elif kind == "ClusterRole":
        rbac.create_cluster_role(doc)
    elif kind == "ClusterRoleBinding":
        rbac.create_cluster_role_binding(doc)
    else:
        raise AssertionError(f"unexpected kind {kind} in deployments/k8s")


def forbidden(call) -> bool:
    try:
        call()
    except ApiException as exc:
        return bool(exc.status == 403)
    except PermanentError as exc:
        return "forbidden" in str(exc)
    return False


def test_manifests_grant_exactly_what_the_tasks_need(kube_cluster: KubeCluster, kube_namespace):
    ns = kube_namespace
    suffix = uuid.uuid4().hex[:6]
    admin = kube_cluster.api()
    admin_settings = kube_cluster.settings(ns)
    apps: Any = k8s.AppsV1Api(admin)
    docs = load_manifests(ns, suffix)
    assert {d["kind"] for d in docs} == {
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ClusterRole",
        "ClusterRoleBinding",
    }
    cluster_scoped = [d for d in docs if d["kind"].startswith("Cluster")]
    for doc in docs:
        if doc not in cluster_scoped:
            apply(admin, doc)

    # A real ServiceAccount token (TokenRequest, signed by the apiserver's SA key).
    token_api: Any = k8s.CoreV1Api(admin)
    token = token_api.create_namespaced_service_account_token(
        SA,
        ns,
        k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec(audiences=[])),
    ).status.token
    sa_kubeconfig = kube_cluster.kubeconfig_for(token, f"sa-{ns}")
    sa = kube_cluster.settings(ns, kubeconfig=sa_kubeconfig)
    sa_api = kube_api_client(sa)

    create_with_revisions(apps, admin_settings, ns, "akig-backend", revisions=2, replicas=1)

    # Every namespaced task works with the Role alone.
    assert [r.revision for r in rollout_history.fn("akig-backend", ns, settings=sa).revisions] == [
        1,
        2,
    ]
    assert undo_rollout.fn("akig-backend", ns, settings=sa).outcome == "rolled back"
    assert wait_for_rollout.fn("akig-backend", ns, timeout_s=30, poll_s=0.1, settings=sa).complete
    assert restart_rollout.fn("akig-backend", ns, settings=sa).message.endswith("restarted")
    assert wait_for_rollout.fn("akig-backend", ns, timeout_s=30, poll_s=0.1, settings=sa).complete
    assert len(list_pods.fn(None, ns, settings=sa)) >= 1
    settled_pods(sa, ns, "component=akig-backend", 1)
    logs = tail_logs.fn("akig-backend", lines=5, namespace=ns, settings=sa)
    assert logs.logs
    assert all(p.error is None and len(p.lines) == 5 for p in logs.logs)
    assert list_events.fn(ns, settings=sa)
    assert scale.fn("akig-backend", 0, ns, settings=sa).replicas_after == 0

    # Nodes are cluster-scoped: refused until the separate ClusterRole is bound.
    with pytest.raises(PermanentError, match=r"forbidden: cannot list nodes \(RBAC\)"):
        node_status.fn(settings=sa)
    rbac: Any = k8s.RbacAuthorizationV1Api(admin)
    for doc in cluster_scoped:
        apply(admin, doc)
    try:
        nodes = wait_until(lambda: not forbidden(lambda: node_status.fn(settings=sa)), what="nodes")
        assert nodes
        assert [n.name for n in node_status.fn(settings=sa)] == ["fake-node"]

        # Beyond the grant: no deletes, creates, secrets, ReplicaSet edits, other namespaces.
        sa_apps: Any = k8s.AppsV1Api(sa_api)
        sa_core: Any = k8s.CoreV1Api(sa_api)
        assert forbidden(lambda: sa_apps.delete_namespaced_deployment("akig-backend", ns))
        assert forbidden(lambda: sa_core.list_namespaced_secret(ns))
        assert forbidden(lambda: sa_core.read_namespaced_secret("anything", ns))
        assert forbidden(lambda: sa_core.delete_collection_namespaced_pod(ns))
        assert forbidden(
            lambda: sa_apps.create_namespaced_deployment(ns, deployment_body("intruder"))
        )
        assert forbidden(
            lambda: sa_apps.patch_namespaced_replica_set(
                "any", ns, {"spec": {"replicas": 0}}, _content_type="application/merge-patch+json"
            )
        )
        assert forbidden(lambda: sa_core.delete_node("fake-node"))
        with pytest.raises(
            PermanentError, match=r"forbidden: cannot list pods in namespace default \(RBAC\)"
        ):
            list_pods.fn(None, "default", settings=sa)
        with pytest.raises(
            PermanentError, match=r"forbidden: cannot get deployments in namespace default \(RBAC\)"
        ):
            undo_rollout.fn("akig-backend", "default", settings=sa)

        # And nothing in the Role is superfluous: drop one rule, some task breaks.
        role = next(d for d in docs if d["kind"] == "Role")
        needs = {
            "deployments": lambda: rollout_history.fn("akig-backend", ns, settings=sa),
            "deployments/scale": lambda: scale.fn("akig-backend", 0, ns, settings=sa),
            "replicasets": lambda: rollout_history.fn("akig-backend", ns, settings=sa),
            "pods": lambda: list_pods.fn(None, ns, settings=sa),
            "pods/log": lambda: tail_logs.fn("akig-backend", lines=1, namespace=ns, settings=sa),
            "events": lambda: list_events.fn(ns, settings=sa),
        }
        apps.patch_namespaced_deployment_scale(
            "akig-backend",
            ns,
            {"spec": {"replicas": 1}},
            _content_type="application/merge-patch+json",
        )
        wait_for_rollout.fn("akig-backend", ns, timeout_s=30, poll_s=0.1, settings=admin_settings)
        assert {r["resources"][0] for r in role["rules"]} == set(needs)
        for i, rule in enumerate(role["rules"]):
            fewer = {**role, "rules": role["rules"][:i] + role["rules"][i + 1 :]}
            rbac.replace_namespaced_role(role["metadata"]["name"], ns, fewer)
            wait_until(partial(forbidden, needs[rule["resources"][0]]), timeout=10, what=rule)
        rbac.replace_namespaced_role(role["metadata"]["name"], ns, role)
        wait_until(lambda: not forbidden(needs["pods/log"]), timeout=10, what="restored role")
    finally:
        for doc in cluster_scoped:
            if doc["kind"] == "ClusterRoleBinding":
                rbac.delete_cluster_role_binding(doc["metadata"]["name"])
            else:
                rbac.delete_cluster_role(doc["metadata"]["name"])


def test_shipped_manifests_apply_with_kustomize_as_is(kube_cluster: KubeCluster, kubectl):
    """`kubectl apply -k deployments/k8s` works unmodified and binds the runbooks' identity."""
    out = subprocess.run(
        [str(kubectl), f"--kubeconfig={kube_cluster.kubeconfig}", "apply", "-k", str(MANIFESTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "role.rbac.authorization.k8s.io/incident-runbooks created" in out.stdout
    static = kube_cluster.settings(
        "default", kubeconfig=kube_cluster.kubeconfig_for(kube_cluster.runbooks_token, "static")
    )
    core: Any = k8s.CoreV1Api(kube_api_client(static))
    try:
        assert list_pods.fn(None, "default", settings=static) == []
        assert [n.name for n in node_status.fn(settings=static)] == ["fake-node"]
        assert forbidden(lambda: core.list_namespaced_secret("default"))
        assert forbidden(lambda: core.list_namespaced_pod("kube-system"))
    finally:
        subprocess.run(
            [
                str(kubectl),
                f"--kubeconfig={kube_cluster.kubeconfig}",
                "delete",
                "-k",
                str(MANIFESTS),
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
