"""deployments/k8s/ grants each runbook exactly what it needs: proven with real SA tokens.

Every Role is applied as shipped (namespaces re-targeted at test namespaces), a real token
is requested for its ServiceAccount (TokenRequest, signed by the API server's SA key), and
the runbook's own task code runs with it: what it needs is allowed, everything around it
(other Deployments, other Secrets, other verbs, other namespaces) is refused, and dropping
any single rule breaks something (no rule is superfluous).
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Literal

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
    pod_restarts,
    raise_memory_limit,
    restart_rollout,
    restart_statefulset,
    rollout_history,
    scale,
    tail_logs,
    undo_rollout,
    wait_for_rollout,
    wait_for_statefulset,
)
from tasks.kubernetes.env import apply_env_value, plan_env_value
from tasks.kubernetes.metrics import pod_metrics
from tasks.performance import DURATION_GREP
from tasks.pool_sizing import PoolSizingSettings, read_backend_pool_now
from tasks.settings import KubernetesSettings
from tasks.tls import load_pair_from_secret, read_secret_certificates, write_tls_secret
from tests.fixtures.kube import KubeCluster
from tests.fixtures.tls import CertFactory, Issued
from tests.integration.kube_helpers import (
    create_with_revisions,
    deployment_body,
    settled_pods,
    statefulset_body,
    wait_until,
)

pytestmark = pytest.mark.kube

MANIFESTS = Path(__file__).resolve().parents[2] / "deployments" / "k8s"
PLATFORM, INGRESS = "default", "ingress-nginx"  # the namespaces the manifests are written for
ROLES = {
    "incident-runbooks",
    "cert-expiry",
    "cert-replace",
    "cert-replace-ingress",
    "cert-renew",  # tests/integration/test_acme_rbac.py
    "cert-renew-ingress",
    "db-pool-exhausted",
    "payment-failure",
    "system-outage",  # tests/integration/test_outage_rbac.py
    "system-outage-ingress",
    "performance-report",
    "security-breach",  # tests/integration/test_security_rbac.py
}


def load_manifests(namespaces: dict[str, str], suffix: str) -> list[dict[str, Any]]:
    """The shipped RBAC manifests (subfolders too), re-targeted at test namespaces."""
    docs: list[dict[str, Any]] = []
    for path in sorted(MANIFESTS.rglob("*.yaml")):
        if "receiver" in path.relative_to(MANIFESTS).parts:
            continue  # the receiver's workload, no grant: tests/integration/test_k8s_manifests.py
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") == "Kustomization":
                continue
            meta = doc["metadata"]
            if doc["kind"] in ("ClusterRole", "ClusterRoleBinding"):
                meta["name"] = f"{meta['name']}-{suffix}"
                if doc["kind"] == "ClusterRoleBinding":
                    doc["roleRef"]["name"] = f"{doc['roleRef']['name']}-{suffix}"
            else:
                meta["namespace"] = namespaces[meta["namespace"]]
            for subject in doc.get("subjects", []):
                subject["namespace"] = namespaces[subject["namespace"]]
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


def forbidden(call: Callable[[], Any]) -> bool:
    """True when the call was refused by RBAC (403), through our tasks or the raw client."""
    try:
        call()
    except ApiException as exc:
        return bool(exc.status == 403)
    except PermanentError as exc:
        return "forbidden" in str(exc) or "403" in str(exc)
    return False


def role(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == name)


def without_each_rule_something_breaks(
    admin: k8s.ApiClient, the_role: dict[str, Any], needs: list[Callable[[], Any]]
) -> None:
    """Remove each rule in turn: the call that needs it must become forbidden."""
    rbac: Any = k8s.RbacAuthorizationV1Api(admin)
    name, ns = the_role["metadata"]["name"], the_role["metadata"]["namespace"]
    assert len(needs) == len(the_role["rules"])
    for i, rule in enumerate(the_role["rules"]):
        fewer = {**the_role, "rules": the_role["rules"][:i] + the_role["rules"][i + 1 :]}
        rbac.replace_namespaced_role(name, ns, fewer)
        wait_until(partial(forbidden, needs[i]), timeout=10, what=f"{name} without {rule}")
    rbac.replace_namespaced_role(name, ns, the_role)


class Cluster:
    """The shipped RBAC applied to a platform and an ingress test namespace."""

    def __init__(self, kube: KubeCluster, platform: str, ingress: str) -> None:
        self.kube, self.platform, self.ingress = kube, platform, ingress
        self.admin = kube.api()
        self.suffix = uuid.uuid4().hex[:6]
        self.docs = load_manifests({PLATFORM: platform, INGRESS: ingress}, self.suffix)
        self.cluster_scoped = [d for d in self.docs if d["kind"].startswith("Cluster")]
        for doc in self.docs:
            if doc not in self.cluster_scoped:
                apply(self.admin, doc)

    def token_settings(self, service_account: str) -> KubernetesSettings:
        """Settings that authenticate with a fresh token of the ServiceAccount."""
        core: Any = k8s.CoreV1Api(self.admin)
        token = core.create_namespaced_service_account_token(
            service_account,
            self.platform,
            k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec(audiences=[])),
        ).status.token
        kubeconfig = self.kube.kubeconfig_for(token, f"{service_account}-{self.platform}")
        return self.kube.settings(self.platform, kubeconfig=kubeconfig)

    @contextmanager
    def cluster_grants(self, prefix: str = "") -> Iterator[None]:
        """The shipped ClusterRoles and bindings whose names start with `prefix`, applied
        for the block only (they are cluster-wide: other tests must not see them)."""
        mine = [d for d in self.cluster_scoped if d["metadata"]["name"].startswith(prefix)]
        for doc in mine:
            apply(self.admin, doc)
        rbac: Any = k8s.RbacAuthorizationV1Api(self.admin)
        try:
            yield
        finally:
            for doc in mine:
                if doc["kind"] == "ClusterRoleBinding":
                    rbac.delete_cluster_role_binding(doc["metadata"]["name"])
                else:
                    rbac.delete_cluster_role(doc["metadata"]["name"])


@pytest.fixture
def rbac_cluster(kube_cluster: KubeCluster, kube_namespace: str) -> Iterator[Cluster]:
    admin: Any = k8s.CoreV1Api(kube_cluster.api())
    ingress = f"ingress-{uuid.uuid4().hex[:6]}"
    admin.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=ingress)))
    cluster = Cluster(kube_cluster, kube_namespace, ingress)
    try:
        yield cluster
    finally:
        admin.delete_namespace(ingress)


def test_every_shipped_role_is_tested(rbac_cluster: Cluster):
    names = {d["metadata"]["name"] for d in rbac_cluster.docs if d["kind"] == "Role"}
    assert names == ROLES


def test_incident_runbooks_role(rbac_cluster: Cluster):
    c, ns = rbac_cluster, rbac_cluster.platform
    apps: Any = k8s.AppsV1Api(c.admin)
    admin_settings = c.kube.settings(ns)
    sa = c.token_settings("incident-runbooks")
    create_with_revisions(apps, admin_settings, ns, "akig-backend", revisions=2, replicas=1)
    apps.create_namespaced_deployment(ns, deployment_body("akig-intruder", replicas=1))
    apps.create_namespaced_stateful_set(ns, statefulset_body("akig-redis", replicas=1))
    apps.create_namespaced_stateful_set(ns, statefulset_body("akig-intruder-db", replicas=1))

    # Every namespaced task works on the named Deployment with the Role alone.
    history = rollout_history.fn("akig-backend", ns, settings=sa)
    assert [r.revision for r in history.revisions] == [1, 2]
    assert undo_rollout.fn("akig-backend", ns, settings=sa).outcome == "rolled back"
    assert wait_for_rollout.fn("akig-backend", ns, timeout_s=30, poll_s=0.1, settings=sa).complete
    assert restart_rollout.fn("akig-backend", ns, settings=sa).patched
    assert wait_for_rollout.fn("akig-backend", ns, timeout_s=30, poll_s=0.1, settings=sa).complete
    assert list_pods.fn(None, ns, settings=sa)
    settled_pods(sa, ns, "component=akig-backend", 1)
    logs = tail_logs.fn("akig-backend", lines=5, namespace=ns, settings=sa)
    assert [len(p.lines) for p in logs.logs] == [5]
    assert list_events.fn(ns, settings=sa)
    assert scale.fn("akig-backend", 0, ns, settings=sa).replicas_after == 0
    assert [p.restarts for p in pod_restarts.fn("component=akig-redis", ns, settings=sa)] == [0]
    assert wait_for_statefulset.fn("akig-redis", ns, timeout_s=30, poll_s=0.1, settings=sa).complete
    assert restart_statefulset.fn("akig-redis", ns, settings=sa).patched
    assert wait_for_statefulset.fn("akig-redis", ns, timeout_s=30, poll_s=0.1, settings=sa).complete
    workloads: list[tuple[Literal["deployment", "statefulset"], str, str]] = [
        ("deployment", "akig-backend", "app"),
        ("statefulset", "akig-redis", "main"),
    ]
    for kind, name, container in workloads:
        limit = {"resources": {"limits": {"memory": "64Mi"}}}
        patch = {"spec": {"template": {"spec": {"containers": [{"name": container, **limit}]}}}}
        if kind == "deployment":
            apps.patch_namespaced_deployment(name, ns, patch)
        else:
            apps.patch_namespaced_stateful_set(name, ns, patch)
        assert raise_memory_limit.fn(kind, name, ns, container, "128Mi", settings=sa).changed

    # The same tasks on a Deployment not named in the Role: refused before any change
    # (its pods carry the platform label, so only RBAC stands in the way).
    generation = apps.read_namespaced_deployment("akig-intruder", ns).metadata.generation
    for call in (
        lambda: restart_rollout.fn("akig-intruder", ns, settings=sa),
        lambda: undo_rollout.fn("akig-intruder", ns, settings=sa),
        lambda: scale.fn("akig-intruder", 0, ns, settings=sa),
    ):
        with pytest.raises(PermanentError, match=r"forbidden: cannot get deployments"):
            call()
    assert apps.read_namespaced_deployment("akig-intruder", ns).metadata.generation == generation
    sts_generation = apps.read_namespaced_stateful_set("akig-intruder-db", ns).metadata.generation
    sts_calls: list[Callable[[], Any]] = [
        lambda: restart_statefulset.fn("akig-intruder-db", ns, settings=sa),
        lambda: raise_memory_limit.fn(
            "statefulset", "akig-intruder-db", ns, "main", "300Mi", settings=sa
        ),
    ]
    for sts_call in sts_calls:
        with pytest.raises(PermanentError, match=r"forbidden: cannot get statefulsets"):
            sts_call()
    assert (
        apps.read_namespaced_stateful_set("akig-intruder-db", ns).metadata.generation
        == sts_generation
    )

    # Beyond the grant: deletes, creates, Secrets, ReplicaSet edits, other namespaces.
    sa_api = kube_api_client(sa)
    sa_apps: Any = k8s.AppsV1Api(sa_api)
    sa_core: Any = k8s.CoreV1Api(sa_api)
    assert forbidden(lambda: sa_apps.delete_namespaced_deployment("akig-backend", ns))
    assert forbidden(lambda: sa_apps.create_namespaced_deployment(ns, deployment_body("new")))
    assert forbidden(
        lambda: sa_apps.patch_namespaced_deployment_scale(
            "akig-intruder",
            ns,
            {"spec": {"replicas": 0}},
            _content_type="application/merge-patch+json",
        )
    )
    assert forbidden(lambda: sa_apps.list_namespaced_deployment(ns))
    assert forbidden(lambda: sa_apps.list_namespaced_stateful_set(ns))
    assert forbidden(lambda: sa_apps.delete_namespaced_stateful_set("akig-redis", ns))
    assert forbidden(lambda: sa_core.list_namespaced_secret(ns))
    assert forbidden(lambda: sa_core.read_namespaced_secret("anything", ns))
    assert forbidden(lambda: sa_core.delete_collection_namespaced_pod(ns))
    assert forbidden(
        lambda: sa_apps.patch_namespaced_replica_set(
            "any", ns, {"spec": {"replicas": 0}}, _content_type="application/merge-patch+json"
        )
    )
    with pytest.raises(PermanentError, match=r"forbidden: cannot list pods in namespace default"):
        list_pods.fn(None, "default", settings=sa)

    # Drop any one rule: the task that needs it breaks.
    apps.patch_namespaced_deployment_scale(
        "akig-backend", ns, {"spec": {"replicas": 1}}, _content_type="application/merge-patch+json"
    )
    wait_for_rollout.fn("akig-backend", ns, timeout_s=30, poll_s=0.1, settings=admin_settings)
    settled_pods(admin_settings, ns, "component=akig-backend", 1)
    the_role = role(c.docs, "incident-runbooks")
    assert [r["resources"][0] for r in the_role["rules"]] == [
        "deployments",
        "deployments/scale",
        "statefulsets",
        "replicasets",
        "pods",
        "pods/log",
        "events",
        "pods",  # metrics.k8s.io
    ]
    # Allowed: no metrics-server here, so the API answers "not served", not "forbidden".
    assert pod_metrics.fn(None, ns, settings=sa).available is False
    without_each_rule_something_breaks(
        c.admin,
        the_role,
        [
            lambda: rollout_history.fn("akig-backend", ns, settings=sa),
            # a server dry run: authorized like the real write, never already at the target
            lambda: scale.fn("akig-backend", 2, ns, dry_run=True, settings=sa),
            lambda: restart_statefulset.fn("akig-redis", ns, dry_run=True, settings=sa),
            lambda: rollout_history.fn("akig-backend", ns, settings=sa),
            lambda: list_pods.fn(None, ns, settings=sa),
            lambda: tail_logs.fn("akig-backend", lines=1, namespace=ns, settings=sa),
            lambda: list_events.fn(ns, settings=sa),
            lambda: pod_metrics.fn(None, ns, settings=sa),
        ],
    )


def test_nodes_need_the_separate_cluster_role(rbac_cluster: Cluster):
    c = rbac_cluster
    sa = c.token_settings("incident-runbooks")
    with pytest.raises(PermanentError, match=r"forbidden: cannot list nodes \(RBAC\)"):
        node_status.fn(settings=sa)
    with c.cluster_grants():
        wait_until(lambda: not forbidden(lambda: node_status.fn(settings=sa)), what="nodes")
        assert [n.name for n in node_status.fn(settings=sa)] == ["fake-node"]
        sa_core: Any = k8s.CoreV1Api(kube_api_client(sa))
        assert forbidden(lambda: sa_core.delete_node("fake-node"))


def _tls_secret(core: Any, ns: str, name: str, issued: Issued) -> None:
    core.create_namespaced_secret(
        ns,
        k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name=name),
            type="kubernetes.io/tls",
            string_data={
                "tls.crt": issued.chain_pem().decode(),
                "tls.key": issued.key_pem.decode(),
            },
        ),
    )


def test_cert_expiry_role(rbac_cluster: Cluster, pki: CertFactory):
    c, ns = rbac_cluster, rbac_cluster.platform
    core: Any = k8s.CoreV1Api(c.admin)
    _tls_secret(core, ns, "akig-tls", pki.leaf(days_left=20))
    _tls_secret(core, ns, "payments-tls", pki.leaf(days_left=20))
    sa = c.token_settings("cert-expiry")

    assert read_secret_certificates(ns, "akig-tls", settings=sa).source == f"{ns}/akig-tls"
    with pytest.raises(PermanentError, match="403"):
        read_secret_certificates(ns, "payments-tls", settings=sa)
    sa_core: Any = k8s.CoreV1Api(kube_api_client(sa))
    assert forbidden(lambda: sa_core.list_namespaced_secret(ns))
    assert forbidden(
        lambda: sa_core.patch_namespaced_secret(
            "akig-tls", ns, {"metadata": {"labels": {"x": "y"}}}
        )
    )
    assert forbidden(lambda: sa_core.delete_namespaced_secret("akig-tls", ns))
    assert forbidden(lambda: rollout_history.fn("akig-backend", ns, settings=sa))
    without_each_rule_something_breaks(
        c.admin,
        role(c.docs, "cert-expiry"),
        [lambda: read_secret_certificates(ns, "akig-tls", settings=sa)],
    )


def test_cert_replace_roles(rbac_cluster: Cluster, pki: CertFactory):
    c, ns, ingress = rbac_cluster, rbac_cluster.platform, rbac_cluster.ingress
    core: Any = k8s.CoreV1Api(c.admin)
    apps: Any = k8s.AppsV1Api(c.admin)
    old, new = pki.leaf(days_left=5), pki.leaf(days_left=90)
    _tls_secret(core, ns, "akig-tls", old)
    _tls_secret(core, ns, "akig-tls-new", new)
    _tls_secret(core, ns, "payments-tls", old)
    for name in ("ingress-nginx-controller", "other-controller"):
        apps.create_namespaced_deployment(ingress, deployment_body(name, replicas=1))
    sa = c.token_settings("cert-replace")
    sa_core: Any = k8s.CoreV1Api(kube_api_client(sa))

    # The flow's steps, with the flow's own code: read, load the staged pair, back up and
    # replace, restart the ingress and wait for it.
    current = read_secret_certificates(ns, "akig-tls", settings=sa)
    pair = load_pair_from_secret(ns, "akig-tls-new", settings=sa)
    assert current.resource_version is not None
    done = write_tls_secret(ns, "akig-tls", pair, current.resource_version, settings=sa)
    assert done.new_serial == format(new.cert.serial_number, "x")
    assert restart_rollout.fn("ingress-nginx-controller", ingress, settings=sa).patched
    status = wait_for_rollout.fn(
        "ingress-nginx-controller", ingress, timeout_s=30, poll_s=0.1, settings=sa
    )
    assert status.complete

    # Around it, refused: other Secrets, reading its own backup, editing the staged pair,
    # deleting, listing, any other Deployment here or in the ingress namespace.
    assert done.backup_secret is not None
    assert forbidden(lambda: read_secret_certificates(ns, "payments-tls", settings=sa))
    assert forbidden(lambda: sa_core.read_namespaced_secret(done.backup_secret, ns))
    staged = core.read_namespaced_secret("akig-tls-new", ns)
    assert forbidden(lambda: sa_core.replace_namespaced_secret("akig-tls-new", ns, staged))
    assert forbidden(lambda: sa_core.delete_namespaced_secret("akig-tls", ns))
    assert forbidden(lambda: sa_core.list_namespaced_secret(ns))
    assert forbidden(lambda: restart_rollout.fn("other-controller", ingress, settings=sa))
    assert forbidden(lambda: restart_rollout.fn("akig-backend", ns, settings=sa))
    assert forbidden(lambda: list_pods.fn(None, ingress, settings=sa))

    # Every rule is needed.
    live = core.read_namespaced_secret("akig-tls", ns)
    backup = k8s.V1Secret(metadata=k8s.V1ObjectMeta(name="probe-backup"), type="Opaque")
    without_each_rule_something_breaks(
        c.admin,
        role(c.docs, "cert-replace"),
        [
            lambda: read_secret_certificates(ns, "akig-tls", settings=sa),
            lambda: sa_core.replace_namespaced_secret("akig-tls", ns, live),
            lambda: sa_core.create_namespaced_secret(ns, backup),
        ],
    )
    without_each_rule_something_breaks(
        c.admin,
        role(c.docs, "cert-replace-ingress"),
        [
            lambda: restart_rollout.fn(
                "ingress-nginx-controller", ingress, dry_run=True, settings=sa
            )
        ],
    )


def test_db_pool_exhausted_role(rbac_cluster: Cluster):
    c, ns = rbac_cluster, rbac_cluster.platform
    apps: Any = k8s.AppsV1Api(c.admin)
    core: Any = k8s.CoreV1Api(c.admin)
    for cm in ("akig-backend-config", "other-config"):
        core.create_namespaced_config_map(
            ns, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name=cm), data={"pool": "4"})
        )
    ref = {
        "name": "DB_POOL_SIZE",
        "valueFrom": {"configMapKeyRef": {"name": "akig-backend-config", "key": "pool"}},
    }
    for name in ("akig-backend", "akig-intruder"):
        body = deployment_body(name, replicas=1)
        body["spec"]["template"]["spec"]["containers"][0]["env"].append(ref)
        apps.create_namespaced_deployment(ns, body)
    sa = c.token_settings("db-pool-exhausted")
    sizing = PoolSizingSettings(env="DB_POOL_SIZE")
    from_cm = PoolSizingSettings(env="UNSET", configmap="akig-backend-config", configmap_key="pool")

    # The runbook's reads and its write, with the Role alone.
    assert read_backend_pool_now(sa, sizing).pool_size == 4
    assert read_backend_pool_now(sa, from_cm).pool_size == 4
    plan = plan_env_value.fn("akig-backend", ns, "app", "DB_POOL_SIZE", 5, 10, settings=sa)
    assert apply_env_value.fn(plan, settings=sa).patched
    assert restart_rollout.fn("akig-backend", ns, settings=sa).patched

    # Around it, refused: another Deployment or ConfigMap, listing, Secrets, pods, deleting.
    intruder = KubernetesSettings.model_validate(
        sa.model_dump() | {"backend_deployment": "akig-intruder"}
    )
    with pytest.raises(PermanentError, match=r"forbidden: cannot get deployments"):
        read_backend_pool_now(intruder, sizing)
    with pytest.raises(PermanentError, match=r"forbidden: cannot get deployments"):
        plan_env_value.fn("akig-intruder", ns, "app", "DB_POOL_SIZE", 5, 10, settings=sa)
    other_cm = PoolSizingSettings(env="UNSET", configmap="other-config", configmap_key="pool")
    with pytest.raises(PermanentError, match=r"forbidden: cannot get configmaps"):
        read_backend_pool_now(sa, other_cm)
    sa_api = kube_api_client(sa)
    sa_apps: Any = k8s.AppsV1Api(sa_api)
    sa_core: Any = k8s.CoreV1Api(sa_api)
    assert forbidden(lambda: sa_apps.list_namespaced_deployment(ns))
    assert forbidden(lambda: sa_apps.delete_namespaced_deployment("akig-backend", ns))
    assert forbidden(
        lambda: sa_apps.patch_namespaced_deployment_scale(
            "akig-backend",
            ns,
            {"spec": {"replicas": 0}},
            _content_type="application/merge-patch+json",
        )
    )
    assert forbidden(lambda: sa_core.list_namespaced_config_map(ns))
    assert forbidden(
        lambda: sa_core.patch_namespaced_config_map(
            "akig-backend-config", ns, {"data": {"pool": "99"}}
        )
    )
    assert forbidden(lambda: sa_core.list_namespaced_secret(ns))
    assert forbidden(lambda: list_pods.fn(None, ns, settings=sa))

    # Every rule is needed.
    again = plan_env_value.fn("akig-backend", ns, "app", "DB_POOL_SIZE", 6, 10, settings=sa)
    without_each_rule_something_breaks(
        c.admin,
        role(c.docs, "db-pool-exhausted"),
        [
            lambda: read_backend_pool_now(sa, from_cm),
            # a server dry run: authorized like the real write
            lambda: apply_env_value.fn(again, dry_run=True, settings=sa),
            lambda: read_backend_pool_now(sa, from_cm),
        ],
    )


def test_payment_failure_role(rbac_cluster: Cluster):
    """Read only: the backend's revisions, its pods and their logs; nothing else."""
    c, ns = rbac_cluster, rbac_cluster.platform
    apps: Any = k8s.AppsV1Api(c.admin)
    admin_settings = c.kube.settings(ns)
    sa = c.token_settings("payment-failure")
    create_with_revisions(apps, admin_settings, ns, "akig-backend", revisions=2, replicas=1)
    apps.create_namespaced_deployment(ns, deployment_body("akig-intruder", replicas=1))
    wait_for_rollout.fn("akig-backend", ns, timeout_s=30, poll_s=0.1, settings=admin_settings)
    settled_pods(admin_settings, ns, "component=akig-backend", 1)

    # The runbook's reads, with the Role alone.
    history = rollout_history.fn("akig-backend", ns, settings=sa)
    assert [r.revision for r in history.revisions] == [1, 2]
    logs = tail_logs.fn("akig-backend", lines=5, namespace=ns, settings=sa)
    assert [len(p.lines) for p in logs.logs] == [5]

    # Around it, refused: another Deployment, any write, Secrets, events.
    with pytest.raises(PermanentError, match=r"forbidden: cannot get deployments"):
        rollout_history.fn("akig-intruder", ns, settings=sa)
    sa_api = kube_api_client(sa)
    sa_apps: Any = k8s.AppsV1Api(sa_api)
    sa_core: Any = k8s.CoreV1Api(sa_api)
    assert forbidden(lambda: restart_rollout.fn("akig-backend", ns, settings=sa))
    assert forbidden(lambda: undo_rollout.fn("akig-backend", ns, settings=sa))
    assert forbidden(lambda: sa_apps.list_namespaced_deployment(ns))
    assert forbidden(lambda: sa_apps.delete_namespaced_deployment("akig-backend", ns))
    assert forbidden(lambda: sa_core.delete_collection_namespaced_pod(ns))
    assert forbidden(lambda: sa_core.list_namespaced_secret(ns))
    assert forbidden(lambda: sa_core.list_namespaced_config_map(ns))
    assert forbidden(lambda: list_events.fn(ns, settings=sa))

    # Every rule is needed.
    the_role = role(c.docs, "payment-failure")
    assert [(r["resources"][0], r["verbs"]) for r in the_role["rules"]] == [
        ("deployments", ["get"]),
        ("replicasets", ["list"]),
        ("pods", ["list"]),
        ("pods/log", ["get"]),
    ]
    without_each_rule_something_breaks(
        c.admin,
        the_role,
        [
            lambda: rollout_history.fn("akig-backend", ns, settings=sa),
            lambda: rollout_history.fn("akig-backend", ns, settings=sa),
            lambda: tail_logs.fn("akig-backend", lines=1, namespace=ns, settings=sa),
            lambda: tail_logs.fn("akig-backend", lines=1, namespace=ns, settings=sa),
        ],
    )


def test_postgres_runbooks_identity_has_no_kubernetes_access(rbac_cluster: Cluster):
    c, ns = rbac_cluster, rbac_cluster.platform
    sa = c.token_settings("runbooks-no-kube")
    assert forbidden(lambda: list_pods.fn(None, ns, settings=sa))
    assert forbidden(lambda: rollout_history.fn("akig-backend", ns, settings=sa))
    account: Any = k8s.CoreV1Api(c.admin).read_namespaced_service_account("runbooks-no-kube", ns)
    assert account.automount_service_account_token is False


def test_shipped_manifests_apply_with_kustomize_as_is(kube_cluster: KubeCluster, kubectl):
    """`kubectl apply -k` works unmodified for both folders and binds the runbooks' identity."""
    core: Any = k8s.CoreV1Api(kube_cluster.api())
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=INGRESS)))
    base = [str(kubectl), f"--kubeconfig={kube_cluster.kubeconfig}"]

    def kubectl_k(verb: str, folder: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, verb, "-k", str(folder)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    try:
        out = kubectl_k("apply", MANIFESTS)
        assert out.returncode == 0, out.stderr
        ingress_out = kubectl_k("apply", MANIFESTS / "ingress")
        assert ingress_out.returncode == 0, ingress_out.stderr
        created = {
            line.split()[0] for line in (out.stdout + ingress_out.stdout).splitlines() if line
        }
        assert {f"role.rbac.authorization.k8s.io/{name}" for name in ROLES} <= created
        static = kube_cluster.settings(
            "default", kubeconfig=kube_cluster.kubeconfig_for(kube_cluster.runbooks_token, "static")
        )
        static_core: Any = k8s.CoreV1Api(kube_api_client(static))
        assert list_pods.fn(None, "default", settings=static) == []
        assert [n.name for n in node_status.fn(settings=static)] == ["fake-node"]
        assert forbidden(lambda: static_core.list_namespaced_secret("default"))
        assert forbidden(lambda: static_core.list_namespaced_pod("kube-system"))
    finally:
        kubectl_k("delete", MANIFESTS / "ingress")
        kubectl_k("delete", MANIFESTS)
        core.delete_namespace(INGRESS)


def test_performance_report_role(rbac_cluster: Cluster):
    """Read only: the backend Deployment's selector, its pods and their logs; nothing else."""
    c, ns = rbac_cluster, rbac_cluster.platform
    apps: Any = k8s.AppsV1Api(c.admin)
    admin_settings = c.kube.settings(ns)
    sa = c.token_settings("performance-report")
    apps.create_namespaced_deployment(ns, deployment_body("akig-backend", replicas=2))
    apps.create_namespaced_deployment(ns, deployment_body("akig-intruder", replicas=1))
    wait_for_rollout.fn("akig-backend", ns, timeout_s=30, poll_s=0.1, settings=admin_settings)
    settled_pods(admin_settings, ns, "component=akig-backend", 2)

    # The runbook's read (every pod's duration lines), with the Role alone.
    logs = tail_logs.fn("akig-backend", lines=5, grep=DURATION_GREP, namespace=ns, settings=sa)
    assert len(logs.logs) == 2 and all(p.error is None for p in logs.logs)

    # Around it, refused: another Deployment, any write, Secrets, ConfigMaps, events, and the
    # same reads in another namespace.
    with pytest.raises(PermanentError, match=r"forbidden: cannot get deployments"):
        tail_logs.fn("akig-intruder", lines=1, namespace=ns, settings=sa)
    sa_api = kube_api_client(sa)
    sa_apps: Any = k8s.AppsV1Api(sa_api)
    sa_core: Any = k8s.CoreV1Api(sa_api)
    assert forbidden(lambda: restart_rollout.fn("akig-backend", ns, settings=sa))
    assert forbidden(lambda: sa_apps.list_namespaced_deployment(ns))
    assert forbidden(lambda: sa_core.delete_collection_namespaced_pod(ns))
    assert forbidden(lambda: sa_core.list_namespaced_secret(ns))
    assert forbidden(lambda: sa_core.list_namespaced_config_map(ns))
    assert forbidden(lambda: list_events.fn(ns, settings=sa))
    assert forbidden(lambda: sa_core.list_namespaced_pod(c.ingress))

    # Every rule is needed.
    the_role = role(c.docs, "performance-report")
    assert [(r["resources"][0], r["verbs"]) for r in the_role["rules"]] == [
        ("deployments", ["get"]),
        ("pods", ["list"]),
        ("pods/log", ["get"]),
    ]
    needs = lambda: tail_logs.fn("akig-backend", lines=1, namespace=ns, settings=sa)  # noqa: E731
    without_each_rule_something_breaks(c.admin, the_role, [needs, needs, needs])
