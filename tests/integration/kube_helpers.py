"""Helpers shared by the Kubernetes integration tests (deployments, waits, revisions)."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from tasks.kubernetes import REVISION, PodInfo, list_pods, wait_for_rollout
from tasks.settings import KubernetesSettings
from tests.fixtures.faults import DroppingProxyFactory, ResponseDroppingProxy
from tests.fixtures.kube import KubeCluster, write_kubeconfig

IMAGE = "registry.local/akig-backend"


def deployment_body(
    name: str,
    image: str = f"{IMAGE}:1",
    replicas: int = 2,
    template_annotations: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    labels = labels or {"app": "akig", "component": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels, "annotations": annotations or {}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": "100%", "maxUnavailable": "50%"},
            },
            "template": {
                "metadata": {"labels": labels, "annotations": template_annotations or {}},
                "spec": {
                    "containers": [
                        {
                            "name": "app",
                            "image": image,
                            "ports": [{"containerPort": 4000}],
                            "env": [{"name": "MODE", "value": "prod"}],
                        }
                    ],
                    "terminationGracePeriodSeconds": 5,
                },
            },
            **spec,
        },
    }


def wait_until(
    check: Callable[[], Any], timeout: float = 30, interval: float = 0.1, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check}: last={last!r}")


def status_settled(
    read: Callable[[str, str], Any], namespace: str, name: str, timeout: float = 30
) -> None:
    """Wait until the controller has written a new workload's status (`read` is e.g.
    `apps.read_namespaced_stateful_set`): its status writes move the resourceVersion, so a
    pinned write racing one is a (correct) 409 and re-read, which would blur what a test
    counts."""
    deadline = time.monotonic() + timeout
    while True:
        obj = read(name, namespace)
        if obj.status and obj.status.observed_generation == obj.metadata.generation:
            time.sleep(0.5)  # its replica counts follow in the same sync or the next
            if read(name, namespace).metadata.resource_version == obj.metadata.resource_version:
                return
        assert time.monotonic() < deadline, f"{namespace}/{name} never settled"
        time.sleep(0.1)


def revision_of(apps: Any, namespace: str, name: str) -> int:
    dep = apps.read_namespaced_deployment(name, namespace)
    return int((dep.metadata.annotations or {}).get(REVISION, "0"))


def rolled_out(
    settings: KubernetesSettings, namespace: str, name: str, timeout: float = 30
) -> None:
    wait_for_rollout.fn(name, namespace, timeout_s=timeout, poll_s=0.1, settings=settings)


def create_with_revisions(
    apps: Any,
    settings: KubernetesSettings,
    namespace: str,
    name: str,
    revisions: int = 3,
    **kwargs: Any,
) -> None:
    """Create a Deployment and roll out `revisions` images (:1 .. :N), each with a change-cause."""
    body = deployment_body(
        name, image=f"{IMAGE}:1", annotations={"kubernetes.io/change-cause": "v1"}, **kwargs
    )
    apps.create_namespaced_deployment(namespace, body)
    wait_until(lambda: revision_of(apps, namespace, name) == 1, what="revision 1")
    rolled_out(settings, namespace, name)
    for n in range(2, revisions + 1):
        set_image(apps, namespace, name, f"{IMAGE}:{n}", change_cause=f"v{n}")
        wait_until(partial(_at_revision, apps, namespace, name, n), what=f"revision {n}")
        rolled_out(settings, namespace, name)


def _at_revision(apps: Any, namespace: str, name: str, revision: int) -> bool:
    return revision_of(apps, namespace, name) == revision


def set_image(
    apps: Any, namespace: str, name: str, image: str, change_cause: str | None = None
) -> None:
    patch: dict[str, Any] = {
        "spec": {"template": {"spec": {"containers": [{"name": "app", "image": image}]}}}
    }
    if change_cause:
        patch["metadata"] = {"annotations": {"kubernetes.io/change-cause": change_cause}}
    apps.patch_namespaced_deployment(
        name, namespace, patch, _content_type="application/strategic-merge-patch+json"
    )


def replica_set_revisions(apps: Any, namespace: str, name: str) -> list[tuple[int, str]]:
    """(revision, image) of every ReplicaSet the Deployment controls, sorted."""
    dep = apps.read_namespaced_deployment(name, namespace)
    out = []
    for rs in apps.list_namespaced_replica_set(namespace).items:
        if any(o.uid == dep.metadata.uid for o in rs.metadata.owner_references or []):
            out.append(
                (
                    int(rs.metadata.annotations[REVISION]),
                    rs.spec.template.spec.containers[0].image,
                )
            )
    return sorted(out)


def settled_pods(
    settings: KubernetesSettings, namespace: str, selector: str, count: int
) -> list[PodInfo]:
    """Wait until exactly `count` pods match and none is still terminating."""

    def check() -> list[PodInfo] | None:
        pods = list_pods.fn(selector, namespace, settings=settings)
        if len(pods) == count and not any(p.terminating for p in pods):
            return pods
        return None

    result: list[PodInfo] = wait_until(check, what=f"{count} settled pods {selector}")
    return result


def through_proxy(
    cluster: KubeCluster,
    make_proxy: DroppingProxyFactory,
    namespace: str,
    drop_first: int = 1,
    before_forward: Callable[[str, str], None] | None = None,
) -> tuple[ResponseDroppingProxy, KubernetesSettings]:
    """A response-dropping proxy in front of the test API server, and admin settings using it."""
    url = urlsplit(cluster.server)
    proxy = make_proxy(
        url.hostname,
        url.port,
        cluster.workdir / "ca.pem",
        drop_first=drop_first,
        before_forward=before_forward,
    )
    kubeconfig = write_kubeconfig(
        cluster.workdir / f"proxy-{proxy.port}.kubeconfig",
        f"https://127.0.0.1:{proxy.port}",
        proxy.ca_pem,
        cluster.admin_token,
        f"proxy-{proxy.port}",
    )
    return proxy, cluster.settings(namespace, kubeconfig=kubeconfig)


def statefulset_body(
    name: str,
    image: str = "registry.local/redis:7",
    replicas: int = 2,
    memory_limit: str | None = "256Mi",
    template_annotations: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A StatefulSet like the platform's Redis / database ones (label app=akig)."""
    labels = {"app": "akig", "component": name}
    container: dict[str, Any] = {"name": "main", "image": image}
    if memory_limit:
        container["resources"] = {"limits": {"memory": memory_limit}}
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": template_annotations or {}},
                "spec": {"containers": [container], "terminationGracePeriodSeconds": 5},
            },
            **spec,
        },
    }


def pod_uids(core: Any, namespace: str, selector: str) -> dict[str, str]:
    """name -> uid of the pods matching `selector`."""
    pods = core.list_namespaced_pod(namespace, label_selector=selector).items
    return {p.metadata.name: p.metadata.uid for p in pods}
