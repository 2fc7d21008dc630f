"""Every manifest under deployments/k8s passes `kubectl apply --dry-run=server` as shipped.

The real kubectl (the oldest versioned one, 1.27) applies each kustomization an operator
applies (`-k`: deployments/k8s, ingress/, receiver/, receiver/second/) against the test
kube-apiserver 1.20 with `--dry-run=server`: the API server decodes, defaults, validates and
admits every object (RBAC, Deployments, PVCs, Services) without storing it. Which folders
those are comes from tests/fixtures/kustomize.py, so a new kustomization is validated without
editing this file, and tests/unit/test_k8s_kustomize.py proves no YAML file escapes them.
Copies with one bad field prove an invalid manifest is refused.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from tests.fixtures.kube import KubeCluster
from tests.fixtures.kustomize import MANIFESTS, applied_roots, render

pytestmark = pytest.mark.kube


def _namespaces(folder: Path) -> set[str]:
    """The namespaces the objects `folder` builds land in (the kustomization's, else theirs)."""
    found = set()
    for path in folder.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            if doc.get("kind") == "Kustomization":
                found.add(doc.get("namespace"))
            else:
                found.add(doc.get("metadata", {}).get("namespace"))
    return {ns for ns in found if ns}


def _wait_gone(core: Any, ns: str, timeout: float = 60) -> None:
    """Until namespace `ns` is deleted for good (the namespace controller empties it first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            core.read_namespace(ns)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        time.sleep(0.2)
    raise AssertionError(f"namespace {ns} still there after {timeout}s")


def _ensure_namespace(core: Any, ns: str) -> bool:
    """Namespace `ns` exists and is Active; True when this call created it."""
    for _ in range(2):
        try:
            core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=ns)))
            return True
        except ApiException as exc:
            if exc.status != 409:
                raise
        # It exists; one another test is deleting refuses new objects until it is gone.
        if core.read_namespace(ns).status.phase != "Terminating":
            return False
        _wait_gone(core, ns)
    raise AssertionError(f"namespace {ns} could not be created")


@pytest.fixture(scope="module")
def shipped_namespaces(kube_cluster: KubeCluster) -> Iterator[set[str]]:
    """The namespaces the manifests name, created if missing and deleted after if created."""
    core: Any = k8s.CoreV1Api(kube_cluster.api())
    wanted = set().union(*(_namespaces(d) for d in applied_roots()))
    created = [ns for ns in sorted(wanted) if _ensure_namespace(core, ns)]
    yield wanted
    for ns in created:
        with contextlib.suppress(ApiException):
            core.delete_namespace(ns)
    # Another test creates ingress-nginx itself: leave only once ours is really gone.
    for ns in created:
        _wait_gone(core, ns)


def dry_run(kube: KubeCluster, kubectl: Path, folder: Path) -> subprocess.CompletedProcess[str]:
    """`kubectl apply -k <folder> --dry-run=server` as the cluster admin."""
    return subprocess.run(
        [
            str(kubectl),
            f"--kubeconfig={kube.kubeconfig}",
            "apply",
            "--dry-run=server",
            "-k",
            str(folder),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _objects(out: subprocess.CompletedProcess[str]) -> list[str]:
    """`kind.group/name` of every line kubectl printed for a server dry run."""
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert all(line.endswith("(server dry run)") for line in lines), out.stdout
    return [line.split()[0] for line in lines]


@pytest.mark.parametrize(
    "folder",
    applied_roots(),
    ids=lambda d: str(d.relative_to(MANIFESTS.parent)),
)
def test_every_kustomization_passes_a_server_dry_run(
    kube_cluster: KubeCluster, kubectl: Path, shipped_namespaces: set[str], folder: Path
):
    out = dry_run(kube_cluster, kubectl, folder)
    assert out.returncode == 0, out.stderr
    objects = _objects(out)
    # Every object the kustomization builds went through the API server, and none was kept.
    rendered = render(kubectl, folder)
    assert len(objects) == len(rendered) > 0
    names = {o.split("/", 1)[1] for o in objects}
    assert names == {d["metadata"]["name"] for d in rendered}
    stored = subprocess.run(
        [
            str(kubectl),
            f"--kubeconfig={kube_cluster.kubeconfig}",
            "get",
            "-k",
            str(folder),
            "--ignore-not-found",
            "-o",
            "name",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert stored.returncode == 0, stored.stderr
    assert stored.stdout.strip() == "", f"a dry run stored: {stored.stdout}"


def test_the_dry_run_covers_the_receiver_workload(
    kube_cluster: KubeCluster, kubectl: Path, shipped_namespaces: set[str]
):
    objects = _objects(dry_run(kube_cluster, kubectl, MANIFESTS / "receiver"))
    objects += _objects(dry_run(kube_cluster, kubectl, MANIFESTS / "receiver" / "second"))
    assert sorted(objects) == sorted(
        [
            "serviceaccount/incident-runbooks-receiver",
            "service/incident-runbooks-receiver",
            "persistentvolumeclaim/receiver-journal",
            "deployment.apps/incident-runbooks-receiver",
            "persistentvolumeclaim/receiver-journal-b",
            "deployment.apps/incident-runbooks-receiver-b",
        ]
    )


def _broken_copy(tmp_path: Path, edit: str, replacement: str) -> Path:
    """The receiver's folder copied, with one line of its Deployment replaced."""
    copy = tmp_path / "receiver"
    shutil.copytree(MANIFESTS / "receiver", copy)
    deployment = copy / "instance" / "deployment.yaml"
    text = deployment.read_text()
    assert text.count(edit) == 1, edit
    deployment.write_text(text.replace(edit, replacement))
    return copy


@pytest.mark.parametrize(
    ("edit", "replacement", "refusal"),
    [
        # Valid YAML and schema, refused by the API server's own validation.
        (
            "    type: Recreate\n",
            "    type: Recreate\n    rollingUpdate:\n      maxSurge: 1\n",
            "may not be specified when strategy `type` is 'Recreate'",
        ),
        ("              containerPort: 9095\n", "              containerPort: 70000\n", "70000"),
        # A misspelt field is refused, not silently dropped: by kubectl, against the API
        # server's OpenAPI schema (1.20 has no server-side field validation yet).
        ("          readinessProbe:\n", "          readinesProbe:\n", "readinesProbe"),
    ],
    ids=["rollingUpdate-with-Recreate", "port-out-of-range", "unknown-field"],
)
def test_an_invalid_manifest_is_refused(
    kube_cluster: KubeCluster,
    kubectl: Path,
    shipped_namespaces: set[str],
    tmp_path: Path,
    edit: str,
    replacement: str,
    refusal: str,
):
    out = dry_run(kube_cluster, kubectl, _broken_copy(tmp_path, edit, replacement))
    assert out.returncode != 0, out.stdout
    assert refusal in out.stderr, out.stderr
