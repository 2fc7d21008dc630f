"""Read-only Kubernetes tasks for diagnosis: pods, their logs, events, Nodes."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from kubernetes import client as k8s
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import PermanentError
from tasks.kubernetes.api import Kube, call, get_deployment, kube_session
from tasks.kubernetes.models import (
    ContainerRestarts,
    EventInfo,
    NodeInfo,
    PodInfo,
    PodLogs,
    PodRestarts,
    TailLogsResult,
)
from tasks.kubernetes.semantics import label_selector_string, meta
from tasks.logs import scrub_secrets
from tasks.retry import RETRY_READ
from tasks.settings import KubernetesSettings


def _pod_info(pod: k8s.V1Pod) -> PodInfo:
    status = pod.status or k8s.V1PodStatus()
    statuses = status.container_statuses or []
    ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])
    waiting = next((c.state.waiting.reason for c in statuses if c.state and c.state.waiting), None)
    return PodInfo(
        name=meta(pod).name,
        namespace=meta(pod).namespace,
        phase=status.phase,
        ready=ready,
        ready_containers=sum(1 for c in statuses if c.ready),
        containers=len(pod.spec.containers) if pod.spec else len(statuses),
        restarts=sum(c.restart_count or 0 for c in statuses),
        node=pod.spec.node_name if pod.spec else None,
        ip=status.pod_ip,
        created=meta(pod).creation_timestamp,
        terminating=meta(pod).deletion_timestamp is not None,
        reason=status.reason or waiting,
    )


def list_pod_objects(kube: Kube, namespace: str, selector: str) -> list[k8s.V1Pod]:
    """Pods matching `selector` (all when empty), sorted by name."""
    pods = call(
        kube,
        kube.core.list_namespaced_pod,
        namespace,
        label_selector=selector or None,
        verb="list",
        resource="pods",
        namespace=namespace,
    )
    return sorted(pods.items, key=lambda p: meta(p).name or "")


def pods_of(kube: Kube, namespace: str, selector: str) -> list[PodInfo]:
    """`kubectl get pods -l selector -o wide` as PodInfo, sorted by name."""
    return [_pod_info(p) for p in list_pod_objects(kube, namespace, selector)]


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="list-pods-{label_selector}")
def list_pods(
    label_selector: str | None = None,
    namespace: str | None = None,
    settings: KubernetesSettings | None = None,
) -> list[PodInfo]:
    """List pods with phase, readiness, restarts and node (default: the platform's label)."""
    settings = settings or KubernetesSettings()
    namespace = namespace or settings.namespace
    selector = settings.label_selector if label_selector is None else label_selector
    with kube_session(settings) as kube:
        return pods_of(kube, namespace, selector)


def _container_restarts(pod: k8s.V1Pod, status: k8s.V1ContainerStatus) -> ContainerRestarts:
    state = status.state or k8s.V1ContainerState()
    last = status.last_state.terminated if status.last_state else None
    spec = next(
        (c for c in (pod.spec.containers if pod.spec else []) if c.name == status.name), None
    )
    limits = (spec.resources.limits if spec and spec.resources else None) or {}
    kind = (
        "running"
        if state.running
        else "waiting"
        if state.waiting
        else "terminated"
        if state.terminated
        else "unknown"
    )
    return ContainerRestarts(
        container=status.name,
        restart_count=status.restart_count or 0,
        ready=bool(status.ready),
        state=kind,
        waiting_reason=state.waiting.reason if state.waiting else None,
        last_terminated_reason=last.reason if last else None,
        last_exit_code=last.exit_code if last else None,
        last_finished_at=last.finished_at if last else None,
        memory_limit=limits.get("memory"),
    )


def restarts_of(kube: Kube, namespace: str, selector: str) -> list[PodRestarts]:
    """Per pod matching `selector`: its containers' restarts and last termination."""
    result = []
    for pod in list_pod_objects(kube, namespace, selector):
        status = pod.status or k8s.V1PodStatus()
        # Init containers restart too (a crash-looping migration shows up there).
        statuses = (status.init_container_statuses or []) + (status.container_statuses or [])
        result.append(
            PodRestarts(
                pod=meta(pod).name,
                namespace=meta(pod).namespace,
                phase=status.phase,
                node=pod.spec.node_name if pod.spec else None,
                containers=[_container_restarts(pod, c) for c in statuses],
                ready=any(
                    c.type == "Ready" and c.status == "True" for c in status.conditions or []
                ),
            )
        )
    return result


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="pod-restarts-{label_selector}")
def pod_restarts(
    label_selector: str | None = None,
    namespace: str | None = None,
    settings: KubernetesSettings | None = None,
) -> list[PodRestarts]:
    """Per pod and container: restarts, last termination (OOMKilled...), waiting reason."""
    settings = settings or KubernetesSettings()
    namespace = namespace or settings.namespace
    selector = settings.label_selector if label_selector is None else label_selector
    with kube_session(settings) as kube:
        return restarts_of(kube, namespace, selector)


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="tail-logs-{deployment}")
def tail_logs(
    deployment: str,
    lines: int = 100,
    grep: str | None = None,
    namespace: str | None = None,
    settings: KubernetesSettings | None = None,
) -> TailLogsResult:
    """The last `lines` log lines of each container of a Deployment's pods, secrets masked."""
    if not 1 <= lines <= 10_000:
        raise PermanentError(f"lines must be between 1 and 10000, not {lines}")
    try:
        pattern = re.compile(grep) if grep else None
    except re.error as exc:
        raise PermanentError(f"invalid grep pattern {grep!r}: {exc}") from None
    settings = settings or KubernetesSettings()
    namespace = namespace or settings.namespace
    out: list[PodLogs] = []
    with kube_session(settings) as kube:
        dep = get_deployment(kube, deployment, namespace)
        for pod in list_pod_objects(kube, namespace, label_selector_string(dep.spec.selector)):
            containers = pod.spec.containers if pod.spec else []
            node_name = pod.spec.node_name if pod.spec else None
            for container in containers:
                name = meta(pod).name
                if not node_name:
                    out.append(
                        PodLogs(pod=name, container=container.name, lines=[], error="not scheduled")
                    )
                    continue
                try:
                    text = call(
                        kube,
                        kube.core.read_namespaced_pod_log,
                        name,
                        namespace,
                        container=container.name,
                        tail_lines=lines,
                        verb="get",
                        resource="pods/log",
                        name=name,
                        namespace=namespace,
                    )
                except PermanentError as exc:
                    if "forbidden" in str(exc) or "credentials" in str(exc):
                        raise
                    # One pod gone or not started must not hide the others' logs.
                    out.append(
                        PodLogs(pod=name, container=container.name, lines=[], error=str(exc))
                    )
                    continue
                # Credentials a container logged never leave this task: every reader
                # (counts, samples in a report, the task's result) sees them masked.
                got = [scrub_secrets(line) for line in str(text).splitlines()]
                if pattern is not None:
                    got = [line for line in got if pattern.search(line)]
                out.append(PodLogs(pod=name, container=container.name, lines=got))
    return TailLogsResult(
        deployment=deployment, namespace=namespace, lines=lines, grep=grep, logs=out
    )


def event_time(ev: k8s.CoreV1Event) -> datetime:
    """When an event happened, as `kubectl get events --sort-by=.lastTimestamp` orders them:
    lastTimestamp, else eventTime (events.k8s.io writers set only that), else creation."""
    for ts in (ev.last_timestamp, ev.event_time, meta(ev).creation_timestamp):
        if ts is not None:
            return ts if ts.tzinfo else ts.replace(tzinfo=UTC)
    return datetime.min.replace(tzinfo=UTC)


def _event_info(ev: k8s.CoreV1Event) -> EventInfo:
    return EventInfo(
        namespace=meta(ev).namespace,
        type=ev.type,
        reason=ev.reason,
        message=ev.message,
        kind=ev.involved_object.kind,
        name=ev.involved_object.name,
        count=ev.count,
        first_seen=ev.first_timestamp,
        last_seen=event_time(ev),
    )


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="list-events-{namespace}")
def list_events(
    namespace: str | None = None,
    object_name: str | None = None,
    settings: KubernetesSettings | None = None,
) -> list[EventInfo]:
    """A namespace's events, oldest first (by last seen), optionally for one object."""
    settings = settings or KubernetesSettings()
    namespace = namespace or settings.namespace
    with kube_session(settings) as kube:
        events = call(
            kube,
            kube.core.list_namespaced_event,
            namespace,
            field_selector=f"involvedObject.name={object_name}" if object_name else None,
            verb="list",
            resource="events",
            namespace=namespace,
        )
    return [_event_info(ev) for ev in sorted(events.items, key=event_time)]


#: The most events `cluster_events` returns (a busy cluster keeps thousands for an hour).
MAX_EVENTS = 1000


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="cluster-events")
def cluster_events(limit: int = 100, settings: KubernetesSettings | None = None) -> list[EventInfo]:
    """Events of all namespaces, the newest `limit`, oldest first (kubectl --sort-by order)."""
    if not 1 <= limit <= MAX_EVENTS:
        raise PermanentError(f"limit must be between 1 and {MAX_EVENTS}, not {limit}")
    with kube_session(settings) as kube:
        events = call(kube, kube.core.list_event_for_all_namespaces, verb="list", resource="events")
    # sorted() is stable: events of the same second keep the API's order, as kubectl does.
    ordered = sorted(events.items, key=event_time)
    return [_event_info(ev) for ev in ordered[-limit:]]


def not_running_pods(kube: Kube) -> list[PodInfo]:
    """Pods of every namespace that are not Running or not Ready, by namespace and name.

    Succeeded pods (finished Jobs) are done, not down: they are left out."""
    pods = call(kube, kube.core.list_pod_for_all_namespaces, verb="list", resource="pods")
    found = [_pod_info(p) for p in pods.items]
    return sorted(
        (p for p in found if p.phase != "Succeeded" and (p.phase != "Running" or not p.ready)),
        key=lambda p: (p.namespace, p.name),
    )


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="pods-not-ready-all-namespaces")
def pods_not_ready(settings: KubernetesSettings | None = None) -> list[PodInfo]:
    """Pods in all namespaces not Running or not Ready (needs the ClusterRole's pods list)."""
    with kube_session(settings) as kube:
        return not_running_pods(kube)


def node_infos(kube: Kube) -> list[NodeInfo]:
    """Every Node's readiness and conditions, by name."""
    nodes = call(kube, kube.core.list_node, verb="list", resource="nodes")
    result = []
    for node in sorted(nodes.items, key=lambda n: meta(n).name or ""):
        conditions = (node.status.conditions if node.status else None) or []
        result.append(
            NodeInfo(
                name=meta(node).name,
                ready=any(c.type == "Ready" and c.status == "True" for c in conditions),
                unschedulable=bool(node.spec and node.spec.unschedulable),
                problems=[
                    f"{c.type}: {c.message or c.reason or ''}".strip()
                    for c in conditions
                    if c.type != "Ready" and c.status == "True"
                ],
                conditions=[
                    f"{c.type}={c.status}" + (f" ({c.reason})" if c.reason else "")
                    for c in conditions
                ],
                kubelet_version=(
                    node.status.node_info.kubelet_version
                    if node.status and node.status.node_info
                    else None
                ),
                addresses=[
                    a.address for a in (node.status.addresses if node.status else None) or []
                ],
            )
        )
    return result


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="node-status")
def node_status(settings: KubernetesSettings | None = None) -> list[NodeInfo]:
    """Every Node's readiness, schedulability and pressure conditions (needs the ClusterRole)."""
    with kube_session(settings) as kube:
        return node_infos(kube)
