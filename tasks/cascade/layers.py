"""The system-outage cascade's seven checks, one `@task` per layer, each read only.

Every check returns a `LayerResult` and never raises: a layer that answers wrong, or not at
all within its own timeout, is `broken` (that is the finding); a check that cannot tell
(forbidden, misconfigured) is `unavailable`; a layer with nothing configured is `not
configured`. Each check runs under two bounds: its own timeout (per DNS name, per URL, the
Kubernetes request timeout, the PostgreSQL connect timeout), and `layer_timeout_s` around
the whole check, so no layer ever costs more than that, whatever it waits for. No retries:
for an outage, the timeout is the verdict.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
from kubernetes import client as k8s
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.backend import timed_url
from tasks.cascade.models import LayerName, LayerResult, LayerStatus, Probe
from tasks.clients import pg_connect, pg_target
from tasks.dns import resolve_all
from tasks.endpoint import endpoint_verify, shown_url
from tasks.errors import PermanentError, TransientError
from tasks.kubernetes.api import call, get_deployment, kube_session
from tasks.kubernetes.pods import node_infos, not_running_pods, pods_of, restarts_of
from tasks.kubernetes.semantics import label_selector_string
from tasks.logs import scrub_secrets
from tasks.settings import KubernetesSettings, OutageSettings, PostgresSettings

#: A container waiting for one of these will not start by itself: the backend is down.
BROKEN_WAITING = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
        "InvalidImageName",
    }
)
#: How many rows of "pods not Running/Ready in all namespaces" a result keeps.
MAX_POD_ROWS = 50

Finding = tuple[LayerStatus, str, list[Probe]]


def _error(exc: BaseException) -> str:
    text = (str(exc).splitlines() or [""])[0][:300]
    return scrub_secrets(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def bounded(layer: LayerName, limit_s: float, check: Callable[[], Finding]) -> LayerResult:
    """Run `check` for at most `limit_s`: late is broken, a TransientError is broken (the
    layer did not answer), any other error unavailable (the check could not tell)."""
    start = time.perf_counter()
    box: dict[str, Finding | BaseException] = {}

    def run() -> None:
        try:
            box["value"] = check()
        except BaseException as exc:  # noqa: BLE001 - reported as the layer's verdict
            box["error"] = exc

    # A daemon thread: a check stuck past the limit is abandoned, never waited for.
    worker = threading.Thread(target=run, name=f"cascade-{layer}", daemon=True)
    worker.start()
    worker.join(limit_s)
    seconds = round(time.perf_counter() - start, 3)
    value, error = box.get("value"), box.get("error")
    if isinstance(value, tuple):
        status, summary, probes = value
        return LayerResult(
            layer=layer, status=status, summary=summary, probes=probes, seconds=seconds
        )
    if isinstance(error, TransientError):
        status_: LayerStatus = "broken"
        summary_ = _error(error).removeprefix("TransientError: ")
    elif isinstance(error, BaseException):
        status_ = "unavailable"
        summary_ = "could not check: " + _error(error).removeprefix("PermanentError: ")
    else:
        status_, summary_ = "broken", f"no answer within the layer's {limit_s:g} s"
    return LayerResult(layer=layer, status=status_, summary=summary_, seconds=seconds)


def _not_configured(layer: LayerName, why: str) -> LayerResult:
    return LayerResult(layer=layer, status="not configured", summary=why, seconds=0.0)


def _kube(kube: KubernetesSettings, outage: OutageSettings) -> KubernetesSettings:
    """The Kubernetes settings with requests no longer than the layer's own limit."""
    timeout = min(kube.request_timeout_s, outage.layer_timeout_s)
    return kube.model_copy(update={"request_timeout_s": timeout})


# --- 1. DNS ------------------------------------------------------------------------------


@task(cache_policy=NO_CACHE, task_run_name="cascade-dns")
def check_dns(outage: OutageSettings) -> LayerResult:
    """Every configured hostname resolves (A/AAAA) at the resolver, each within its timeout."""
    if not outage.hostnames:
        return _not_configured("dns", "no hostnames configured (RUNBOOKS_OUTAGE_HOSTNAMES)")

    # Each name within its own timeout, never past the layer's: a finding per name, always.
    per_name = outage.model_copy(
        update={"dns_timeout_s": min(outage.dns_timeout_s, outage.layer_timeout_s)}
    )

    def check() -> Finding:
        answers = resolve_all(per_name.hostnames, per_name)
        probes = [
            Probe(
                item=a.name,
                ok=a.ok,
                observed=", ".join(a.addresses) if a.ok else (a.error or "no answer"),
                threshold=f"A/AAAA within {per_name.dns_timeout_s:g} s",
                detail=f"resolver {a.resolver}",
                ms=a.ms,
            )
            for a in answers
        ]
        bad = [a.name for a in answers if not a.ok]
        if bad:
            first = next(a for a in answers if not a.ok)
            return "broken", f"{len(bad)} of {len(answers)} not resolved: {first.error}", probes
        return "ok", f"{len(answers)} name(s) resolved", probes

    return bounded("dns", outage.layer_timeout_s, check)


# --- 2. Endpoint -------------------------------------------------------------------------


@task(cache_policy=NO_CACHE, task_run_name="cascade-endpoint")
def check_endpoint(outage: OutageSettings) -> LayerResult:
    """The load balancer / ingress endpoint answers: DNS, TCP, TLS and HTTP each timed."""
    if not outage.endpoint_url:
        return _not_configured("endpoint", "no endpoint URL (RUNBOOKS_OUTAGE_ENDPOINT_URL)")
    url = outage.endpoint_url
    timeout = min(outage.endpoint_timeout_s, outage.layer_timeout_s)

    def check() -> Finding:
        verify = endpoint_verify(outage)
        try:
            response, t = timed_url(url, timeout_s=timeout, verify=verify)
        except httpx.TransportError as exc:
            # Where it stopped tells which part of the path is down.
            probe = Probe(
                item="request", ok=False, observed=_error(exc), threshold=f"{timeout:g} s"
            )
            return "broken", f"{shown_url(url)}: {_error(exc)}", [probe]
        phases = [
            ("DNS", t.dns_ms),
            ("TCP connect", t.connect_ms),
            ("TLS handshake", t.tls_ms),
            ("first byte", t.first_byte_ms),
            ("total", t.total_ms),
        ]
        probes = [
            Probe(
                item=name,
                ok=True,
                observed=f"{ms:.1f} ms" if ms is not None else "-",
                detail="cumulative from the start, as curl -w",
                ms=ms,
            )
            for name, ms in phases
            if ms is not None  # an IP literal has no lookup, plain HTTP no TLS
        ]
        ok = response.status_code < 400
        probes.append(
            Probe(
                item="HTTP status",
                ok=ok,
                observed=str(response.status_code),
                threshold="2xx/3xx",
                ms=t.total_ms,
            )
        )
        summary = f"{shown_url(url)} answered {response.status_code} in {t.total_ms:.0f} ms"
        return ("ok" if ok else "broken"), summary, probes

    return bounded("endpoint", outage.layer_timeout_s, check)


# --- 3. Ingress controller ---------------------------------------------------------------


@task(cache_policy=NO_CACHE, task_run_name="cascade-ingress")
def check_ingress(outage: OutageSettings, kube: KubernetesSettings) -> LayerResult:
    """The ingress controller's Deployment has ready replicas and its pods are Ready."""
    ns, name = outage.ingress_namespace, outage.ingress_deployment
    settings = _kube(kube, outage)

    def check() -> Finding:
        with kube_session(settings) as k:
            dep = get_deployment(k, name, ns)
            pods = pods_of(k, ns, label_selector_string(dep.spec.selector))
        wanted = dep.spec.replicas if dep.spec.replicas is not None else 1
        ready = (dep.status.ready_replicas if dep.status else None) or 0
        probes = [
            Probe(
                item=f"deployment {ns}/{name}",
                ok=ready > 0,
                observed=f"{ready}/{wanted} ready",
                threshold=">= 1 ready replica",
            )
        ]
        live = [p for p in pods if not p.terminating]
        probes += [
            Probe(
                item=f"pod {p.name}",
                ok=p.ready,
                observed=f"{p.phase or '?'}, {'Ready' if p.ready else 'not Ready'}",
                detail=", ".join(x for x in (p.reason, f"{p.restarts} restarts") if x),
            )
            for p in live
        ]
        not_ready = [p.name for p in live if not p.ready]
        if ready == 0:
            why = "scaled to 0" if wanted == 0 else "no ready replica"
            return "broken", f"{ns}/{name}: {why} ({ready}/{wanted} ready)", probes
        if not_ready:
            return "broken", f"{len(not_ready)} of {len(live)} pods not Ready", probes
        return "ok", f"{ns}/{name}: {ready}/{wanted} ready", probes

    return bounded("ingress", outage.layer_timeout_s, check)


# --- 4. Kubernetes -----------------------------------------------------------------------


@task(cache_policy=NO_CACHE, task_run_name="cascade-kubernetes")
def check_kubernetes(outage: OutageSettings, kube: KubernetesSettings) -> LayerResult:
    """The API answers (timed), every Node is Ready, and pods of ALL namespaces not Running
    or not Ready are listed (their own layers judge them, not this one)."""
    settings = _kube(kube, outage)

    def check() -> Finding:
        with kube_session(settings) as k:
            start = time.perf_counter()
            version = call(k, k8s.VersionApi(k.client).get_code, verb="get", resource="version")
            api_ms = round((time.perf_counter() - start) * 1000, 2)
            nodes = node_infos(k)
            pods = not_running_pods(k)
        probes = [Probe(item="API server", ok=True, observed=str(version.git_version), ms=api_ms)]
        probes += [
            Probe(
                item=f"node {n.name}",
                ok=n.ready,
                observed="Ready" if n.ready else "NotReady",
                threshold="Ready=True",
                detail="; ".join(n.conditions),
            )
            for n in nodes
        ]
        probes += [
            Probe(
                item=f"pod {p.namespace}/{p.name}",
                ok=False,
                observed=f"{p.phase or '?'}, {'Ready' if p.ready else 'not Ready'}",
                detail=", ".join(x for x in (p.reason, f"{p.restarts} restarts") if x),
            )
            for p in pods[:MAX_POD_ROWS]
        ]
        listed = f"; {len(pods)} pod(s) not Running/Ready in all namespaces" if pods else ""
        not_ready = [n.name for n in nodes if not n.ready]
        if not nodes:
            return "broken", f"API answers in {api_ms:.0f} ms but has no Node{listed}", probes
        if not_ready:
            summary = f"{len(not_ready)} of {len(nodes)} node(s) NotReady: " + ", ".join(not_ready)
            return "broken", summary + listed, probes
        return "ok", f"API {api_ms:.0f} ms, {len(nodes)} node(s) Ready{listed}", probes

    return bounded("kubernetes", outage.layer_timeout_s, check)


# --- 5. Backend --------------------------------------------------------------------------


@task(cache_policy=NO_CACHE, task_run_name="cascade-backend")
def check_backend(outage: OutageSettings, kube: KubernetesSettings) -> LayerResult:
    """The backend's pods: running and Ready, restarts, last termination, waiting reason."""
    settings = _kube(kube, outage)
    ns, selector = kube.namespace, kube.label_selector

    def check() -> Finding:
        with kube_session(settings) as k:
            pods = restarts_of(k, ns, selector)
        probes = []
        stuck: list[str] = []
        for p in pods:
            waiting = sorted({c.waiting_reason for c in p.containers if c.waiting_reason})
            last = sorted(
                {c.last_terminated_reason for c in p.containers if c.last_terminated_reason}
            )
            if BROKEN_WAITING & set(waiting):
                stuck.append(p.pod)
            healthy = p.phase == "Running" and bool(p.ready) and not waiting
            detail = [f"waiting: {', '.join(waiting)}"] if waiting else []
            detail += [f"last terminated: {', '.join(last)}"] if last else []
            probes.append(
                Probe(
                    item=f"pod {p.pod}",
                    ok=healthy,
                    observed=f"{p.phase or '?'}, {'Ready' if p.ready else 'not Ready'}, "
                    f"{p.restarts} restarts",
                    detail="; ".join(detail),
                )
            )
        ready = sum(1 for p in pods if p.phase == "Running" and p.ready)
        if not pods:
            return "broken", f"no pod matches {selector} in {ns}", probes
        if stuck:
            reasons = sorted(
                {
                    c.waiting_reason
                    for p in pods
                    for c in p.containers
                    if c.waiting_reason in BROKEN_WAITING
                }
            )
            summary = f"{len(stuck)} of {len(pods)} pod(s) {'/'.join(r or '' for r in reasons)}"
            return "broken", summary, probes
        if ready == 0:
            return "broken", f"none of {len(pods)} pod(s) Running and Ready", probes
        restarts = sum(p.restarts for p in pods)
        return "ok", f"{ready}/{len(pods)} pod(s) Ready, {restarts} restarts", probes

    return bounded("backend", outage.layer_timeout_s, check)


# --- 6. Database -------------------------------------------------------------------------

_REPLICATION_SQL = """
SELECT application_name, client_addr::text AS client, state,
       EXTRACT(EPOCH FROM replay_lag)::float8 AS replay_lag_s,
       CASE WHEN pg_is_in_recovery() THEN NULL
            ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::float8 END AS lag_bytes
FROM pg_stat_replication ORDER BY application_name, client
"""
_REPLICA_SQL = """
SELECT pg_is_in_recovery() AS standby,
       EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())::float8 AS lag_s
"""


def _bounded_pg(pg: PostgresSettings, outage: OutageSettings) -> PostgresSettings:
    """The connection settings with waits no longer than the layer's own limit."""
    limit_s = outage.layer_timeout_s
    return pg.model_copy(
        update={
            "connect_timeout_s": max(1, min(pg.connect_timeout_s, int(limit_s))),
            "statement_timeout_ms": max(100, min(pg.statement_timeout_ms, int(limit_s * 1000))),
        }
    )


def _replica_probe(outage: OutageSettings, pg: PostgresSettings) -> Probe:
    assert outage.replica_dsn is not None
    replica = _bounded_pg(pg, outage).model_copy(
        update={"dsn": outage.replica_dsn, "dsn_secret_block": None}
    )
    target = pg_target(replica)
    try:
        with pg_connect(replica) as conn:
            row = conn.execute(_REPLICA_SQL).fetchone()
    except (TransientError, PermanentError) as exc:
        return Probe(item=f"replica {target}", ok=False, observed=_error(exc))
    if row is None or not row["standby"]:
        return Probe(item=f"replica {target}", ok=False, observed="not in recovery (no replica)")
    lag = row["lag_s"]
    return Probe(
        item=f"replica {target}",
        ok=True,
        observed=f"replay lag {lag:.1f} s" if lag is not None else "nothing replayed yet",
        detail="since the last replayed transaction (grows while the primary is idle)",
        ms=None if lag is None else round(lag * 1000, 1),
    )


@task(cache_policy=NO_CACHE, task_run_name="cascade-database")
def check_database(outage: OutageSettings, pg: PostgresSettings) -> LayerResult:
    """Connect and `SELECT 1` (timed); replication lag from pg_stat_replication and a replica."""
    settings = _bounded_pg(pg, outage)

    def check() -> Finding:
        target = pg_target(settings)
        start = time.perf_counter()
        with pg_connect(settings) as conn:
            connect_ms = round((time.perf_counter() - start) * 1000, 2)
            start = time.perf_counter()
            conn.execute("SELECT 1").fetchone()
            select_ms = round((time.perf_counter() - start) * 1000, 2)
            replicas = conn.execute(_REPLICATION_SQL).fetchall()
        probes = [
            Probe(
                item=f"connect {target}", ok=True, observed=f"{connect_ms:.1f} ms", ms=connect_ms
            ),
            Probe(item="SELECT 1", ok=True, observed=f"{select_ms:.1f} ms", ms=select_ms),
        ]
        for r in replicas:
            lag = r["replay_lag_s"]
            behind = r["lag_bytes"]
            probes.append(
                Probe(
                    item=f"replication to {r['application_name'] or r['client'] or '?'}",
                    ok=r["state"] == "streaming",
                    observed=f"{r['state']}, replay lag "
                    + (f"{lag:.1f} s" if lag is not None else "-")
                    + (f", {int(behind)} bytes behind" if behind is not None else ""),
                    ms=None if lag is None else round(lag * 1000, 1),
                )
            )
        if outage.replica_dsn is not None:
            probes.append(_replica_probe(outage, pg))
        extra = f", {len(replicas)} replica(s) streaming from it" if replicas else ""
        # The primary decides the layer; a replica's trouble is a figure, not an outage.
        return "ok", f"{target} answers: connect {connect_ms:.0f} ms{extra}", probes

    return bounded("database", outage.layer_timeout_s, check)


# --- 7. External dependencies ------------------------------------------------------------


def _dependency(url: str, timeout: float) -> Probe:
    shown = shown_url(url)
    try:
        response, t = timed_url(url, timeout_s=timeout)
    except httpx.TransportError as exc:
        return Probe(
            item=shown, ok=False, observed=_error(exc), threshold=f"< 500 in {timeout:g} s"
        )
    return Probe(
        item=shown,
        ok=response.status_code < 500,
        observed=f"HTTP {response.status_code}",
        threshold=f"< 500 in {timeout:g} s",
        ms=t.total_ms,
    )


@task(cache_policy=NO_CACHE, task_run_name="cascade-dependencies")
def check_dependencies(outage: OutageSettings) -> LayerResult:
    """Every external dependency URL answers below 500 within its timeout (all at once)."""
    if not outage.dependencies:
        return _not_configured("dependencies", "none configured (RUNBOOKS_OUTAGE_DEPENDENCIES)")
    urls = outage.dependencies
    timeout = min(outage.dependency_timeout_s, outage.layer_timeout_s)

    def check() -> Finding:
        with ThreadPoolExecutor(min(16, len(urls)), thread_name_prefix="dependency") as pool:
            probes = list(pool.map(lambda u: _dependency(u, timeout), urls))
        down = [p for p in probes if not p.ok]
        if down:
            return "broken", f"{len(down)} of {len(probes)} down: {down[0].item}", probes
        return "ok", f"{len(probes)} answered", probes

    return bounded("dependencies", outage.layer_timeout_s, check)
