"""`cluster_events` and `pods_not_ready` across namespaces, against the real kube-apiserver."""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from kubernetes import client as k8s

from tasks.errors import PermanentError
from tasks.kubernetes import cluster_events, pods_not_ready
from tests.fixtures.kube import KubeCluster, namespace
from tests.integration.kube_helpers import deployment_body, rolled_out, wait_until

pytestmark = pytest.mark.kube


@pytest.fixture
def core(kube_cluster: KubeCluster) -> Any:
    return k8s.CoreV1Api(kube_cluster.api())


@pytest.fixture
def second_namespace(kube_cluster: KubeCluster) -> Iterator[str]:
    with namespace(kube_cluster, "t2") as name:
        yield name


def _event(cluster: KubeCluster, ns: str, name: str, **times: str) -> None:
    """POSTed as raw JSON: the Python client rewrites eventTime (a MicroTime) as isoformat,
    which the apiserver refuses."""
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name},
        "involvedObject": {"kind": "Pod", "name": name, "namespace": ns},
        "reason": name,
        "message": f"{name} happened",
        "type": "Normal",
        **times,
    }
    if "eventTime" in times:
        # An events.k8s.io-style event: eventTime only, which needs the reporting fields.
        body |= {"reportingComponent": "test", "reportingInstance": "test-1", "action": "Test"}
    response = httpx.post(
        f"{cluster.server}/api/v1/namespaces/{ns}/events",
        json=body,
        headers={"Authorization": f"Bearer {cluster.admin_token}"},
        verify=ssl.create_default_context(cafile=str(cluster.workdir / "ca.pem")),
        timeout=10,
    )
    assert response.status_code == 201, response.text


def test_events_of_all_namespaces_in_kubectl_order(kube_cluster, kube_namespace, second_namespace):
    settings = kube_cluster.settings(kube_namespace)
    tag = uuid.uuid4().hex[:6]
    # Created out of order, in two namespaces: each falls back differently for its time.
    _event(kube_cluster, kube_namespace, f"c-newest-{tag}")  # creation time only: now
    _event(
        kube_cluster,
        second_namespace,
        f"a-oldest-{tag}",
        lastTimestamp="2021-01-01T00:00:00Z",
        firstTimestamp="2020-01-01T00:00:00Z",
    )
    _event(
        kube_cluster, kube_namespace, f"b-middle-{tag}", eventTime="2022-06-01T00:00:00.000000Z"
    )  # MicroTime

    events = cluster_events.fn(limit=1000, settings=settings)
    mine = [(e.namespace, e.reason) for e in events if e.reason and e.reason.endswith(tag)]
    assert mine == [
        (second_namespace, f"a-oldest-{tag}"),
        (kube_namespace, f"b-middle-{tag}"),
        (kube_namespace, f"c-newest-{tag}"),
    ]
    times = [e.last_seen for e in events]
    assert times == sorted(times)
    assert events[[e.reason for e in events].index(f"a-oldest-{tag}")].last_seen == datetime(
        2021, 1, 1, tzinfo=UTC
    )
    # The limit keeps the newest: the last one created (creation time = now) is among them.
    newest = cluster_events.fn(limit=1, settings=settings)
    assert len(newest) == 1 and newest[0].last_seen >= datetime(2022, 6, 1, tzinfo=UTC)


def test_cluster_events_refuses_a_bad_limit(kube_cluster):
    with pytest.raises(PermanentError, match="limit"):
        cluster_events.fn(limit=0, settings=kube_cluster.settings())


def test_pods_not_ready_in_all_namespaces(kube_cluster, kube_namespace, second_namespace):
    apps: Any = k8s.AppsV1Api(kube_cluster.api())
    fine = deployment_body("fine", replicas=1)
    apps.create_namespaced_deployment(kube_namespace, fine)
    sick = deployment_body(
        "sick",
        replicas=1,
        template_annotations={
            "fake-kubelet/ready": "false",
            "fake-kubelet/waiting": "CrashLoopBackOff",
        },
    )
    apps.create_namespaced_deployment(second_namespace, sick)
    rolled_out(kube_cluster.settings(kube_namespace), kube_namespace, "fine")
    settings = kube_cluster.settings(kube_namespace)

    def sick_listed() -> list[Any] | None:
        found = pods_not_ready.fn(settings=settings)
        ours = [p for p in found if p.namespace in (kube_namespace, second_namespace)]
        return ours if ours and all(p.phase == "Running" for p in ours) else None

    ours = wait_until(sick_listed, what="the sick pod listed")
    assert [(p.namespace, p.name.startswith("sick-"), p.ready, p.reason) for p in ours] == [
        (second_namespace, True, False, "CrashLoopBackOff")
    ]
