"""The shipped `cert-renew` Role on a real API server: each step of the flow works with it,
what is around it is refused, and every rule is needed."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from kubernetes import client as k8s
from pydantic import SecretStr

from tasks.acme import Issued, create_staged_secret, read_secret_owner, secret_exists
from tasks.clients import kube_api_client
from tasks.kubernetes import restart_rollout
from tasks.tls import load_pair_from_secret, read_secret_certificates, write_tls_secret
from tests.fixtures.tls import CertFactory
from tests.fixtures.tls import Issued as PkiCert
from tests.integration.kube_helpers import deployment_body
from tests.integration.test_kubernetes_rbac import (
    Cluster,
    _tls_secret,
    forbidden,
    rbac_cluster,
    role,
    without_each_rule_something_breaks,
)

pytestmark = pytest.mark.kube
__all__ = ["rbac_cluster"]  # the fixture, shared with the other RBAC tests


def _issued(cert: PkiCert) -> Issued:
    leaf = cert.cert
    return Issued(
        names=["akig.example"],
        fullchain_pem=cert.chain_pem().decode(),
        serial=format(leaf.serial_number, "x"),
        fingerprint_sha256=leaf.fingerprint(hashes.SHA256()).hex(),
        not_after=leaf.not_valid_after_utc,
        order_url="https://acme.example/order/1",
        challenge="http-01",
        elapsed_s=0.0,
    )


def test_cert_renew_roles(rbac_cluster: Cluster, pki: CertFactory) -> None:
    c, ns, ingress = rbac_cluster, rbac_cluster.platform, rbac_cluster.ingress
    core: Any = k8s.CoreV1Api(c.admin)
    apps: Any = k8s.AppsV1Api(c.admin)
    old, new = pki.leaf(days_left=0.5), pki.leaf(days_left=90)
    _tls_secret(core, ns, "akig-tls", old)
    _tls_secret(core, ns, "payments-tls", old)
    for name in ("ingress-nginx-controller", "other-controller"):
        apps.create_namespaced_deployment(ingress, deployment_body(name, replicas=1))
    sa = c.token_settings("cert-renew")
    sa_core: Any = k8s.CoreV1Api(kube_api_client(sa))

    # The flow's steps with the flow's own code, under the ServiceAccount alone.
    current = read_secret_certificates(ns, "akig-tls", settings=sa)
    assert read_secret_owner.fn(ns, "akig-tls", settings=sa).managed_by == "manual"
    assert secret_exists.fn(ns, "akig-tls-acme", settings=sa) is False
    create_staged_secret(
        ns, "akig-tls-acme", _issued(new), SecretStr(new.key_pem.decode()), settings=sa
    )
    assert secret_exists.fn(ns, "akig-tls-acme", settings=sa) is True
    pair = load_pair_from_secret(ns, "akig-tls-acme", settings=sa)
    assert current.resource_version is not None
    stamp = f"{datetime.now(UTC):%Y%m%d%H%M%S}"
    done = write_tls_secret(
        ns, "akig-tls", pair, current.resource_version, settings=sa, backup_name=f"b-{stamp}"
    )
    assert done.new_serial == format(new.cert.serial_number, "x")
    assert restart_rollout.fn("ingress-nginx-controller", ingress, settings=sa).patched

    # Around it, refused.
    assert forbidden(lambda: read_secret_certificates(ns, "payments-tls", settings=sa))
    assert forbidden(lambda: secret_exists.fn(ns, "payments-tls-acme", settings=sa))
    assert forbidden(lambda: sa_core.delete_namespaced_secret("akig-tls-acme", ns))
    assert forbidden(lambda: sa_core.list_namespaced_secret(ns))
    assert forbidden(lambda: restart_rollout.fn("other-controller", ingress, settings=sa))

    # Every rule is needed.
    live = core.read_namespaced_secret("akig-tls", ns)
    probe = k8s.V1Secret(metadata=k8s.V1ObjectMeta(name="probe-staged"), type="Opaque")
    without_each_rule_something_breaks(
        c.admin,
        role(c.docs, "cert-renew"),
        [
            lambda: secret_exists.fn(ns, "akig-tls-acme", settings=sa),
            lambda: sa_core.replace_namespaced_secret("akig-tls", ns, live),
            lambda: sa_core.create_namespaced_secret(ns, probe),
        ],
    )
    without_each_rule_something_breaks(
        c.admin,
        role(c.docs, "cert-renew-ingress"),
        [
            lambda: restart_rollout.fn(
                "ingress-nginx-controller", ingress, dry_run=True, settings=sa
            )
        ],
    )
