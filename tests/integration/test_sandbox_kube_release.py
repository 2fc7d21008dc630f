"""The sandbox backend takes its release from the real Deployment's image tag."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client as k8s
from pydantic import SecretStr

from tasks.kubernetes import undo_rollout
from tests.integration.kube_helpers import deployment_body, revision_of, set_image, wait_until

pytestmark = pytest.mark.kube
IMAGE = "registry.local/akig-backend"


def test_v2_rollout_breaks_the_backend_and_undo_heals_it(
    kube_cluster, kube_namespace, make_sandbox_backend
):
    ns = kube_namespace
    apps: Any = k8s.AppsV1Api(kube_cluster.api())
    body = deployment_body("akig-backend", image=f"{IMAGE}:v1", replicas=1)
    apps.create_namespaced_deployment(ns, body)
    wait_until(lambda: revision_of(apps, ns, "akig-backend") == 1, what="revision 1")
    sb = make_sandbox_backend(
        release_source="kube",
        kube_url=kube_cluster.server,
        kube_token=SecretStr(kube_cluster.admin_token),
        kube_ca_file=kube_cluster.workdir / "ca.pem",
        kube_namespace=ns,
        kube_poll_s=0.2,
    )
    assert sb.backend.release.current() == "v1"
    assert sb.traffic(40) == [200] * 40

    set_image(apps, ns, "akig-backend", f"{IMAGE}:v2")
    wait_until(lambda: sb.backend.release.current() == "v2", timeout=10, what="release v2")
    codes = sb.traffic(200)
    assert 0.15 < codes.count(500) / len(codes) < 0.45

    wait_until(lambda: revision_of(apps, ns, "akig-backend") == 2, what="revision 2")
    undo_rollout.fn("akig-backend", ns, settings=kube_cluster.settings(ns))
    wait_until(lambda: sb.backend.release.current() == "v1", timeout=10, what="release v1")
    assert sb.traffic(100) == [200] * 100
    with sb.client() as c:
        assert c.get("/api/health").json()["release"] == "v1"
