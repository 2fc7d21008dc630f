"""Pod CPU and memory from the resource metrics API (metrics.k8s.io), when a cluster has it.

A cluster without metrics-server has no such API group: that is a result (`available=False`,
with the reason), not an error, so a runbook can fall back to another source or say "not
available". Read-only.
"""

from __future__ import annotations

import re
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from tasks.kubernetes.api import classify_api_error, kube_session
from tasks.retry import RETRY_READ
from tasks.settings import KubernetesSettings

_CPU = re.compile(r"^([0-9.]+)(n|u|m)?$")
_MEM = re.compile(r"^([0-9.]+)(Ki|Mi|Gi|Ti|K|M|G|T)?$")
_CPU_UNITS = {None: 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_MEM_UNITS = {
    None: 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


class PodUsage(BaseModel):
    """One pod's usage summed over its containers."""

    pod: str
    cpu_cores: float
    memory_bytes: int


class PodMetrics(BaseModel):
    """metrics.k8s.io for the selected pods, or why there is none."""

    available: bool
    detail: str = Field("", description="Why not available (no metrics API on the cluster).")
    pods: list[PodUsage] = Field(default_factory=list)


def cpu_cores(quantity: str) -> float:
    """A Kubernetes CPU quantity (`250m`, `12345n`, `1`) in cores."""
    m = _CPU.match(quantity.strip())
    if not m:
        raise ValueError(f"not a CPU quantity: {quantity!r}")
    return float(m.group(1)) * _CPU_UNITS[m.group(2)]


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (`128Mi`, `1G`, `1024`) in bytes."""
    m = _MEM.match(quantity.strip())
    if not m:
        raise ValueError(f"not a memory quantity: {quantity!r}")
    return int(float(m.group(1)) * _MEM_UNITS[m.group(2)])


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="pod-metrics")
def pod_metrics(
    label_selector: str | None = None,
    namespace: str | None = None,
    settings: KubernetesSettings | None = None,
) -> PodMetrics:
    """CPU (cores) and memory (bytes) per pod from metrics.k8s.io; absent API = not available."""
    settings = settings or KubernetesSettings()
    namespace = namespace or settings.namespace
    selector = settings.label_selector if label_selector is None else label_selector
    with kube_session(settings) as kube:
        api = k8s.CustomObjectsApi(kube.client)
        try:
            raw = api.list_namespaced_custom_object(
                "metrics.k8s.io",
                "v1beta1",
                namespace,
                "pods",
                label_selector=selector,
                _request_timeout=kube.timeout,
            )
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            if isinstance(exc, ApiException) and exc.status in (404, 503):
                # 404: no such API group; 503: registered but metrics-server is not serving.
                return PodMetrics(
                    available=False,
                    detail=f"metrics.k8s.io not served by {kube.host} (HTTP {exc.status})",
                )
            raise classify_api_error(
                exc,
                verb="list",
                resource="pods.metrics.k8s.io",
                name=None,
                namespace=namespace,
                host=kube.host,
            ) from None
    body: dict[str, Any] = raw if isinstance(raw, dict) else {}
    pods = []
    for item in body.get("items", []):
        containers = item.get("containers", [])
        pods.append(
            PodUsage(
                pod=str(item.get("metadata", {}).get("name", "?")),
                cpu_cores=sum(cpu_cores(c["usage"]["cpu"]) for c in containers),
                memory_bytes=sum(memory_bytes(c["usage"]["memory"]) for c in containers),
            )
        )
    return PodMetrics(available=True, pods=pods)
