"""The system-outage cascade: time to a verdict, every layer healthy and with DNS timing out,
the seven checks all at once (as `run_cascade` submits them) beside one after another.

On the sandbox platform (`tests/fixtures/platform.py`: the backend on its own database, the
test Kubernetes control plane with `akig-backend`), plus what the cascade looks at in front
of it: dnsmasq serving the hostnames, nginx (TLS) proxying to the backend, an ingress
controller Deployment, the backend's health as a dependency. "DNS timing out" is dnsmasq
stopped with SIGSTOP (queries are never answered). Each round runs the checks of
`flows.outage.cascade.layer_checks` (the same tasks and arguments) one after another, then
in threads as Prefect's task runner does; then `run_cascade` itself inside a flow on a
throwaway Prefect API (skip with `--no-flow`), both ways.

Targets: the whole cascade under 5 s; a dead layer costs at most its own timeout
(`dns_timeout_s`, plus scheduling), so DNS timing out costs the concurrent cascade that
timeout and no more.

    .venv/bin/python bench/outage_cascade.py [--rounds 3] [--dns-timeout 2] [--no-flow]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import trustme
from kubernetes import client as k8s

from flows.outage.cascade import Cascade, CascadeTargets, layer_checks, run_cascade
from tasks.cascade.models import LAYERS, LayerResult
from tasks.settings import KubernetesSettings, OutageSettings, PostgresSettings
from tests.fixtures.kube import stop
from tests.fixtures.outage import DNS_NAMES, Dnsmasq, start_dnsmasq, start_nginx
from tests.fixtures.platform import NAMESPACE, running_platform
from tests.integration.kube_helpers import deployment_body, rolled_out

TARGET_S = 5.0
INGRESS_NS = "ingress-nginx"
INGRESS = "ingress-nginx-controller"
#: What a dead layer may cost beyond its own timeout: thread start, the last retry's sleep.
SLACK_S = 0.5


def sequential(targets: CascadeTargets) -> Cascade:
    start = time.perf_counter()
    results = [task.fn(*args) for task, args in layer_checks(targets).values()]
    return Cascade.of(results, seconds=time.perf_counter() - start, concurrent=False)


def concurrent(targets: CascadeTargets) -> Cascade:
    checks = layer_checks(targets)
    start = time.perf_counter()
    with ThreadPoolExecutor(len(checks)) as pool:
        futures = [pool.submit(task.fn, *args) for task, args in checks.values()]
        results: list[LayerResult] = [f.result() for f in futures]
    return Cascade.of(results, seconds=time.perf_counter() - start, concurrent=True)


def rounds(n: int, run: Callable[[], Cascade]) -> list[Cascade]:
    return [run() for _ in range(n)]


#: (label, DNS timing out, a dependency timing out too)
SCENARIOS = (
    ("every layer healthy", False, False),
    ("DNS timing out", True, False),
    ("DNS + a dependency timing out", True, True),
)


@contextlib.contextmanager
def scenario(
    targets: CascadeTargets, dns: Dnsmasq, dead_dns: bool, dead_dependency: bool
) -> Iterator[CascadeTargets]:
    """The targets with DNS paused and/or a dependency that accepts and never answers."""
    with contextlib.ExitStack() as stack:
        if dead_dns:
            stack.enter_context(dns.paused())
        if dead_dependency:
            # Listening, never accepting: the TCP handshake succeeds, no HTTP answer comes.
            deaf = stack.enter_context(socket.socket())
            deaf.bind(("127.0.0.1", 0))
            deaf.listen(16)
            url = f"http://127.0.0.1:{deaf.getsockname()[1]}/health"
            outage = targets.outage.model_copy(
                update={"dependencies": [*targets.outage.dependencies, url]}
            )
            targets = replace(targets, outage=outage)
        yield targets


def report(title: str, seq: list[Cascade], conc: list[Cascade]) -> tuple[float, float]:
    """The per-layer table of one scenario; (sequential, concurrent) median verdict times."""
    print(f"\n{title}: median of {len(seq)} rounds, seconds")
    print(f"{'layer':<13} {'sequential':>11} {'concurrent':>11}  status")
    for name in LAYERS:
        s = statistics.median(c.layer(name).seconds for c in seq)
        k = statistics.median(c.layer(name).seconds for c in conc)
        print(f"{name:<13} {s:>11.3f} {k:>11.3f}  {conc[-1].layer(name).status}")
    seq_total = statistics.median(c.seconds for c in seq)
    conc_total = statistics.median(c.seconds for c in conc)
    print(
        f"{'VERDICT':<13} {seq_total:>11.3f} {conc_total:>11.3f}  first broken: "
        f"{conc[-1].first_broken or '-'}"
    )
    return seq_total, conc_total


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dns-timeout", type=float, default=2.0)
    parser.add_argument("--no-flow", action="store_true", help="skip run_cascade in a flow")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-outage-"))
    failures: list[str] = []
    try:
        with running_platform() as platform, contextlib.ExitStack() as stack:
            if platform.cluster is None:
                # Three of the seven layers need the API server: without it there is no cascade.
                print("skipped: the Kubernetes test binaries are not built (`make kube`)")
                return 0
            dns_dir = work / "dns"
            dns_dir.mkdir()
            dns = start_dnsmasq(DNS_NAMES, dns_dir)
            stack.callback(stop, dns.proc)
            nginx = start_nginx(work / "nginx", platform.backend.url, trustme.CA())
            stack.callback(nginx.stop)
            core: Any = k8s.CoreV1Api(platform.cluster.api())
            apps: Any = k8s.AppsV1Api(platform.cluster.api())
            core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=INGRESS_NS)))
            apps.create_namespaced_deployment(
                INGRESS_NS, deployment_body(INGRESS, replicas=2, labels={"app": "ingress"})
            )
            rolled_out(platform.cluster.settings(INGRESS_NS), INGRESS_NS, INGRESS)
            targets = CascadeTargets(
                outage=OutageSettings(
                    hostnames=list(DNS_NAMES),
                    resolver=dns.resolver,
                    dns_timeout_s=args.dns_timeout,
                    endpoint_url=nginx.url("/api/health"),
                    endpoint_ca_file=nginx.ca_file,
                    ingress_namespace=INGRESS_NS,
                    ingress_deployment=INGRESS,
                    dependencies=[f"{platform.backend.url}/api/health"],
                ),
                kube=KubernetesSettings(
                    kubeconfig=platform.cluster.kubeconfig, namespace=NAMESPACE
                ),
                pg=PostgresSettings(dsn=platform.env["RUNBOOKS_PG_DSN"]),
            )
            print(
                f"layers: {', '.join(LAYERS)}; dns_timeout_s {args.dns_timeout:g}, "
                f"layer_timeout_s {targets.outage.layer_timeout_s:g}"
            )
            concurrent(targets)  # warm-up: imports, first connections
            totals: dict[str, tuple[float, float]] = {}
            dead_layers: list[tuple[str, float, float]] = []  # (layer, its timeout, seconds)
            for label, dead_dns, dead_dep in SCENARIOS:
                with scenario(targets, dns, dead_dns, dead_dep) as t:
                    seq = rounds(args.rounds, lambda t=t: sequential(t))  # type: ignore[misc]
                    conc = rounds(args.rounds, lambda t=t: concurrent(t))  # type: ignore[misc]
                totals[label] = report(label, seq, conc)
                for c in seq + conc:
                    if dead_dns:
                        dead_layers.append(("dns", args.dns_timeout, c.layer("dns").seconds))
                    if dead_dep:
                        limit = targets.outage.dependency_timeout_s
                        dead_layers.append(("dependencies", limit, c.layer("dependencies").seconds))
                expected = "dns" if dead_dns else None
                if any(c.first_broken != expected for c in seq + conc):
                    failures.append(f"{label}: first broken not {expected}")
            if not args.no_flow:
                from prefect import flow
                from prefect.testing.utilities import prefect_test_harness

                @flow(name="bench-outage-cascade")
                def in_flow(t: CascadeTargets, both: bool) -> Cascade:
                    return run_cascade(t, concurrent=both)

                with prefect_test_harness(server_startup_timeout=120):
                    in_flow(targets, True)  # warm-up: flow and task registration
                    flow_rows = []
                    for label, dead_dns, dead_dep in SCENARIOS:
                        with scenario(targets, dns, dead_dns, dead_dep) as t:
                            s = [in_flow(t, False).seconds for _ in range(args.rounds)]
                            k = [in_flow(t, True).seconds for _ in range(args.rounds)]
                        flow_rows.append((label, statistics.median(s), statistics.median(k)))
                        totals[f"flow, {label}"] = (statistics.median(s), statistics.median(k))
                print("\nrun_cascade in a flow (Prefect task runs), median seconds")
                print(f"{'':<30} {'sequential':>11} {'concurrent':>11}")
                for label, s_med, k_med in flow_rows:
                    print(f"{label:<30} {s_med:>11.3f} {k_med:>11.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\ntarget: the whole cascade < {TARGET_S:g} s (concurrent, median):")
    for key, (seq_s, conc_s) in totals.items():
        print(f"  {key:<38} {conc_s:.3f} s (one after another {seq_s:.3f} s)")
        if conc_s >= TARGET_S:
            failures.append(f"{key}: concurrent {conc_s:.3f} s >= {TARGET_S:g} s")
    print(f"target: a dead layer costs at most its own timeout (+ {SLACK_S:g} s slack):")
    for layer in ("dns", "dependencies"):
        seen = [(limit, took) for name, limit, took in dead_layers if name == layer]
        if seen:
            limit, worst = max(limit for limit, _ in seen), max(took for _, took in seen)
            print(f"  {layer:<13} timeout {limit:g} s, worst {worst:.3f} s")
            if worst > limit + SLACK_S:
                failures.append(f"dead {layer} layer took {worst:.3f} s (timeout {limit:g} s)")
    for failure in failures:
        print(f"MISSED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
