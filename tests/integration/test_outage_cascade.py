"""The outage cascade on real parts: dnsmasq, nginx (TLS) in front of the sandbox backend, the
Kubernetes API with an ingress controller and the backend, PostgreSQL, HTTP dependencies.

Each layer broken in turn is named first_broken, every later layer is still checked (and
found fine) and marked "downstream of" it; a dead resolver costs its own timeout, no more.
"""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from prefect import flow

from drills.pg_cluster import private_cluster
from flows.outage.cascade import Cascade, CascadeTargets, run_cascade
from flows.spec import Verdict
from tasks.cascade.models import LAYER_TITLES, LAYERS, LayerName
from tasks.settings import OutageSettings, PostgresSettings
from tests.fixtures.kube import KubeCluster, free_port, namespace
from tests.fixtures.outage import DNS_NAMES, MISSING_NAME, Dnsmasq, Nginx, NginxFactory
from tests.fixtures.prefect_runs import task_runs
from tests.fixtures.sandbox import Sandbox
from tests.integration.kube_helpers import deployment_body, rolled_out, wait_until

pytestmark = pytest.mark.kube

INGRESS = "ingress-nginx-controller"
BACKEND = "akig-backend"
SECRET = "s3cret-in-url"
DNS_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Namespaces:
    ingress: str
    platform: str


@pytest.fixture(scope="module")
def outage_namespaces(kube_cluster: KubeCluster) -> Iterator[Namespaces]:
    """An ingress controller and the backend (2 pods), rolled out once for the module."""
    core: Any = k8s.CoreV1Api(kube_cluster.api())
    apps: Any = k8s.AppsV1Api(kube_cluster.api())
    suffix = uuid.uuid4().hex[:6]
    spaces = Namespaces(ingress=f"ingress-{suffix}", platform=f"platform-{suffix}")
    for ns in (spaces.ingress, spaces.platform):
        core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=ns)))
    apps.create_namespaced_deployment(
        spaces.ingress,
        deployment_body(INGRESS, replicas=1, labels={"app": "ingress-nginx"}),
    )
    apps.create_namespaced_deployment(
        spaces.platform, deployment_body(BACKEND, replicas=2, labels={"app": "akig"})
    )
    rolled_out(kube_cluster.settings(spaces.ingress), spaces.ingress, INGRESS)
    rolled_out(kube_cluster.settings(spaces.platform), spaces.platform, BACKEND)
    yield spaces
    for ns in (spaces.ingress, spaces.platform):
        with contextlib.suppress(ApiException):
            core.delete_namespace(ns)


@dataclass
class World:
    targets: CascadeTargets
    cluster: KubeCluster
    spaces: Namespaces
    dnsmasq: Dnsmasq
    nginx: Nginx
    sandbox: Sandbox


@pytest.fixture
def world(
    prefect_api: None,
    kube_cluster: KubeCluster,
    outage_namespaces: Namespaces,
    dnsmasq: Dnsmasq,
    make_nginx: NginxFactory,
    sandbox_backend: Sandbox,
) -> World:
    """Every layer healthy: each test breaks one."""
    nginx = make_nginx(sandbox_backend.url)
    port = sandbox_backend.url.rsplit(":", 1)[1]
    outage = OutageSettings(
        hostnames=list(DNS_NAMES),
        resolver=dnsmasq.resolver,
        dns_timeout_s=DNS_TIMEOUT_S,
        endpoint_url=nginx.url("/api/health"),
        endpoint_ca_file=nginx.ca_file,
        endpoint_timeout_s=2.0,
        ingress_namespace=outage_namespaces.ingress,
        ingress_deployment=INGRESS,
        # The second carries credentials, which no result may show.
        dependencies=[
            f"{sandbox_backend.url}/api/health",
            f"http://probe:{SECRET}@127.0.0.1:{port}/api/health?token={SECRET}",
        ],
        dependency_timeout_s=2.0,
        layer_timeout_s=4.0,
    )
    kube = kube_cluster.settings(
        outage_namespaces.platform, label_selector="app=akig", request_timeout_s=3.0
    )
    pg = PostgresSettings(connect_timeout_s=2)  # the shared server: SELECT 1 only
    return World(
        targets=CascadeTargets(outage=outage, kube=kube, pg=pg),
        cluster=kube_cluster,
        spaces=outage_namespaces,
        dnsmasq=dnsmasq,
        nginx=nginx,
        sandbox=sandbox_backend,
    )


def cascade(targets: CascadeTargets, *, concurrent: bool = True) -> tuple[Cascade, Any]:
    """run_cascade inside a flow, as the runbook calls it; (result, flow run id)."""

    @flow(name="outage-cascade-test")
    def run() -> Cascade:
        return run_cascade(targets, concurrent=concurrent)

    state = run(return_state=True)
    result: Cascade = state.result()
    return result, state.state_details.flow_run_id


def assert_named(c: Cascade, broken: LayerName) -> None:
    """`broken` is the likely cause; every other layer answered fine; later ones downstream."""
    assert c.first_broken == broken, c.probes_md()
    assert [r.layer for r in c.layers] == list(LAYERS)
    statuses = {r.layer: r.status for r in c.layers}
    assert statuses == {n: "broken" if n == broken else "ok" for n in LAYERS}, c.probes_md()
    rows = c.checks()
    at = LAYERS.index(broken)
    for i, (name, row) in enumerate(zip(LAYERS, rows, strict=True)):
        assert row.item == LAYER_TITLES[name]
        assert row.verdict == (Verdict.FAIL if name == broken else Verdict.PASS)
        if i > at:
            assert row.detail == f"downstream of {broken}"
            assert c.downstream_of(name) == broken
        else:
            assert "downstream" not in row.detail
    assert f"downstream of {broken}" in c.probes_md() or broken == LAYERS[-1]


def test_every_layer_answers(world: World) -> None:
    c, run_id = cascade(world.targets)
    assert c.first_broken is None, c.probes_md()
    assert {r.layer: r.status for r in c.layers} == dict.fromkeys(LAYERS, "ok")
    assert c.concurrent and c.seconds < 5
    dns = c.layer("dns")
    assert {p.item: p.observed for p in dns.probes} == DNS_NAMES
    endpoint = {p.item: p for p in c.layer("endpoint").probes}
    assert {"DNS", "TCP connect", "TLS handshake", "first byte", "total"} <= set(endpoint)
    assert endpoint["HTTP status"].observed == "200"
    tls, total = endpoint["TLS handshake"].ms, endpoint["total"].ms
    assert tls is not None and total is not None and 0 < tls <= total
    nodes = [p for p in c.layer("kubernetes").probes if p.item.startswith("node ")]
    assert nodes and all(p.ok and "Ready=True" in p.detail for p in nodes)
    backend = [p for p in c.layer("backend").probes if p.item.startswith("pod ")]
    assert len(backend) == 2 and all(p.ok for p in backend)
    assert [p.item for p in c.layer("database").probes][1] == "SELECT 1"
    # Every layer is its own task run, run once (no retries).
    runs = task_runs(run_id)
    assert {n for n in runs if n.startswith("cascade-")} == {f"cascade-{n}" for n in LAYERS}
    assert all(runs[f"cascade-{n}"] == 1 for n in LAYERS)
    shown = c.model_dump_json() + c.probes_md()
    assert SECRET not in shown and "probe:" not in shown
    assert "127.0.0.1" in shown


def test_one_after_another_reads_the_same(world: World) -> None:
    c, _ = cascade(world.targets, concurrent=False)
    assert not c.concurrent and c.first_broken is None
    assert {r.layer: r.status for r in c.layers} == dict.fromkeys(LAYERS, "ok")


def test_kubernetes_lists_pods_not_ready_in_every_namespace(world: World) -> None:
    """A crash-looping pod in a namespace the runbook is not configured for: the Kubernetes
    layer lists it (pods of all namespaces) and stays ok, since the pods' own layers judge
    them; the backend's namespace is not the only one looked at."""
    core: Any = k8s.CoreV1Api(world.cluster.api())
    apps: Any = k8s.AppsV1Api(world.cluster.api())
    with namespace(world.cluster, "elsewhere") as other:
        assert other not in (world.targets.kube.namespace, world.targets.outage.ingress_namespace)
        sick = {"fake-kubelet/ready": "false", "fake-kubelet/waiting": "CrashLoopBackOff"}
        apps.create_namespaced_deployment(
            other,
            deployment_body("sick", replicas=1, template_annotations=sick, labels={"app": "sick"}),
        )

        def crashing() -> bool:
            pods = core.list_namespaced_pod(other).items
            return bool(pods) and all(
                s.state.waiting for p in pods for s in (p.status.container_statuses or [])
            )

        wait_until(crashing, what="the other namespace's pod crash-looping")
        c, _ = cascade(world.targets)
    assert c.first_broken is None, c.probes_md()
    layer = c.layer("kubernetes")
    assert layer.status == "ok" and "not Running/Ready in all namespaces" in layer.summary
    (row,) = [p for p in layer.probes if p.item.startswith(f"pod {other}/sick-")]
    assert row.ok is False and "not Ready" in row.observed and "CrashLoopBackOff" in row.detail


@contextlib.contextmanager
def dns_nxdomain(w: World) -> Iterator[CascadeTargets]:
    outage = w.targets.outage.model_copy(
        update={"hostnames": [*w.targets.outage.hostnames, MISSING_NAME]}
    )
    yield replace(w.targets, outage=outage)


@contextlib.contextmanager
def dns_timeout(w: World) -> Iterator[CascadeTargets]:
    with w.dnsmasq.paused():
        yield w.targets


@contextlib.contextmanager
def endpoint_stopped(w: World) -> Iterator[CascadeTargets]:
    w.nginx.stop()
    yield w.targets


@contextlib.contextmanager
def endpoint_untrusted(w: World) -> Iterator[CascadeTargets]:
    """The system's CAs, which never signed the test certificate: TLS fails, TCP does not."""
    outage = w.targets.outage.model_copy(update={"endpoint_ca_file": None})
    yield replace(w.targets, outage=outage)


def _scale(w: World, replicas: int) -> None:
    apps: Any = k8s.AppsV1Api(w.cluster.api())
    apps.patch_namespaced_deployment_scale(
        INGRESS, w.spaces.ingress, {"spec": {"replicas": replicas}}
    )


@contextlib.contextmanager
def ingress_scaled_to_zero(w: World) -> Iterator[CascadeTargets]:
    apps: Any = k8s.AppsV1Api(w.cluster.api())
    _scale(w, 0)
    try:
        wait_until(
            lambda: (
                not apps.read_namespaced_deployment(INGRESS, w.spaces.ingress).status.ready_replicas
            ),
            what="ingress at 0 ready",
        )
        yield w.targets
    finally:
        _scale(w, 1)
        rolled_out(w.cluster.settings(w.spaces.ingress), w.spaces.ingress, INGRESS)


@contextlib.contextmanager
def node_not_ready(w: World) -> Iterator[CascadeTargets]:
    assert w.cluster.kubelet is not None
    with w.cluster.kubelet.node_not_ready():
        yield w.targets


_CRASHING = {
    "fake-kubelet/ready": "false",
    "fake-kubelet/waiting": "CrashLoopBackOff",
    "fake-kubelet/restarts": "7",
    "fake-kubelet/last-terminated": "Error:1",
}


def _annotate_backend_pods(w: World, annotations: dict[str, str | None]) -> None:
    """The pods themselves (the FakeKubelet reads them), so no rollout is needed."""
    core: Any = k8s.CoreV1Api(w.cluster.api())
    for pod in core.list_namespaced_pod(w.spaces.platform, label_selector="app=akig").items:
        core.patch_namespaced_pod(
            pod.metadata.name, w.spaces.platform, {"metadata": {"annotations": annotations}}
        )


@contextlib.contextmanager
def backend_crash_looping(w: World) -> Iterator[CascadeTargets]:
    core: Any = k8s.CoreV1Api(w.cluster.api())

    def reported(crashing: bool) -> bool:
        pods = core.list_namespaced_pod(w.spaces.platform, label_selector="app=akig").items
        waiting = [bool(s.state.waiting) for p in pods for s in (p.status.container_statuses or [])]
        return bool(waiting) and all(x == crashing for x in waiting)

    _annotate_backend_pods(w, dict(_CRASHING))
    try:
        wait_until(lambda: reported(True), what="backend pods CrashLoopBackOff")
        yield w.targets
    finally:
        _annotate_backend_pods(w, dict.fromkeys(_CRASHING))
        wait_until(lambda: reported(False), what="backend pods running again")


@contextlib.contextmanager
def database_stopped(w: World) -> Iterator[CascadeTargets]:
    with private_cluster() as pg:
        subprocess.run(
            [*pg.run_as, f"{pg.bindir}/pg_ctl", "-D", str(pg.data), "-m", "fast", "-w", "stop"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        yield replace(w.targets, pg=PostgresSettings(dsn=pg.admin_dsn, connect_timeout_s=2))


@contextlib.contextmanager
def dependency_down(w: World) -> Iterator[CascadeTargets]:
    dead = f"http://127.0.0.1:{free_port()}/status"
    outage = w.targets.outage.model_copy(
        update={"dependencies": [*w.targets.outage.dependencies, dead]}
    )
    yield replace(w.targets, outage=outage)


BREAKS: dict[
    str, tuple[LayerName, Callable[[World], contextlib.AbstractContextManager[CascadeTargets]]]
] = {
    "dns-nxdomain": ("dns", dns_nxdomain),
    "dns-timeout": ("dns", dns_timeout),
    "endpoint-stopped": ("endpoint", endpoint_stopped),
    "endpoint-untrusted-certificate": ("endpoint", endpoint_untrusted),
    "ingress-scaled-to-0": ("ingress", ingress_scaled_to_zero),
    "node-not-ready": ("kubernetes", node_not_ready),
    "backend-crash-looping": ("backend", backend_crash_looping),
    "database-stopped": ("database", database_stopped),
    "dependency-down": ("dependencies", dependency_down),
}


@pytest.mark.parametrize("case", list(BREAKS))
def test_each_layer_broken_is_named_first(world: World, case: str) -> None:
    layer, breaks = BREAKS[case]
    with breaks(world) as targets:
        c, _ = cascade(targets)
    assert_named(c, layer)
    broken = c.layer(layer)
    details = " ".join(p.observed for p in broken.probes) + " " + broken.summary
    if case == "dns-nxdomain":
        assert "NXDOMAIN" in details
        assert [p.ok for p in broken.probes] == [True, True, False]
    elif case == "dns-timeout":
        assert "timed out" in details
        # A dead resolver costs its own timeout (names asked at once), not one per name...
        assert all(p.ms is not None and p.ms < DNS_TIMEOUT_S * 1000 + 300 for p in broken.probes)
        assert broken.seconds < DNS_TIMEOUT_S + 0.75
        # ...and the cascade, run concurrently, no more than its slowest layer.
        assert c.seconds < DNS_TIMEOUT_S + 3
    elif case == "endpoint-stopped":
        assert "ConnectError" in details and "refused" in details.lower()
    elif case == "endpoint-untrusted-certificate":
        assert "CERTIFICATE_VERIFY_FAILED" in details
    elif case == "ingress-scaled-to-0":
        assert "scaled to 0" in broken.summary
    elif case == "node-not-ready":
        assert "NotReady" in broken.summary
        assert any("Ready=Unknown" in p.detail for p in broken.probes)
    elif case == "backend-crash-looping":
        assert "CrashLoopBackOff" in broken.summary
        assert all("7 restarts" in p.observed and "Error" in p.detail for p in broken.probes)
    elif case == "database-stopped":
        assert broken.probes == [] and broken.summary
    elif case == "dependency-down":
        assert [p.ok for p in broken.probes] == [True, True, False]
        assert SECRET not in c.model_dump_json()


def test_an_unreachable_cluster_breaks_kubernetes_not_the_run(world: World) -> None:
    """The API itself gone: the three Kubernetes layers cannot answer; the first of them is
    named, and every check still returns within its bound."""
    dead = world.cluster.kubeconfig_for(world.cluster.admin_token, "dead")
    text = dead.read_text().replace(world.cluster.server, f"https://127.0.0.1:{free_port()}")
    dead.write_text(text)
    kube = world.targets.kube.model_copy(update={"kubeconfig": dead})
    c, _ = cascade(replace(world.targets, kube=kube))
    assert c.first_broken == "ingress"
    assert {r.layer: r.status for r in c.layers if r.layer in ("kubernetes", "backend")} == {
        "kubernetes": "broken",
        "backend": "broken",
    }
    assert c.downstream_of("backend") == "ingress"
