"""Differential test: our undo/restart vs the real kubectl on identical Deployments.

Two namespaces get the same Deployment with the same history; kubectl acts in one, our
tasks in the other, and the resulting Deployments and ReplicaSet revisions must match.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from tasks.errors import PermanentError, SafetyViolation
from tasks.kubernetes import (
    RESTARTED_AT,
    REVISION,
    restart_rollout,
    restart_statefulset,
    undo_rollout,
    wait_for_statefulset,
)
from tests.fixtures.kube import KubeCluster
from tests.integration.kube_helpers import (
    create_with_revisions,
    revision_of,
    rolled_out,
    statefulset_body,
    wait_until,
)

pytestmark = pytest.mark.kube

NAME = "akig-backend"


def snapshot(apps: Any, ns: str) -> dict[str, Any]:
    """What must be equal: the template, the annotations, and every ReplicaSet's revision."""
    api = k8s.ApiClient()
    dep = apps.read_namespaced_deployment(NAME, ns)
    template = api.sanitize_for_serialization(dep.spec.template)
    restarted = (template.get("metadata", {}).get("annotations") or {}).get(RESTARTED_AT)
    if restarted:
        template["metadata"]["annotations"][RESTARTED_AT] = "<restartedAt>"
    replica_sets = []
    for rs in apps.list_namespaced_replica_set(ns).items:
        if any(o.uid == dep.metadata.uid for o in rs.metadata.owner_references or []):
            rs_template = api.sanitize_for_serialization(rs.spec.template)
            rs_restarted = RESTARTED_AT in (
                (rs_template.get("metadata") or {}).get("annotations") or {}
            )
            replica_sets.append(
                (
                    int(rs.metadata.annotations[REVISION]),
                    rs.spec.template.spec.containers[0].image,
                    # The hash covers restartedAt's value, which differs by the clock: compare
                    # it only for ReplicaSets whose template carries no restartedAt.
                    None if rs_restarted else rs.metadata.labels.get("pod-template-hash"),
                    rs_restarted,
                )
            )
    return {
        "template": template,
        "annotations": dep.metadata.annotations,
        "replica_sets": sorted(replica_sets, key=lambda r: r[0]),
        "paused": dep.spec.paused,
        "restarted": bool(restarted),
    }


class Kubectl:
    def __init__(self, path: Path, kubeconfig: Path, namespace: str) -> None:
        self.base = [str(path), f"--kubeconfig={kubeconfig}", "-n", namespace]

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.base, *args], capture_output=True, text=True, timeout=60, check=False
        )


def settle(apps, settings, ns: str, revision: int) -> None:
    wait_until(lambda: revision_of(apps, ns, NAME) == revision, what=f"revision {revision} in {ns}")
    rolled_out(settings, ns, NAME)


def test_undo_and_restart_match_kubectl(kube_cluster: KubeCluster, kube_namespace, kubectl):
    ours = kube_namespace
    theirs = f"kubectl-{uuid.uuid4().hex[:6]}"
    admin = kube_cluster.api()
    apps: Any = k8s.AppsV1Api(admin)
    core: Any = k8s.CoreV1Api(admin)
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=theirs)))
    run = Kubectl(kubectl, kube_cluster.kubeconfig, theirs)
    s_ours, s_theirs = kube_cluster.settings(ours), kube_cluster.settings(theirs)
    try:
        for ns, settings in ((ours, s_ours), (theirs, s_theirs)):
            create_with_revisions(apps, settings, ns, NAME, revisions=3, replicas=1)
        assert snapshot(apps, ours) == snapshot(apps, theirs)

        # 1. undo to the previous revision
        out = run("rollout", "undo", f"deployment/{NAME}")
        assert out.returncode == 0, out.stderr
        result = undo_rollout.fn(NAME, ours, settings=s_ours)
        assert out.stdout.strip() == result.message
        for ns, settings in ((ours, s_ours), (theirs, s_theirs)):
            settle(apps, settings, ns, 4)
        assert snapshot(apps, ours) == snapshot(apps, theirs)

        # 2. undo to a given revision
        out = run("rollout", "undo", f"deployment/{NAME}", "--to-revision=1")
        assert out.returncode == 0, out.stderr
        undo_rollout.fn(NAME, ours, to_revision=1, settings=s_ours)
        for ns, settings in ((ours, s_ours), (theirs, s_theirs)):
            settle(apps, settings, ns, 5)
        assert snapshot(apps, ours) == snapshot(apps, theirs)

        # 3. the skipped case: the same stdout line
        out = run("rollout", "undo", f"deployment/{NAME}", "--to-revision=5")
        assert out.returncode == 0, out.stderr
        result = undo_rollout.fn(NAME, ours, to_revision=5, settings=s_ours)
        assert out.stdout.strip() == result.message
        assert "skipped rollback" in result.message

        # 4. a missing revision: the same error text
        out = run("rollout", "undo", f"deployment/{NAME}", "--to-revision=2")
        assert out.returncode != 0
        with pytest.raises(PermanentError) as missing:
            undo_rollout.fn(NAME, ours, to_revision=2, settings=s_ours)
        assert str(missing.value) in out.stderr

        # 5. restart: same template apart from the timestamp, new ReplicaSet at revision 6
        out = run("rollout", "restart", f"deployment/{NAME}")
        assert out.returncode == 0, out.stderr
        restarted = restart_rollout.fn(NAME, ours, settings=s_ours)
        assert out.stdout.strip() == restarted.message
        for ns, settings in ((ours, s_ours), (theirs, s_theirs)):
            settle(apps, settings, ns, 6)
        mine, kubectls = snapshot(apps, ours), snapshot(apps, theirs)
        assert mine["restarted"]
        assert mine == kubectls
        managers = [
            {m.manager for m in apps.read_namespaced_deployment(NAME, ns).metadata.managed_fields}
            for ns in (ours, theirs)
        ]
        assert "kubectl-rollout" in managers[0] & managers[1]

        # 6. undo after a restart brings back the template without restartedAt
        out = run("rollout", "undo", f"deployment/{NAME}")
        assert out.returncode == 0, out.stderr
        undo_rollout.fn(NAME, ours, settings=s_ours)
        for ns, settings in ((ours, s_ours), (theirs, s_theirs)):
            settle(apps, settings, ns, 7)
        mine, kubectls = snapshot(apps, ours), snapshot(apps, theirs)
        assert not mine["restarted"]
        assert mine == kubectls

        # 7. paused: both refuse with the same words, nothing changes
        for ns in (ours, theirs):
            apps.patch_namespaced_deployment(
                NAME, ns, {"spec": {"paused": True}}, _content_type="application/merge-patch+json"
            )
        out = run("rollout", "undo", f"deployment/{NAME}")
        assert out.returncode != 0
        with pytest.raises(SafetyViolation) as paused:
            undo_rollout.fn(NAME, ours, settings=s_ours)
        assert str(paused.value) in out.stderr
        out = run("rollout", "restart", f"deployment/{NAME}")
        assert out.returncode != 0
        with pytest.raises(SafetyViolation) as paused:
            restart_rollout.fn(NAME, ours, settings=s_ours)
        assert str(paused.value) in out.stderr
        assert snapshot(apps, ours) == snapshot(apps, theirs)
    finally:
        core.delete_namespace(theirs)


def sts_snapshot(apps: Any, ns: str, name: str) -> dict[str, Any]:
    """A StatefulSet's template (restartedAt masked), generation and field managers."""
    sts = apps.read_namespaced_stateful_set(name, ns)
    template = k8s.ApiClient().sanitize_for_serialization(sts.spec.template)
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    if RESTARTED_AT in annotations:
        annotations[RESTARTED_AT] = "<restartedAt>"
    managers = sorted(
        (m.manager, m.operation, sorted(m.fields_v1 or {})) for m in sts.metadata.managed_fields
    )
    return {"template": template, "generation": sts.metadata.generation, "managers": managers}


def test_statefulset_restart_and_status_match_kubectl(
    kube_cluster: KubeCluster, kube_namespace, kubectl
):
    ours, name = kube_namespace, "akig-redis"
    theirs = f"kubectl-{uuid.uuid4().hex[:6]}"
    admin = kube_cluster.api()
    apps: Any = k8s.AppsV1Api(admin)
    core: Any = k8s.CoreV1Api(admin)
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=theirs)))
    run = Kubectl(kubectl, kube_cluster.kubeconfig, theirs)
    s_ours = kube_cluster.settings(ours)
    try:
        for ns in (ours, theirs):
            apps.create_namespaced_stateful_set(ns, statefulset_body(name, replicas=2))

        def status_both() -> None:
            out = run("rollout", "status", f"statefulset/{name}", "--timeout=60s")
            assert out.returncode == 0, out.stderr
            mine = wait_for_statefulset.fn(name, ours, timeout_s=60, poll_s=0.1, settings=s_ours)
            assert out.stdout.strip().splitlines()[-1] == mine.message

        status_both()
        assert sts_snapshot(apps, ours, name) == sts_snapshot(apps, theirs, name)

        out = run("rollout", "restart", f"statefulset/{name}")
        assert out.returncode == 0, out.stderr
        result = restart_statefulset.fn(name, ours, settings=s_ours)
        assert out.stdout.strip() == result.message
        mine, kubectls = sts_snapshot(apps, ours, name), sts_snapshot(apps, theirs, name)
        assert mine == kubectls
        assert any(m[0] == "kubectl-rollout" for m in mine["managers"])
        status_both()

        # kubectl refuses `rollout status` for OnDelete; so do we, in its words.
        for ns in (ours, theirs):
            apps.create_namespaced_stateful_set(
                ns, statefulset_body("ondelete", replicas=1, updateStrategy={"type": "OnDelete"})
            )
        out = run("rollout", "status", "statefulset/ondelete", "--timeout=10s")
        assert out.returncode != 0
        with pytest.raises(PermanentError) as refused:
            wait_for_statefulset.fn("ondelete", ours, timeout_s=10, poll_s=0.1, settings=s_ours)
        assert str(refused.value) in out.stderr
    finally:
        core.delete_namespace(theirs)
