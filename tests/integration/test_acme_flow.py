"""`cert-renew` against a real Pebble (ACME, real HTTP-01 validation) and a real Kubernetes
API server: order, stage, approve, replace, restart, and the live endpoint serves it; every
failure ends with a clear verdict and nothing changed."""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from cryptography import x509
from kubernetes import client as k8s
from prefect.blocks.system import Secret
from prefect.flow_runs import resume_flow_run
from prefect.variables import Variable

from flows.cert_renew import CertRenewParams, cert_renew
from flows.common import md_escape
from tasks.acme import Http01Responder, issuance_variable, issue_certificate, last_issuances
from tasks.tls import RevocationConfig, fetch_endpoint
from tests.fixtures.acme import Pebble, SecretIngress
from tests.fixtures.kube import KubeCluster, free_port
from tests.fixtures.prefect_runs import flow_run_logs, wait_for_paused_run
from tests.fixtures.tls import CertFactory, Issued
from tests.integration.test_tls_kube import _artifact, _ingress, _serial_in

pytestmark = [pytest.mark.kube, pytest.mark.usefixtures("prefect_api")]


@pytest.fixture
def core(kube_cluster: KubeCluster, monkeypatch: pytest.MonkeyPatch) -> k8s.CoreV1Api:
    """Admin CoreV1Api; the tasks reach the same cluster through RUNBOOKS_K8S_*."""
    monkeypatch.setenv("RUNBOOKS_K8S_KUBECONFIG", str(kube_cluster.kubeconfig))
    monkeypatch.setenv("RUNBOOKS_K8S_ROLLOUT_TIMEOUT_S", "60")
    return k8s.CoreV1Api(kube_cluster.api())


def _hosts(ns: str) -> tuple[str, str]:
    # Unique per test: the once-a-day record is per name and outlives the namespace.
    return (f"{ns}.example.test", f"www.{ns}.example.test")


def _manual_secret(
    core: k8s.CoreV1Api, ns: str, issued: Issued, name: str = "app-tls", **meta: Any
) -> None:
    core.create_namespaced_secret(
        ns,
        k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name=name, **meta),
            type="kubernetes.io/tls",
            string_data={
                "tls.crt": issued.chain_pem().decode(),
                "tls.key": issued.key_pem.decode(),
            },
        ),
    )


def _params(ns: str, **kw: Any) -> CertRenewParams:
    fields: dict[str, Any] = {
        "namespace": ns,
        "secret": "app-tls",
        "ingress_deployment": "ingress",
        "ingress_namespace": ns,
        "reason": "INC-13 cert expires in hours",
        "approval_timeout_s": 120,
        "verify_timeout_s": 30,
    }
    fields.update(kw)
    return CertRenewParams.model_validate(fields)


def _secret_names(core: k8s.CoreV1Api, ns: str) -> list[str]:
    secrets: Any = core.list_namespaced_secret(ns)
    return sorted(str(s.metadata.name) for s in secrets.items if s.type == "kubernetes.io/tls")


@pytest.fixture
def ingress(
    core: k8s.CoreV1Api, kube_cluster: KubeCluster, kube_namespace: str, pki: CertFactory
) -> Iterator[tuple[SecretIngress, Issued]]:
    """A soon-expiring manual TLS Secret, its ingress Deployment and the live endpoint."""
    old = pki.leaf(days_left=0.5, hosts=_hosts(kube_namespace))
    _manual_secret(core, kube_namespace, old)
    _ingress(kube_namespace, kube_cluster)
    live = SecretIngress(kube_cluster.api(), kube_namespace, "app-tls", "ingress")
    yield live, old
    live.close()


def _unchanged(core: k8s.CoreV1Api, ns: str, old: Issued) -> None:
    """Nothing changed: the Secret holds the old pair, nothing staged or backed up, no
    restart, and no issuance recorded (a later run is not blocked)."""
    assert _serial_in(core, ns, "app-tls") == format(old.cert.serial_number, "x")
    assert _secret_names(core, ns) == ["app-tls"]
    dep: Any = k8s.AppsV1Api(core.api_client).read_namespaced_deployment("ingress", ns)
    assert "kubectl.kubernetes.io/restartedAt" not in (dep.spec.template.metadata.annotations or {})
    assert last_issuances.fn(list(_hosts(ns))) == []


def test_http01_order_with_the_runbook_responder(
    pebble: Pebble, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tasks layer alone: a real order, validated over HTTP-01 by Pebble (~1 s)."""
    pebble.env(monkeypatch)
    responder = Http01Responder("127.0.0.1", pebble.http_port)
    responder.start()
    names = ["tasks.example.test", "www.tasks.example.test"]
    issued, key = issue_certificate(names, responder)
    assert responder.requests_served >= 2  # Pebble fetched both tokens from us
    leaf = x509.load_pem_x509_certificate(issued.fullchain_pem.encode())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(sans.get_values_for_type(x509.DNSName)) == sorted(names)
    assert issued.serial == format(leaf.serial_number, "x")
    assert "PRIVATE KEY" in key.get_secret_value()
    assert "PRIVATE" not in issued.model_dump_json()
    assert issued.elapsed_s < 30
    print(f"\nPebble issuance (account, order, 2 x HTTP-01, finalize): {issued.elapsed_s:.2f} s")
    # The responder is gone once the order is done: nothing keeps listening on port 80.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", pebble.http_port), 1).close()
    # The account key was created on first use, as a Secret block, and is reused after.
    block: Any = Secret.load("acme-test-account")
    assert "PRIVATE KEY" in block.get()


def test_emergency_certificate_end_to_end(
    pebble: Pebble,
    monkeypatch: pytest.MonkeyPatch,
    core: k8s.CoreV1Api,
    kube_namespace: str,
    ingress: tuple[SecretIngress, Issued],
) -> None:
    pebble.env(monkeypatch)
    live, old = ingress
    ns = kube_namespace
    endpoint = f"{_hosts(ns)[0]}@127.0.0.1:{live.port}"
    before = fetch_endpoint(endpoint, revocation=RevocationConfig.off())
    assert before.certificates[0].serial == format(old.cert.serial_number, "x")

    dry = cert_renew(_params(ns, endpoints=[endpoint]), return_state=True)
    assert dry.result().outcome == "planned"
    _unchanged(core, ns, old)  # the dry run ordered nothing

    started = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(
            cert_renew, _params(ns, endpoints=[endpoint], dry_run=False), return_state=True
        )
        run_id = wait_for_paused_run("cert-renew")
        # Issued and staged before approval; the live Secret is untouched while we wait.
        assert _serial_in(core, ns, "app-tls") == format(old.cert.serial_number, "x")
        staged = "app-tls-acme"
        assert staged in _secret_names(core, ns)
        staged_obj: Any = core.read_namespaced_secret(staged, ns)
        assert staged_obj.metadata.labels["runbooks/runbook"] == "cert-renew"
        assert not [k for k in staged_obj.metadata.annotations if k.startswith("cert-manager")]
        resume_flow_run(run_id, run_input={"approved": True, "approver": "alice"})
        state = fut.result(timeout=180)
    elapsed = time.monotonic() - started
    assert state.is_completed(), state.message
    out = state.result()
    assert out.outcome == "acted"
    assert out.issued is not None
    new_serial = out.issued.serial
    assert _serial_in(core, ns, "app-tls") == new_serial
    assert _serial_in(core, ns, staged) == new_serial
    pem = base64.b64decode(staged_obj.data["tls.crt"])
    issuer = x509.load_pem_x509_certificate(pem).issuer.rfc4514_string()
    assert "Pebble" in issuer  # issued by the ACME CA, not by our test PKI
    backups = [n for n in _secret_names(core, ns) if "-backup-" in n]
    assert len(backups) == 1
    assert _serial_in(core, ns, backups[0]) == format(old.cert.serial_number, "x")
    # The live endpoint serves the new certificate (after the restart, not before).
    (check,) = out.live
    assert check.serving_new
    assert check.serial == new_serial
    assert live.reloads == 2  # the old pair, then the new one after the restart

    report = _artifact(run_id, "cert-renew")
    for expected in (new_serial, "alice", backups[0], "Live endpoints", "Issued and staged"):
        assert expected in report
    key_line = base64.b64decode(staged_obj.data["tls.key"]).decode().splitlines()[1]
    assert key_line not in report
    assert key_line not in out.model_dump_json()
    logs = flow_run_logs(run_id)
    assert any(new_serial in line for line in logs)  # the logs were read, and hold no key
    assert not [line for line in logs if key_line in line or "PRIVATE KEY" in line]
    print(f"\ncert-renew end to end (order → approval → replace → live): {elapsed:.1f} s")

    # Once per name per day: a second emergency run is refused before any order.
    again = cert_renew(_params(ns, endpoints=[endpoint], dry_run=False), return_state=True)
    assert again.is_completed(), again.message
    assert again.result().outcome == "refused"
    assert len([n for n in _secret_names(core, ns) if n.startswith("app-tls-acme")]) == 1
    assert _serial_in(core, ns, "app-tls") == new_serial
    report = _artifact(again.state_details.flow_run_id, "cert-renew")
    assert "Once per name per day" in report
    assert "already issued within the last day" in report
    assert "Nothing was changed." in report


def test_a_failed_challenge_changes_nothing(
    pebble: Pebble,
    monkeypatch: pytest.MonkeyPatch,
    core: k8s.CoreV1Api,
    kube_namespace: str,
    ingress: tuple[SecretIngress, Issued],
) -> None:
    # Our responder listens where Pebble does not look: the validation really fails.
    pebble.env(monkeypatch, http01_port=free_port())
    _, old = ingress
    state = cert_renew(_params(kube_namespace, dry_run=False), return_state=True)
    assert state.is_failed()
    assert "challenge validation failed for" in (state.message or "")
    assert "connection" in (state.message or "").lower()
    _unchanged(core, kube_namespace, old)
    report = _artifact(state.state_details.flow_run_id, "cert-renew")
    assert "Nothing was changed in the cluster" in report


def test_the_ca_refusing_changes_nothing(
    pebble_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
    core: k8s.CoreV1Api,
    kube_namespace: str,
    ingress: tuple[SecretIngress, Issued],
) -> None:
    refusing: Pebble = pebble_factory(PEBBLE_WFE_NONCEREJECT="100")
    refusing.env(monkeypatch)
    _, old = ingress
    state = cert_renew(_params(kube_namespace, dry_run=False), return_state=True)
    assert state.is_failed()
    assert "the CA refused (badNonce" in (state.message or "")
    _unchanged(core, kube_namespace, old)


def test_the_ca_down_changes_nothing(
    pebble: Pebble,
    monkeypatch: pytest.MonkeyPatch,
    core: k8s.CoreV1Api,
    kube_namespace: str,
    ingress: tuple[SecretIngress, Issued],
    closed_port: int,
) -> None:
    pebble.env(monkeypatch)
    monkeypatch.setenv("RUNBOOKS_ACME_DIRECTORY_URL", f"https://127.0.0.1:{closed_port}/dir")
    _, old = ingress
    state = cert_renew(_params(kube_namespace, dry_run=False), return_state=True)
    assert state.is_failed()
    assert "ACME server unreachable" in (state.message or "")
    _unchanged(core, kube_namespace, old)


@pytest.mark.parametrize("how", ["owner", "annotation"])
def test_a_cert_manager_secret_is_not_replaced(
    how: str,
    pebble: Pebble,
    monkeypatch: pytest.MonkeyPatch,
    core: k8s.CoreV1Api,
    kube_cluster: KubeCluster,
    kube_namespace: str,
    pki: CertFactory,
) -> None:
    pebble.env(monkeypatch)
    ns = kube_namespace
    old = pki.leaf(days_left=0.5, hosts=_hosts(ns))
    meta: dict[str, Any] = (
        {
            "owner_references": [
                k8s.V1OwnerReference(
                    api_version="cert-manager.io/v1",
                    kind="Certificate",
                    name="app-cert",
                    uid="6a4f5a1e-0000-4000-8000-000000000001",
                    controller=True,
                )
            ]
        }
        if how == "owner"
        else {"annotations": {"cert-manager.io/certificate-name": "app-cert"}}
    )
    _manual_secret(core, ns, old, **meta)
    _ingress(ns, kube_cluster)
    state = cert_renew(_params(ns, dry_run=False), return_state=True)
    assert state.is_completed(), state.message
    assert state.result().outcome == "refused"
    _unchanged(core, ns, old)
    report = _artifact(state.state_details.flow_run_id, "cert-renew")
    assert md_escape(f"see Certificate {ns}/app-cert") in report
    assert "Managed by cert-manager" in report
    assert f"{ns}/app-cert" in report


def test_a_refused_approval_keeps_the_staged_pair_and_changes_nothing_else(
    pebble: Pebble,
    monkeypatch: pytest.MonkeyPatch,
    core: k8s.CoreV1Api,
    kube_namespace: str,
    ingress: tuple[SecretIngress, Issued],
) -> None:
    pebble.env(monkeypatch)
    _, old = ingress
    ns = kube_namespace
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(cert_renew, _params(ns, dry_run=False), return_state=True)
        run_id = wait_for_paused_run("cert-renew")
        resume_flow_run(run_id, run_input={"approved": False, "approver": "bob", "reason": "no"})
        state = fut.result(timeout=180)
    out = state.result()
    assert out.outcome == "refused"
    assert out.issued is not None
    assert _serial_in(core, ns, "app-tls") == format(old.cert.serial_number, "x")
    assert _secret_names(core, ns) == ["app-tls", "app-tls-acme"]  # no backup
    assert _serial_in(core, ns, "app-tls-acme") == out.issued.serial
    report = _artifact(run_id, "cert-renew")
    assert "refused by **bob**" in report
    assert "Staged pair kept" in report

    # The staged pair from that run blocks a new order (and the day's record would too).
    monkeypatch.setenv("RUNBOOKS_ACME_DIRECTORY_URL", "https://127.0.0.1:1/never-contacted")
    for name in _hosts(ns):
        Variable.unset(issuance_variable(name))
    dry = cert_renew(_params(ns), return_state=True)
    assert dry.result().outcome == "planned"
    report = _artifact(dry.state_details.flow_run_id, "cert-renew")
    assert "## A real run would be refused" in report
    again = cert_renew(_params(ns, dry_run=False), return_state=True)
    assert again.result().outcome == "refused"
    report = _artifact(again.state_details.flow_run_id, "cert-renew")
    assert md_escape(f"staged Secret {ns}/app-tls-acme exists from an earlier run") in report
    assert _serial_in(core, ns, "app-tls-acme") == out.issued.serial


def test_an_endpoint_that_keeps_the_old_certificate_fails_the_run_with_the_undo(
    pebble: Pebble,
    monkeypatch: pytest.MonkeyPatch,
    core: k8s.CoreV1Api,
    kube_namespace: str,
    ingress: tuple[SecretIngress, Issued],
) -> None:
    # No restart: the stand-in ingress keeps serving the pair it loaded first.
    pebble.env(monkeypatch)
    live, old = ingress
    ns = kube_namespace
    endpoint = f"{_hosts(ns)[0]}@127.0.0.1:{live.port}"
    assert fetch_endpoint(endpoint, revocation=RevocationConfig.off()).certificates
    assert live.reloads == 1  # the old pair is loaded, and stays until a restart
    params = _params(
        ns, endpoints=[endpoint], dry_run=False, restart_ingress=False, verify_timeout_s=3
    )
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(cert_renew, params, return_state=True)
        run_id = wait_for_paused_run("cert-renew")
        resume_flow_run(run_id, run_input={"approved": True, "approver": "alice"})
        state = fut.result(timeout=180)
    assert state.is_failed()
    assert "still not serving serial" in (state.message or "")
    assert _serial_in(core, ns, "app-tls") != format(old.cert.serial_number, "x")
    report = _artifact(run_id, "cert-renew")
    assert "## Escalation" in report  # critical, security: not fixed
    assert "**failed**" in report
    assert f"kubectl -n {ns} get secret app-tls-backup-" in report  # the undo
    assert format(old.cert.serial_number, "x") in report


def test_a_staged_pair_swapped_while_waiting_for_approval_is_not_installed(
    pebble: Pebble,
    monkeypatch: pytest.MonkeyPatch,
    core: k8s.CoreV1Api,
    kube_namespace: str,
    ingress: tuple[SecretIngress, Issued],
    pki: CertFactory,
) -> None:
    pebble.env(monkeypatch)
    _, old = ingress
    ns = kube_namespace
    # Valid for every name, later than the current one: only the approval tells it apart.
    other = pki.leaf(days_left=60, hosts=_hosts(ns))
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(cert_renew, _params(ns, dry_run=False), return_state=True)
        run_id = wait_for_paused_run("cert-renew")
        core.delete_namespaced_secret("app-tls-acme", ns)
        _manual_secret(core, ns, other, name="app-tls-acme")
        resume_flow_run(run_id, run_input={"approved": True, "approver": "alice"})
        state = fut.result(timeout=180)
    # Measured again under the lock: not the approved pair, nothing written.
    assert state.is_completed(), state.message
    assert state.result().outcome == "skipped"
    assert _serial_in(core, ns, "app-tls") == format(old.cert.serial_number, "x")
    assert _secret_names(core, ns) == ["app-tls", "app-tls-acme"]  # no backup
    dep: Any = k8s.AppsV1Api(core.api_client).read_namespaced_deployment("ingress", ns)
    assert "kubectl.kubernetes.io/restartedAt" not in (dep.spec.template.metadata.annotations or {})
    report = _artifact(run_id, "cert-renew")
    assert "changed since it was approved" in report
    assert "## Undo record" not in report
