"""deployments/k8s: every manifest is built by a kustomization, and the receiver's are sound.

The server-side validation of what the kustomizations build is
tests/integration/test_k8s_manifests.py; this file checks, without a cluster, that nothing
escapes it (a YAML file no kustomization lists would never be validated nor applied), and
what the receiver's Deployment promises: one pod on its own journal, secrets only from
Secrets, env var names the code reads, a second receiver behind the same Service.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from deployments.settings import ReceiverSettings
from tasks.approvals.signing import ApprovalSettings
from tests.fixtures.kube import oldest_kubectl, skip_or_fail
from tests.fixtures.kustomize import (
    KUSTOMIZATION,
    MANIFESTS,
    applied_roots,
    kustomization_dirs,
    reached_files,
    render,
)

RECEIVER = MANIFESTS / "receiver"
NAME_LABEL = "app.kubernetes.io/name"


def _doc(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    assert isinstance(doc, dict)
    return doc


DEPLOYMENT = _doc(RECEIVER / "instance" / "deployment.yaml")
POD = DEPLOYMENT["spec"]["template"]["spec"]
(CONTAINER,) = POD["containers"]
ENV = {e["name"]: e for e in CONTAINER["env"]}


def test_every_manifest_is_built_by_a_kustomization() -> None:
    reached = {f for d in kustomization_dirs() for f in reached_files(d)}
    on_disk = {p.resolve() for p in MANIFESTS.rglob("*.yaml")}
    kustomizations = {p.resolve() for p in MANIFESTS.rglob(KUSTOMIZATION)}
    assert sorted(on_disk - kustomizations - reached) == []
    assert reached <= on_disk, "a kustomization lists a file that does not exist"


def test_a_folder_no_root_builds_is_caught(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("kind: ServiceAccount\n")
    (tmp_path / KUSTOMIZATION).write_text("resources: [a.yaml, sub]\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / KUSTOMIZATION).write_text("resources: [b.yaml]\n")
    (tmp_path / "sub" / "b.yaml").write_text("kind: ServiceAccount\n")
    (tmp_path / "stray.yaml").write_text("kind: ServiceAccount\n")
    reached = reached_files(tmp_path)
    assert (tmp_path / "sub" / "b.yaml").resolve() in reached
    assert (tmp_path / "stray.yaml").resolve() not in reached
    assert applied_roots(tmp_path) == [tmp_path]


def test_the_applied_kustomizations() -> None:
    roots = {str(d.relative_to(MANIFESTS)) for d in applied_roots()}
    assert roots == {".", "ingress", "receiver", "receiver/second", "work-pool"}


def test_one_receiver_pod_ever_opens_its_journal() -> None:
    spec = DEPLOYMENT["spec"]
    assert spec["replicas"] == 1
    # RollingUpdate would start the new pod while the old one still holds the SQLite file.
    assert spec["strategy"] == {"type": "Recreate"}
    pvc = _doc(RECEIVER / "instance" / "pvc.yaml")
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    (claim,) = [v for v in POD["volumes"] if "persistentVolumeClaim" in v]
    assert claim["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    (mount,) = [m for m in CONTAINER["volumeMounts"] if m["name"] == claim["name"]]
    journal = Path(ENV["RUNBOOKS_RECEIVER_JOURNAL_PATH"]["value"])
    assert journal.parent == Path(mount["mountPath"])


def test_env_names_are_settings_the_code_reads() -> None:
    read = {f"RUNBOOKS_RECEIVER_{f}".upper() for f in ReceiverSettings.model_fields}
    read |= {f"RUNBOOKS_APPROVAL_{f}".upper() for f in ApprovalSettings.model_fields}
    read |= {"PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "PREFECT_HOME"}
    assert set(ENV) <= read
    assert ENV["RUNBOOKS_RECEIVER_POOL_SIZE"]["value"] == "0"  # runs are the worker's Jobs
    assert ENV["RUNBOOKS_RECEIVER_HOST"]["value"] == "0.0.0.0"  # noqa: S104 - a pod's IP
    assert ReceiverSettings.model_fields["host"].default == "127.0.0.1"


def test_credentials_only_from_secrets() -> None:
    secrets = (
        "RUNBOOKS_RECEIVER_TOKEN",
        "PREFECT_API_AUTH_STRING",
        "RUNBOOKS_APPROVAL_SIGNING_KEY",
    )
    for name in secrets:
        assert "value" not in ENV[name], name
        assert ENV[name]["valueFrom"]["secretKeyRef"]["name"], name
    assert not any("basic_password" in n.lower() for n in ENV)


def test_port_probes_and_service_agree() -> None:
    port = int(ENV["RUNBOOKS_RECEIVER_PORT"]["value"])
    (container_port,) = CONTAINER["ports"]
    assert container_port["containerPort"] == port
    service = _doc(RECEIVER / "service.yaml")
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["targetPort"] == container_port["name"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = CONTAINER[probe]["httpGet"]
        assert (get["path"], get["port"]) == ("/healthz", container_port["name"]), probe


def test_least_privilege_pod() -> None:
    assert POD["securityContext"]["runAsNonRoot"] is True
    assert POD["automountServiceAccountToken"] is False
    account = _doc(RECEIVER / "serviceaccount.yaml")
    assert account["automountServiceAccountToken"] is False
    assert POD["serviceAccountName"] == account["metadata"]["name"]
    sc = CONTAINER["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(CONTAINER["resources"]) == {"requests", "limits"}
    # No Role binds the receiver's account anywhere under deployments/k8s.
    for path in MANIFESTS.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            for subject in (doc or {}).get("subjects", []):
                assert subject["name"] != account["metadata"]["name"], path


def _render(folder: Path) -> list[dict[str, Any]]:
    kubectl = oldest_kubectl()
    if kubectl is None:
        skip_or_fail("no versioned kubectl to run `kubectl kustomize` with")
        raise AssertionError("unreachable")
    return render(kubectl, folder)


def _by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), kinds
    return {d["kind"]: d for d in docs}


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_a_second_receiver_has_its_own_journal_behind_the_same_service() -> None:
    first = _by_kind(_render(RECEIVER))
    second = _by_kind(_render(RECEIVER / "second"))
    assert set(first) == {"ServiceAccount", "Service", "PersistentVolumeClaim", "Deployment"}
    # Only the per-receiver part is copied; the Service and ServiceAccount keep their names.
    assert set(second) == {"PersistentVolumeClaim", "Deployment"}
    a, b = first["Deployment"], second["Deployment"]
    assert b["metadata"]["name"] == a["metadata"]["name"] + "-b"
    assert second["PersistentVolumeClaim"]["metadata"]["name"] == "receiver-journal-b"
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for d in (a, b)
        for v in d["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == ["receiver-journal", "receiver-journal-b"]
    pod_b = b["spec"]["template"]["spec"]
    assert pod_b["serviceAccountName"] == first["ServiceAccount"]["metadata"]["name"]
    assert {d["metadata"]["namespace"] for d in [*first.values(), *second.values()]} == {"default"}
    # One Service reaches both; neither Deployment owns the other's pods.
    service = first["Service"]["spec"]["selector"]
    labels_a = a["spec"]["template"]["metadata"]["labels"]
    labels_b = b["spec"]["template"]["metadata"]["labels"]
    assert _selects(service, labels_a) and _selects(service, labels_b)
    assert not _selects(a["spec"]["selector"]["matchLabels"], labels_b)
    assert not _selects(b["spec"]["selector"]["matchLabels"], labels_a)
    assert b["spec"]["strategy"] == {"type": "Recreate"} and b["spec"]["replicas"] == 1


def test_runs_rights_and_receivers_share_one_namespace() -> None:
    # The worker starts each run's Job in prefect.yaml's namespace under the runbook's
    # ServiceAccount, which deployments/k8s creates: the two must agree, and the receivers
    # sit beside them (docs/scale-out-kubernetes.md installs the worker chart there too).
    prefect_yaml = yaml.safe_load((MANIFESTS.parent / "prefect.yaml").read_text())
    jobs = {d["work_pool"]["job_variables"]["namespace"] for d in prefect_yaml["deployments"]}
    kustomized = {
        _doc(MANIFESTS / rel / KUSTOMIZATION)["namespace"]
        for rel in (".", "receiver", "receiver/second")
    }
    assert jobs == kustomized == {"default"}
