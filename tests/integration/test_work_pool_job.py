"""The Job the work pool's base job template renders for each runbook passes a server dry run.

deployments/k8s/work-pool/base-job-template.json is rendered with every deployment's job
variables by Prefect's own templating (tests/fixtures/work_pool.py), completed as the
prefect-kubernetes worker completes it, and created with `kubectl create --dry-run=server`
(kubectl 1.27) against the test kube-apiserver 1.20, in a namespace of its own where the
runbooks' ServiceAccounts (from the RBAC kustomization, deployments/k8s) and the settings
Secret exist. Renderings with one bad field are refused.

prefect-kubernetes' own default template puts `parallelism` and `completions` in the pod
spec, where the Job's schema has no such fields, and the worker refuses a template without
them; the API server drops unknown fields (1.20 has no server-side field validation), so the
Job as the worker sends it is created with `--validate=false` and the returned object is
checked, and the same Job without those two fields passes kubectl's schema validation.
"""

from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from deployments.catalog import RUNBOOKS
from tests.fixtures.kube import KubeCluster
from tests.fixtures.kustomize import MANIFESTS
from tests.fixtures.work_pool import (
    IMAGE,
    SETTINGS_SECRET,
    as_worker_sends,
    deployments,
    job_manifest,
    job_variables,
    template,
)

pytestmark = pytest.mark.kube

DEPLOYMENTS = deployments()
SERVICE_ACCOUNTS = {rb.name: rb.service_account for rb in RUNBOOKS}
#: prefect-kubernetes requires them in the pod spec; the Job schema has them on the Job.
WORKER_ONLY_POD_FIELDS = ("parallelism", "completions")


def _kubectl(
    kube: KubeCluster, kubectl: Path, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """kubectl as the cluster admin."""
    return subprocess.run(
        [str(kubectl), f"--kubeconfig={kube.kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def runs_namespace(kube_cluster: KubeCluster, kubectl: Path) -> Iterator[str]:
    """A namespace holding the runbooks' ServiceAccounts and the settings Secret."""
    core: Any = k8s.CoreV1Api(kube_cluster.api())
    ns = f"t-jobs-{uuid.uuid4().hex[:6]}"
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=ns)))
    built = _kubectl(kube_cluster, kubectl, "kustomize", str(MANIFESTS))
    assert built.returncode == 0, built.stderr
    accounts = [d for d in yaml.safe_load_all(built.stdout) if d and d["kind"] == "ServiceAccount"]
    for account in accounts:
        account["metadata"]["namespace"] = ns
    created = _kubectl(
        kube_cluster, kubectl, "apply", "-f", "-", stdin=yaml.safe_dump_all(accounts)
    )
    assert created.returncode == 0, created.stderr
    # Keys only, placeholder values: the dry run checks the reference, not the settings.
    core.create_namespaced_secret(
        ns,
        k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name=SETTINGS_SECRET),
            string_data={"RUNBOOKS_PG_DSN": "placeholder", "RUNBOOKS_REDIS_URL": "placeholder"},
        ),
    )
    yield ns
    with contextlib.suppress(ApiException):
        core.delete_namespace(ns)


@pytest.fixture(autouse=True)
def _image(monkeypatch: pytest.MonkeyPatch) -> None:
    """`prefect deploy` reads `{{ $RUNBOOKS_IMAGE }}` from the environment."""
    monkeypatch.setenv("RUNBOOKS_IMAGE", IMAGE)


def _job(deployment: dict[str, Any], namespace: str, base: dict[str, Any] | None = None) -> Any:
    """The Job a run of `deployment` gets, in `namespace` (the job variable an operator sets)."""
    values = {**job_variables(deployment), "namespace": namespace}
    return as_worker_sends(job_manifest(values, base), f"{deployment['name']}-run")


def _create_dry_run(
    kube: KubeCluster, kubectl: Path, tmp_path: Path, job: dict[str, Any], *, validate: bool
) -> subprocess.CompletedProcess[str]:
    """`kubectl create --dry-run=server` of `job`, with or without kubectl's schema check."""
    path = tmp_path / f"{job['metadata']['name']}-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps(job))
    return _kubectl(
        kube,
        kubectl,
        "create",
        "--dry-run=server",
        f"--validate={str(validate).lower()}",
        "-o",
        "json",
        "-f",
        str(path),
    )


def _without_worker_only_fields(job: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(job)
    for key in WORKER_ONLY_POD_FIELDS:
        del out["spec"]["template"]["spec"][key]
    return out


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_every_runbooks_job_passes_a_server_dry_run(
    kube_cluster: KubeCluster,
    kubectl: Path,
    runs_namespace: str,
    tmp_path: Path,
    deployment: dict[str, Any],
) -> None:
    job = _job(deployment, runs_namespace)
    sent = _create_dry_run(kube_cluster, kubectl, tmp_path, job, validate=False)
    assert sent.returncode == 0, sent.stderr
    admitted = json.loads(sent.stdout)
    pod = admitted["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert admitted["metadata"]["namespace"] == runs_namespace
    assert pod["serviceAccountName"] == SERVICE_ACCOUNTS[deployment["name"]]
    assert container["envFrom"] == [{"secretRef": {"name": SETTINGS_SECRET}}]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    # The two fields the worker insists on were dropped by the server, nothing else.
    assert not set(WORKER_ONLY_POD_FIELDS) & set(pod)
    assert admitted["spec"]["backoffLimit"] == 0
    # Everything else is what the Job schema knows (kubectl's strict client-side check).
    strict = _create_dry_run(
        kube_cluster, kubectl, tmp_path, _without_worker_only_fields(job), validate=True
    )
    assert strict.returncode == 0, strict.stderr
    # A dry run stores nothing.
    stored = _kubectl(kube_cluster, kubectl, "-n", runs_namespace, "get", "jobs", "-o", "name")
    assert stored.returncode == 0 and stored.stdout.strip() == "", stored.stdout


def test_kubectl_refuses_the_worker_only_fields_under_strict_validation(
    kube_cluster: KubeCluster, kubectl: Path, runs_namespace: str, tmp_path: Path
) -> None:
    # Why the dry run above validates a copy without them: they are unknown in a PodSpec.
    job = _job(DEPLOYMENTS[0], runs_namespace)
    out = _create_dry_run(kube_cluster, kubectl, tmp_path, job, validate=True)
    assert out.returncode != 0
    assert 'unknown field "completions"' in out.stderr, out.stderr


def _broken_template(edit: str) -> dict[str, Any]:
    """The shipped template with one field of the Job's pod made wrong."""
    base = template()
    pod = base["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    if edit == "misspelt-field":
        context = container["securityContext"]
        context["readOnlyRootFileSystem"] = context.pop("readOnlyRootFilesystem")
    elif edit == "restart-always":
        pod["restartPolicy"] = "Always"
    elif edit == "negative-uid":
        pod["securityContext"]["runAsUser"] = -1
    elif edit == "mount-without-volume":
        del pod["volumes"]
    else:
        raise AssertionError(edit)
    return base


@pytest.mark.parametrize(
    ("edit", "validate", "refusal"),
    [
        # A misspelt field is refused by kubectl against the server's schema, not dropped.
        ("misspelt-field", True, 'unknown field "readOnlyRootFileSystem"'),
        # Valid schema, refused by the API server's own validation.
        ("restart-always", False, 'valid values: "OnFailure", "Never"'),
        ("negative-uid", False, "runAsUser"),
        ("mount-without-volume", False, 'volumeMounts[0].name: Not found: "tmp"'),
    ],
)
def test_a_bad_rendering_is_refused(
    kube_cluster: KubeCluster,
    kubectl: Path,
    runs_namespace: str,
    tmp_path: Path,
    edit: str,
    validate: bool,
    refusal: str,
) -> None:
    deployment = next(d for d in DEPLOYMENTS if d["name"] == "cert-renew")
    job = _without_worker_only_fields(_job(deployment, runs_namespace, _broken_template(edit)))
    out = _create_dry_run(kube_cluster, kubectl, tmp_path, job, validate=validate)
    assert out.returncode != 0, out.stdout
    assert refusal in out.stderr, out.stderr


def test_a_bad_job_variable_is_refused(
    kube_cluster: KubeCluster, kubectl: Path, runs_namespace: str, tmp_path: Path
) -> None:
    # A ServiceAccount name no object may have reaches the server through the template.
    deployment = copy.deepcopy(next(d for d in DEPLOYMENTS if d["name"] == "cert-renew"))
    deployment["work_pool"]["job_variables"]["service_account_name"] = "Cert_Renew"
    job = _without_worker_only_fields(_job(deployment, runs_namespace))
    out = _create_dry_run(kube_cluster, kubectl, tmp_path, job, validate=True)
    assert out.returncode != 0, out.stdout
    assert "serviceAccountName" in out.stderr, out.stderr
