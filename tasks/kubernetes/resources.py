"""Raise one container's memory limit, capped at 2x the current limit.

The new value is decided before this runs (by a person approving it, in the flow); the task
only refuses what is unsafe, in two places:

- `MemoryLimitChange` (the plan, a pydantic model) cannot be built with a target above 2x
  the current limit, below it, or for a container without a memory limit;
- `plan_memory_limit` (read, retried) reads the current limit and builds that model (and,
  like `scale`, refuses a workload whose pods do not match `RUNBOOKS_K8S_LABEL_SELECTOR`);
  `apply_memory_limit` (idempotent write, retried) re-reads: already at the target -> no-op
  (a retried write whose answer was lost); the limit moved since the plan -> refused;
  otherwise one strategic-merge patch on the container, matched by name, pinned to the
  resourceVersion just read (`workload.apply_container_field`).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from kubernetes import client as k8s
from kubernetes.utils import parse_quantity
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import PermanentError, SafetyViolation
from tasks.kubernetes.api import (
    kube_session,
    run_logger,
)
from tasks.kubernetes.models import MemoryLimitChange, MemoryLimitResult
from tasks.kubernetes.semantics import meta, require_platform_pods, validated_plan
from tasks.kubernetes.workload import (
    ContainerFieldWrite,
    WriteCall,
    apply_container_field,
    container_named,
    get_workload,
    workload_write,
)
from tasks.retry import RETRY_IDEMPOTENT_WRITE, RETRY_READ
from tasks.settings import KubernetesSettings

Kind = Literal["deployment", "statefulset"]


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity ('512Mi', '1G', '1e9') in bytes, rounded up like the API."""
    try:
        value = Decimal(parse_quantity(quantity))
    except (ValueError, TypeError) as exc:
        raise PermanentError(f"invalid memory quantity {quantity!r}: {exc}") from None
    return int(value.to_integral_value(rounding="ROUND_CEILING"))


def _limit_of(container: k8s.V1Container) -> str | None:
    limits = (container.resources.limits if container.resources else None) or {}
    memory: str | None = limits.get("memory")
    return memory


@task(
    **RETRY_READ,
    cache_policy=NO_CACHE,
    task_run_name="plan-memory-limit-{namespace}/{kind}-{name}-{container}",
)
def plan_memory_limit(
    kind: Kind,
    name: str,
    namespace: str,
    container: str,
    target: str,
    settings: KubernetesSettings | None = None,
) -> MemoryLimitChange:
    """Read a container's memory limit and check `target` is a raise of at most 2x (read only)."""
    target_bytes = memory_bytes(target)
    settings = settings or KubernetesSettings()
    with kube_session(settings) as kube:
        obj = get_workload(kube, kind, name, namespace)
    require_platform_pods(
        settings.label_selector,
        obj,
        f"change the memory limit of {kind} {name} in namespace {namespace}",
    )
    current = _limit_of(container_named(obj, kind, container))
    if current is None:
        raise SafetyViolation(
            f"{kind} {name} container {container} has no memory limit: there is nothing to "
            "raise, and setting one could OOM-kill it; refused"
        )
    planned = {
        "kind": kind,
        "name": name,
        "namespace": namespace,
        "container": container,
        "current": current,
        "current_bytes": memory_bytes(current),
        "target": target,
        "target_bytes": target_bytes,
        "generation": meta(obj).generation,
    }
    return validated_plan(MemoryLimitChange, planned, f"{kind} {name} container {container}")


@task(
    **RETRY_IDEMPOTENT_WRITE,
    cache_policy=NO_CACHE,
    task_run_name="apply-memory-limit-{plan.namespace}/{plan.kind}-{plan.name}-{plan.container}",
)
def apply_memory_limit(
    plan: MemoryLimitChange, dry_run: bool = False, settings: KubernetesSettings | None = None
) -> MemoryLimitResult:
    """Set the planned memory limit; a no-op when the container already has it."""
    plan = validated_plan(
        MemoryLimitChange, plan.model_dump(), f"{plan.kind} {plan.name} container {plan.container}"
    )
    log = run_logger()
    kind, name, namespace = plan.kind, plan.name, plan.namespace

    def result(patched: bool, after: str, message: str) -> MemoryLimitResult:
        log.info(message)
        return MemoryLimitResult(
            kind=kind,
            name=name,
            namespace=namespace,
            container=plan.container,
            before=plan.current,
            after=after,
            dry_run=dry_run,
            # The limit is now the target and was not when planned (by this attempt's patch
            # or an earlier attempt's whose answer was lost).
            changed=not dry_run and not plan.already_at_target,
            patched=patched,
            message=message,
        )

    write = ContainerFieldWrite(
        kind=kind,
        name=name,
        namespace=namespace,
        container=plan.container,
        read=_limit_of,
        at_target=lambda now: now is not None and memory_bytes(now) == plan.target_bytes,
        as_planned=lambda now: now is not None and memory_bytes(now) == plan.current_bytes,
        moved=lambda now: (
            f"{kind} {name} container {plan.container}: memory limit changed since the "
            f"plan ({plan.current} -> {now}); nothing patched, plan again"
        ),
        fields={"resources": {"limits": {"memory": plan.target}}},
    )
    with kube_session(settings) as kube:
        patched, now = apply_container_field(kube, write, dry_run)
    if not patched:
        return result(
            False,
            str(now),
            f"{kind}.apps/{name} container {plan.container} already has memory limit "
            f"{now}; nothing patched",
        )
    verb = "would raise" if dry_run else "raised"
    return result(
        True,
        plan.current if dry_run else plan.target,
        f"{kind}.apps/{name} container {plan.container}: {verb} memory limit "
        f"{plan.current} -> {plan.target}" + (" (server dry run)" if dry_run else ""),
    )


@workload_write(plan_memory_limit, apply_memory_limit)
def raise_memory_limit(
    kind: Kind,
    name: str,
    namespace: str,
    container: str,
    target: str,
    dry_run: bool = False,
    settings: KubernetesSettings | None = None,
) -> WriteCall:
    """Raise a container's memory limit (<= 2x): plan (read) then apply (idempotent write).

    The new value comes from the flow, after approval; this refuses anything above 2x.
    """
    planned = {
        "kind": kind,
        "name": name,
        "namespace": namespace,
        "container": container,
        "target": target,
    }
    return WriteCall(planned, dry_run, settings)
