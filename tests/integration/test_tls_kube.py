"""TLS Secrets on a real Kubernetes control plane: read, check, replace behind approval."""

from __future__ import annotations

import base64
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from kubernetes import client as k8s
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
)
from pydantic import SecretStr

from flows.cert_expiry import CertExpiryParams, SecretRef, cert_expiry
from flows.cert_replace import CertReplaceParams, cert_replace
from flows.common import md_escape
from tasks.errors import PermanentError, SafetyViolation
from tasks.tls import (
    NewPair,
    Severity,
    Thresholds,
    evaluate,
    read_secret_certificates,
    write_tls_secret,
)
from tests.fixtures.kube import KubeCluster
from tests.fixtures.prefect_runs import wait_for_paused_run
from tests.fixtures.tls import HOST, CertFactory, Issued

pytestmark = [pytest.mark.kube, pytest.mark.usefixtures("prefect_api")]

HOSTS = (HOST, "www.akig.example")


@pytest.fixture
def core(kube_cluster: KubeCluster, monkeypatch: pytest.MonkeyPatch) -> k8s.CoreV1Api:
    """Admin CoreV1Api; the tasks reach the same cluster through RUNBOOKS_K8S_*."""
    monkeypatch.setenv("RUNBOOKS_K8S_KUBECONFIG", str(kube_cluster.kubeconfig))
    monkeypatch.setenv("RUNBOOKS_K8S_ROLLOUT_TIMEOUT_S", "60")
    return k8s.CoreV1Api(kube_cluster.api())


def _tls_secret(core: k8s.CoreV1Api, ns: str, name: str, issued: Issued) -> None:
    core.create_namespaced_secret(
        ns,
        k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(
                name=name, annotations={"cert-manager.io/certificate-name": name}
            ),
            type="kubernetes.io/tls",
            string_data={
                "tls.crt": issued.chain_pem().decode(),
                "tls.key": issued.key_pem.decode(),
            },
        ),
    )


def _serial_in(core: k8s.CoreV1Api, ns: str, name: str) -> str:
    from cryptography import x509

    secret: Any = core.read_namespaced_secret(name, ns)
    pem = base64.b64decode(secret.data["tls.crt"])
    return format(x509.load_pem_x509_certificate(pem).serial_number, "x")


def _serial(issued: Issued) -> str:
    return format(issued.cert.serial_number, "x")


def _ingress(ns: str, kube_cluster: KubeCluster) -> None:
    apps = k8s.AppsV1Api(kube_cluster.api())
    labels = {"app": "ingress"}
    apps.create_namespaced_deployment(
        ns,
        k8s.V1Deployment(
            metadata=k8s.V1ObjectMeta(name="ingress"),
            spec=k8s.V1DeploymentSpec(
                replicas=1,
                selector=k8s.V1LabelSelector(match_labels=labels),
                template=k8s.V1PodTemplateSpec(
                    metadata=k8s.V1ObjectMeta(labels=labels),
                    spec=k8s.V1PodSpec(
                        containers=[k8s.V1Container(name="nginx", image="nginx:1.27")]
                    ),
                ),
            ),
        ),
    )


def _artifact(flow_run_id: UUID | None, key: str) -> Any:
    assert flow_run_id is not None
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return next(a.data for a in found if a.key == key)


def test_read_tls_secret(core: k8s.CoreV1Api, kube_namespace: str, pki: CertFactory) -> None:
    soon = pki.leaf(days_left=0.5, hosts=HOSTS)
    _tls_secret(core, kube_namespace, "akig-tls", soon)
    scan = read_secret_certificates(kube_namespace, "akig-tls")
    assert scan.source == f"{kube_namespace}/akig-tls"
    assert [c.serial for c in scan.certificates] == [_serial(soon), _serial(pki.intermediate)]
    assert scan.resource_version
    assert evaluate(scan.certificates[0], Thresholds()).severity is Severity.CRITICAL
    assert "PRIVATE" not in scan.model_dump_json()

    core.create_namespaced_secret(
        kube_namespace,
        k8s.V1Secret(metadata=k8s.V1ObjectMeta(name="opaque"), string_data={"a": "b"}),
    )
    with pytest.raises(PermanentError, match=r"of type 'Opaque', not kubernetes\.io/tls"):
        read_secret_certificates(kube_namespace, "opaque")
    with pytest.raises(PermanentError, match="answered 404"):
        read_secret_certificates(kube_namespace, "missing")


def test_cert_expiry_flow_checks_secrets(
    core: k8s.CoreV1Api, kube_namespace: str, pki: CertFactory
) -> None:
    _tls_secret(core, kube_namespace, "good", pki.leaf(days_left=60, hosts=HOSTS))
    _tls_secret(core, kube_namespace, "bad", pki.leaf(days_left=-1, hosts=HOSTS))
    params = CertExpiryParams(
        files=[],
        secrets=[
            SecretRef(namespace=kube_namespace, name="good"),
            SecretRef(namespace=kube_namespace, name="bad"),
            SecretRef(namespace=kube_namespace, name="gone"),
        ],
    )
    state = cert_expiry(params, return_state=True)
    assert state.is_failed()
    assert f"{kube_namespace}/bad: EXPIRED" in (state.message or "")
    checklist = _artifact(state.state_details.flow_run_id, "cert-emergency-checklist")
    assert f"kubectl -n {kube_namespace} get secret bad" in checklist
    report = _artifact(state.state_details.flow_run_id, "cert-expiry")
    assert f"{kube_namespace}/gone" in report
    assert "answered 404" in report


def test_write_refuses_a_stale_plan_and_backs_up(
    core: k8s.CoreV1Api, kube_namespace: str, pki: CertFactory
) -> None:
    old = pki.leaf(days_left=0.5, hosts=HOSTS)
    new = pki.leaf(days_left=90, hosts=HOSTS)
    _tls_secret(core, kube_namespace, "akig-tls", old)
    version = read_secret_certificates(kube_namespace, "akig-tls").resource_version
    assert version is not None
    pair = NewPair(cert_pem=new.chain_pem().decode(), key_pem=SecretStr(new.key_pem.decode()))

    # Someone (cert-manager) touches the Secret after the plan was made.
    core.patch_namespaced_secret(
        "akig-tls", kube_namespace, {"metadata": {"labels": {"touched": "yes"}}}
    )
    with pytest.raises(SafetyViolation, match="changed since the plan"):
        write_tls_secret(kube_namespace, "akig-tls", pair, version)
    assert _serial_in(core, kube_namespace, "akig-tls") == _serial(old)

    fresh = read_secret_certificates(kube_namespace, "akig-tls").resource_version
    assert fresh is not None
    done = write_tls_secret(kube_namespace, "akig-tls", pair, fresh)
    assert done.old_serial == _serial(old)
    assert done.new_serial == _serial(new)
    assert _serial_in(core, kube_namespace, "akig-tls") == _serial(new)
    assert done.backup_secret is not None
    backup: Any = core.read_namespaced_secret(done.backup_secret, kube_namespace)
    assert _serial_in(core, kube_namespace, done.backup_secret) == _serial(old)
    assert backup.metadata.labels["runbooks/backup-of"] == "akig-tls"
    assert not (backup.metadata.annotations or {})  # cert-manager must not adopt it
    live: Any = core.read_namespaced_secret("akig-tls", kube_namespace)
    assert live.metadata.annotations["cert-manager.io/certificate-name"] == "akig-tls"


def test_write_refuses_to_overwrite_an_existing_backup(
    core: k8s.CoreV1Api, kube_namespace: str, pki: CertFactory
) -> None:
    old = pki.leaf(days_left=0.5, hosts=HOSTS)
    new = pki.leaf(days_left=90, hosts=HOSTS)
    _tls_secret(core, kube_namespace, "akig-tls", old)
    _tls_secret(core, kube_namespace, "akig-tls-backup-1", old)
    version = read_secret_certificates(kube_namespace, "akig-tls").resource_version
    assert version is not None
    pair = NewPair(cert_pem=new.chain_pem().decode(), key_pem=SecretStr(new.key_pem.decode()))
    with pytest.raises(SafetyViolation, match="akig-tls-backup-1 already exists; nothing written"):
        write_tls_secret(kube_namespace, "akig-tls", pair, version, backup_name="akig-tls-backup-1")
    assert _serial_in(core, kube_namespace, "akig-tls") == _serial(old)


def _replace_params(ns: str, **kw: Any) -> CertReplaceParams:
    fields: dict[str, Any] = {
        "namespace": ns,
        "secret": "akig-tls",
        "new_secret": "akig-tls-new",
        "ingress_deployment": "ingress",
        "ingress_namespace": ns,
        "reason": "INC-7 cert expires tonight",
        "approval_timeout_s": 120,
    }
    fields.update(kw)
    return CertReplaceParams.model_validate(fields)


def test_replace_dry_run_and_refusal_change_nothing(
    core: k8s.CoreV1Api, kube_namespace: str, kube_cluster: KubeCluster, pki: CertFactory
) -> None:
    old = pki.leaf(days_left=0.5, hosts=HOSTS)
    _tls_secret(core, kube_namespace, "akig-tls", old)
    _ingress(kube_namespace, kube_cluster)

    _tls_secret(core, kube_namespace, "akig-tls-new", pki.leaf(days_left=90, hosts=HOSTS))
    reason = "INC-7 <img src=x onerror=alert(1)> **now** | `x`"
    dry = cert_replace(_replace_params(kube_namespace, reason=reason), return_state=True)
    out = dry.result()
    assert out.outcome == "planned"
    assert out.check.ok
    assert _serial_in(core, kube_namespace, "akig-tls") == _serial(old)
    dry_report = _artifact(dry.state_details.flow_run_id, "cert-replace")
    assert md_escape(reason) in dry_report  # text from outside is inert markdown
    assert re.search(r"(?<!\\)<img", dry_report) is None  # no live HTML tag

    _tls_secret(core, kube_namespace, "narrow", pki.leaf(days_left=90, hosts=(HOST,)))
    state = cert_replace(
        _replace_params(kube_namespace, new_secret="narrow", dry_run=False), return_state=True
    )
    assert state.is_failed()
    assert "does not cover: www.akig.example" in (state.message or "")
    assert _serial_in(core, kube_namespace, "akig-tls") == _serial(old)
    report = _artifact(state.state_details.flow_run_id, "cert-replace")
    assert "REFUSED" in report


def test_replace_after_approval_restarts_ingress_and_audits(
    core: k8s.CoreV1Api, kube_namespace: str, kube_cluster: KubeCluster, pki: CertFactory
) -> None:
    from prefect.flow_runs import resume_flow_run

    old = pki.leaf(days_left=0.5, hosts=HOSTS)
    new = pki.leaf(days_left=90, hosts=HOSTS)
    _tls_secret(core, kube_namespace, "akig-tls", old)
    _tls_secret(core, kube_namespace, "akig-tls-new", new)
    _ingress(kube_namespace, kube_cluster)

    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(
            cert_replace, _replace_params(kube_namespace, dry_run=False), return_state=True
        )
        run_id = wait_for_paused_run("cert-replace")
        # Nothing is written while the run waits for a human.
        assert _serial_in(core, kube_namespace, "akig-tls") == _serial(old)
        resume_flow_run(
            run_id, run_input={"approved": True, "approver": "alice", "reason": "INC-7"}
        )
        state = fut.result(timeout=180)
    assert state.is_completed(), state.message
    out = state.result()
    assert out.outcome == "acted"
    assert out.approver == "alice"
    assert _serial_in(core, kube_namespace, "akig-tls") == _serial(new)
    apps = k8s.AppsV1Api(kube_cluster.api())
    dep: Any = apps.read_namespaced_deployment("ingress", kube_namespace)
    assert "kubectl.kubernetes.io/restartedAt" in dep.spec.template.metadata.annotations

    assert out.replacement is not None
    report = _artifact(run_id, "cert-replace")
    for expected in ("alice", "INC-7", _serial(old), _serial(new), out.replacement.backup_secret):
        assert expected in report
    # Acted under the Secret's lock, after reading the Secret and the pair again.
    assert f"Held k8s:{kube_namespace}/secret/akig-tls" in report
    assert report.index("## Measured again") < report.index("## Undo record")
    key_line = new.key_pem.decode().splitlines()[1]
    assert key_line not in report


def test_refused_approval_changes_nothing(
    core: k8s.CoreV1Api, kube_namespace: str, kube_cluster: KubeCluster, pki: CertFactory
) -> None:
    from prefect.flow_runs import resume_flow_run

    old = pki.leaf(days_left=0.5, hosts=HOSTS)
    _tls_secret(core, kube_namespace, "akig-tls", old)
    _tls_secret(core, kube_namespace, "akig-tls-new", pki.leaf(days_left=90, hosts=HOSTS))
    _ingress(kube_namespace, kube_cluster)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(cert_replace, _replace_params(kube_namespace, dry_run=False))
        run_id = wait_for_paused_run("cert-replace")
        resume_flow_run(
            run_id, run_input={"approved": False, "approver": "bob", "reason": "wrong CA"}
        )
        out = fut.result(timeout=180)
    assert out.outcome == "refused"
    assert _serial_in(core, kube_namespace, "akig-tls") == _serial(old)
    secrets: Any = core.list_namespaced_secret(kube_namespace)
    names = [str(s.metadata.name) for s in secrets.items]
    assert "akig-tls-new" in names
    assert not [n for n in names if n.startswith("akig-tls-backup-")]
    apps = k8s.AppsV1Api(kube_cluster.api())
    dep: Any = apps.read_namespaced_deployment("ingress", kube_namespace)
    assert "kubectl.kubernetes.io/restartedAt" not in (dep.spec.template.metadata.annotations or {})
    report = _artifact(run_id, "cert-replace")
    assert "refused by **bob**" in report and "wrong CA" in report
    assert "self-declared" in report
    assert "not approved: nothing changed." in report


def _fingerprint(issued: Issued) -> str:
    from cryptography.hazmat.primitives import hashes

    return issued.cert.fingerprint(hashes.SHA256()).hex()


def _backups(core: k8s.CoreV1Api, ns: str) -> list[str]:
    secrets: Any = core.list_namespaced_secret(ns)
    return [str(s.metadata.name) for s in secrets.items if "-backup-" in str(s.metadata.name)]


def test_a_failure_after_the_write_leaves_the_undo_in_the_audit(
    core: k8s.CoreV1Api, kube_namespace: str, kube_cluster: KubeCluster, pki: CertFactory
) -> None:
    from prefect.flow_runs import resume_flow_run

    old = pki.leaf(days_left=0.5, hosts=HOSTS)
    new = pki.leaf(days_left=90, hosts=HOSTS)
    _tls_secret(core, kube_namespace, "akig-tls", old)
    _tls_secret(core, kube_namespace, "akig-tls-new", new)
    _ingress(kube_namespace, kube_cluster)
    apps = k8s.AppsV1Api(kube_cluster.api())
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(
            cert_replace, _replace_params(kube_namespace, dry_run=False), return_state=True
        )
        run_id = wait_for_paused_run("cert-replace")
        # A real failure in the step after the write: the ingress is gone meanwhile.
        apps.delete_namespaced_deployment("ingress", kube_namespace)
        resume_flow_run(run_id, run_input={"approved": True, "approver": "alice"})
        state = fut.result(timeout=180)
    assert state.is_failed()
    assert _serial_in(core, kube_namespace, "akig-tls") == _serial(new)
    (backup,) = _backups(core, kube_namespace)
    assert _serial_in(core, kube_namespace, backup) == _serial(old)
    report = _artifact(run_id, "cert-replace")
    assert _fingerprint(old) in report  # every previous value: the undo
    assert "## Stopped" in report
    assert "The Secret may have been changed" in report
    assert _serial(old) in report
    assert f"{kube_namespace}/{backup}" in report
    assert f"kubectl -n {kube_namespace} get secret {backup} -o json" in report


def test_a_change_while_waiting_for_approval_stops_the_write(
    core: k8s.CoreV1Api, kube_namespace: str, kube_cluster: KubeCluster, pki: CertFactory
) -> None:
    from prefect.flow_runs import resume_flow_run

    old = pki.leaf(days_left=0.5, hosts=HOSTS)
    _tls_secret(core, kube_namespace, "akig-tls", old)
    _tls_secret(core, kube_namespace, "akig-tls-new", pki.leaf(days_left=90, hosts=HOSTS))
    _ingress(kube_namespace, kube_cluster)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(
            cert_replace, _replace_params(kube_namespace, dry_run=False), return_state=True
        )
        run_id = wait_for_paused_run("cert-replace")
        # cert-manager renews the Secret while the run waits for a human.
        core.patch_namespaced_secret(
            "akig-tls", kube_namespace, {"metadata": {"labels": {"renewed": "yes"}}}
        )
        resume_flow_run(run_id, run_input={"approved": True, "approver": "alice"})
        state = fut.result(timeout=180)
    # Measured again under the lock: the approved version no longer holds, nothing written.
    assert state.is_completed(), state.message
    assert state.result().outcome == "skipped"
    assert _serial_in(core, kube_namespace, "akig-tls") == _serial(old)
    assert _backups(core, kube_namespace) == []
    report = _artifact(run_id, "cert-replace")
    assert "changed since the plan" in report
    assert _fingerprint(old) in report


@pytest.mark.parametrize("source", ["secret", "files"])
def test_a_pair_swapped_while_waiting_for_approval_is_not_installed(
    source: str,
    core: k8s.CoreV1Api,
    kube_namespace: str,
    kube_cluster: KubeCluster,
    pki: CertFactory,
    tmp_path: Path,
) -> None:
    from prefect.flow_runs import resume_flow_run

    old = pki.leaf(days_left=0.5, hosts=HOSTS)
    approved = pki.leaf(days_left=90, hosts=HOSTS)
    # Valid in every way the validation checks: only the approval tells them apart.
    swapped = pki.leaf(days_left=60, hosts=HOSTS)
    _tls_secret(core, kube_namespace, "akig-tls", old)
    _ingress(kube_namespace, kube_cluster)
    cert_file, key_file = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    if source == "secret":
        _tls_secret(core, kube_namespace, "akig-tls-new", approved)
        params = _replace_params(kube_namespace, dry_run=False)
    else:
        cert_file.write_bytes(approved.chain_pem())
        key_file.write_bytes(approved.key_pem)
        params = _replace_params(
            kube_namespace,
            dry_run=False,
            new_secret=None,
            new_cert_file=str(cert_file),
            new_key_file=str(key_file),
        )
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(cert_replace, params, return_state=True)
        run_id = wait_for_paused_run("cert-replace")
        # Someone stages another pair while the approver reads the plan.
        if source == "secret":
            core.delete_namespaced_secret("akig-tls-new", kube_namespace)
            _tls_secret(core, kube_namespace, "akig-tls-new", swapped)
        else:
            cert_file.write_bytes(swapped.chain_pem())
            key_file.write_bytes(swapped.key_pem)
        resume_flow_run(run_id, run_input={"approved": True, "approver": "alice"})
        state = fut.result(timeout=180)
    assert state.is_completed(), state.message
    assert state.result().outcome == "skipped"
    assert _serial_in(core, kube_namespace, "akig-tls") == _serial(old)
    assert _backups(core, kube_namespace) == []
    dep: Any = k8s.AppsV1Api(kube_cluster.api()).read_namespaced_deployment(
        "ingress", kube_namespace
    )
    assert "kubectl.kubernetes.io/restartedAt" not in (dep.spec.template.metadata.annotations or {})
    report = _artifact(run_id, "cert-replace")
    assert "changed since it was approved" in report
    assert f"{_fingerprint(approved)} → {_fingerprint(swapped)}" in report
    assert "## Undo record" not in report
    assert "Nothing was changed." in report


def test_write_installs_only_the_approved_pair(
    core: k8s.CoreV1Api, kube_namespace: str, pki: CertFactory
) -> None:
    """The write itself compares: a swap after the flow's re-read is refused too."""
    old = pki.leaf(days_left=0.5, hosts=HOSTS)
    approved = pki.leaf(days_left=90, hosts=HOSTS)
    swapped = pki.leaf(days_left=60, hosts=HOSTS)
    _tls_secret(core, kube_namespace, "akig-tls", old)
    version = read_secret_certificates(kube_namespace, "akig-tls").resource_version
    assert version is not None
    pair = NewPair(
        cert_pem=swapped.chain_pem().decode(), key_pem=SecretStr(swapped.key_pem.decode())
    )
    with pytest.raises(SafetyViolation, match="changed since it was approved"):
        write_tls_secret(
            kube_namespace,
            "akig-tls",
            pair,
            version,
            approved_fingerprints=[_fingerprint(approved)],
        )
    assert _serial_in(core, kube_namespace, "akig-tls") == _serial(old)
    assert _backups(core, kube_namespace) == []


def test_a_missing_ingress_stops_the_run_before_approval(
    core: k8s.CoreV1Api, kube_namespace: str, pki: CertFactory
) -> None:
    old = pki.leaf(days_left=0.5, hosts=HOSTS)
    _tls_secret(core, kube_namespace, "akig-tls", old)
    _tls_secret(core, kube_namespace, "akig-tls-new", pki.leaf(days_left=90, hosts=HOSTS))
    # No ingress Deployment: asking for approval would only lead to a half-done change.
    state = cert_replace(
        _replace_params(kube_namespace, dry_run=False, approval_timeout_s=10), return_state=True
    )
    assert state.is_failed()
    assert _serial_in(core, kube_namespace, "akig-tls") == _serial(old)
    report = _artifact(state.state_details.flow_run_id, "cert-replace")
    assert "## Approval" not in report
    assert "Nothing was changed." in report


def test_an_approval_timeout_changes_nothing_and_is_recorded(
    core: k8s.CoreV1Api, kube_namespace: str, kube_cluster: KubeCluster, pki: CertFactory
) -> None:
    old = pki.leaf(days_left=0.5, hosts=HOSTS)
    _tls_secret(core, kube_namespace, "akig-tls", old)
    _tls_secret(core, kube_namespace, "akig-tls-new", pki.leaf(days_left=90, hosts=HOSTS))
    _ingress(kube_namespace, kube_cluster)
    state = cert_replace(
        _replace_params(kube_namespace, dry_run=False, approval_timeout_s=10), return_state=True
    )
    # A timed-out approval is a refusal: Completed, not Failed by Prefect's "never resumed".
    assert state.is_completed()
    assert _serial_in(core, kube_namespace, "akig-tls") == _serial(old)
    assert _backups(core, kube_namespace) == []
    report = _artifact(state.state_details.flow_run_id, "cert-replace")
    assert "no answer within 10 s" in report
    assert "not approved: nothing changed." in report
    assert _fingerprint(old) in report
