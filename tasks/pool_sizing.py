"""Pool sizing: does the backend's connection pool fit PostgreSQL's `max_connections`?

The check, per run of db-pool-exhausted (docs/postgres.md, "Pool sizing"):

    pods x pool size per pod + other clients + headroom <= max_connections - reserved

- pods: the backend Deployment's pods, counting a rolling update's surge: the max of
  `spec.replicas`, `status.replicas` and `status.updatedReplicas`;
- pool size per pod: the backend container's env var (a literal, or `valueFrom.configMapKeyRef`
  read from that ConfigMap), else an explicitly configured ConfigMap key;
- other clients: client connections whose role is not the backend's (the run's
  pg_stat_activity reading, by role);
- reserved: `superuser_reserved_connections` + `reserved_connections` (PostgreSQL 16+).

`size_pool` and `other_clients` are pure; the Kubernetes read is a task.
"""

from __future__ import annotations

from typing import Any, Literal

from kubernetes import client as k8s
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.errors import PermanentError
from tasks.kubernetes.api import call, get_deployment, kube_session, run_logger
from tasks.kubernetes.semantics import meta
from tasks.postgres import PoolUsage
from tasks.retry import RETRY_READ
from tasks.settings import KubernetesSettings


class PoolSizingSettings(BaseSettings):
    """Where the backend's pool size is configured and which PostgreSQL role is the backend's."""

    model_config = SettingsConfigDict(env_prefix="RUNBOOKS_BACKEND_POOL_")

    env: str = Field("DB_POOL_SIZE", description="The backend container's pool-size env var.")
    container: str | None = Field(
        None, description="The backend container's name; unset = the pod's first container."
    )
    configmap: str | None = Field(
        None, description="ConfigMap holding the pool size when the env var is not set."
    )
    configmap_key: str | None = Field(None, description="Its key (with `configmap`).")
    db_role: str | None = Field(
        None, description="The backend's PostgreSQL role; every other role is 'other clients'."
    )
    headroom: int = Field(
        5, ge=0, le=10_000, description="Slots kept free on top (deploys, psql, migrations)."
    )


class BackendPool(BaseModel):
    """The backend Deployment's pods and its configured pool size per pod (read only)."""

    deployment: str
    namespace: str
    container: str
    spec_replicas: int
    status_replicas: int
    updated_replicas: int
    pods: int = Field(description="max(spec, status, updated): a rolling update's surge counts.")
    env: str
    pool_size: int | None = Field(description="None: not configured anywhere we look.")
    source: str = Field(description="Where the pool size came from, for the report.")
    env_kind: Literal["literal", "configMapKeyRef", "other", "unset"]
    env_value: str | None = Field(description="The env var's literal value, when it has one.")


class PoolSizing(BaseModel):
    """The sizing check and the recommended (= largest allowed) pool size per pod."""

    max_connections: int
    reserved: int
    other_clients: int
    headroom: int
    pods: int
    pool_size: int | None
    budget: int = Field(description="max_connections - reserved - other clients - headroom.")
    demand: int | None = Field(description="pods x pool size.")
    oversubscribed: bool | None = Field(description="demand > budget; None without a pool size.")
    recommended: int = Field(description="floor(budget / max(pods, 1)), at least 1: the cap.")


def size_pool(
    *,
    max_connections: int,
    reserved: int,
    other_clients: int,
    headroom: int,
    pods: int,
    pool_size: int | None,
) -> PoolSizing:
    """The sizing check: pods x pool + other + headroom <= max_connections - reserved."""
    budget = max_connections - reserved - other_clients - headroom
    demand = pods * pool_size if pool_size is not None else None
    return PoolSizing(
        max_connections=max_connections,
        reserved=reserved,
        other_clients=other_clients,
        headroom=headroom,
        pods=pods,
        pool_size=pool_size,
        budget=budget,
        demand=demand,
        oversubscribed=None if demand is None else demand > budget,
        # Never below 1: a backend without a pool is down; the check still says "over".
        recommended=max(1, budget // max(pods, 1)),
    )


def parse_pool_size(value: str | None, where: str) -> int:
    """A pool size as written in an env var or ConfigMap: a positive integer."""
    text = (value or "").strip()
    if not text.isdigit() or int(text) < 1:
        raise PermanentError(f"pool size in {where} is not a positive integer: {text[:40]!r}")
    return int(text)


def find_container(dep: Any, name: str | None) -> k8s.V1Container:
    """The backend container: by name, else the pod's first container."""
    containers: list[k8s.V1Container] = dep.spec.template.spec.containers or []
    found = next((c for c in containers if name is None or c.name == name), None)
    if found is None:
        raise PermanentError(
            f"deployment {meta(dep).name} has no container {name!r} "
            f"(containers: {', '.join(c.name for c in containers)})"
        )
    return found


def find_env(container: k8s.V1Container, env: str) -> k8s.V1EnvVar | None:
    """The container's env entry of that name (the last one wins, as in the kubelet)."""
    return next((e for e in reversed(container.env or []) if e.name == env), None)


def env_kind(entry: k8s.V1EnvVar | None) -> Literal["literal", "configMapKeyRef", "other", "unset"]:
    """How an env var gets its value."""
    if entry is None:
        return "unset"
    if entry.value_from is None:
        return "literal"
    return "configMapKeyRef" if entry.value_from.config_map_key_ref else "other"


def _configmap_value(kube: Any, namespace: str, name: str, key: str) -> str | None:
    cm = call(
        kube,
        kube.core.read_namespaced_config_map,
        name,
        namespace,
        verb="get",
        resource="configmaps",
        name=name,
        namespace=namespace,
    )
    return (cm.data or {}).get(key)


def read_backend_pool_now(
    settings: KubernetesSettings | None = None, sizing: PoolSizingSettings | None = None
) -> BackendPool:
    """Read the backend Deployment's pods and pool size (no task wrapper)."""
    settings = settings or KubernetesSettings()
    sizing = sizing or PoolSizingSettings()
    name, namespace = settings.backend_deployment, settings.namespace
    with kube_session(settings) as kube:
        dep = get_deployment(kube, name, namespace)
        container = find_container(dep, sizing.container)
        entry = find_env(container, sizing.env)
        kind = env_kind(entry)
        pool: int | None = None
        source = "not configured"
        if entry is not None and kind == "literal":
            where = f"env {sizing.env}"
            pool, source = parse_pool_size(entry.value, where), where
        elif entry is not None and kind == "configMapKeyRef":
            ref: Any = entry.value_from.config_map_key_ref  # type: ignore[union-attr]
            where = f"env {sizing.env} from ConfigMap {ref.name} key {ref.key}"
            value = _configmap_value(kube, namespace, ref.name, ref.key)
            pool, source = (
                (parse_pool_size(value, where), where)
                if value is not None
                else (None, where + " (missing)")
            )
        elif kind == "other":
            source = f"env {sizing.env} from a source other than a ConfigMap (not read)"
        elif sizing.configmap and sizing.configmap_key:
            where = f"ConfigMap {sizing.configmap} key {sizing.configmap_key}"
            value = _configmap_value(kube, namespace, sizing.configmap, sizing.configmap_key)
            pool, source = (
                (parse_pool_size(value, where), where)
                if value is not None
                else (None, where + " (missing)")
            )
    status = dep.status or k8s.V1DeploymentStatus()
    spec_replicas = dep.spec.replicas if dep.spec.replicas is not None else 1
    status_replicas, updated = status.replicas or 0, status.updated_replicas or 0
    return BackendPool(
        deployment=name,
        namespace=namespace,
        container=container.name,
        spec_replicas=spec_replicas,
        status_replicas=status_replicas,
        updated_replicas=updated,
        pods=max(spec_replicas, status_replicas, updated),
        env=sizing.env,
        pool_size=pool,
        source=source,
        env_kind=kind,
        env_value=entry.value if entry is not None and kind == "literal" else None,
    )


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="read-backend-pool")
def read_backend_pool(
    settings: KubernetesSettings | None = None, sizing: PoolSizingSettings | None = None
) -> BackendPool:
    """Read the backend Deployment's pods (surge counted) and its pool size per pod."""
    pool = read_backend_pool_now(settings, sizing)
    run_logger().info(
        "%s/%s: %d pod(s), pool size %s (%s)",
        pool.namespace,
        pool.deployment,
        pool.pods,
        pool.pool_size,
        pool.source,
    )
    return pool


def other_clients(usage: PoolUsage, backend_role: str) -> int:
    """Client connections of every role but the backend's, from a usage measurement.

    Taken from the run's own `pg_stat_activity` reading (by role): no extra connection
    while the server is out of slots.
    """
    return sum(c.count for c in usage.by_user if c.key != backend_role)
