"""Set one container env var of a Deployment to a literal, capped, with its exact undo.

Like the memory limit raise (`resources`), two steps so a retry never applies twice:

- `plan_env_value` (read, retried): reads the entry as it is now and records it (the undo),
  and checks the target against the cap decided by the caller (`EnvChange` refuses a
  target above the cap or below 1);
- `apply_env_value` (idempotent write, retried): re-reads; already the target literal ->
  no-op (an earlier attempt's patch landed, its answer was lost); the entry moved since the
  plan -> refused; otherwise one strategic-merge patch of that one entry (merge key `name`),
  pinned to the resourceVersion just read (`workload.apply_container_field`).

The undo is a strategic-merge patch too: the previous entry as it was (literal or
`valueFrom`), or `$patch: delete` when the variable was unset.
"""

from __future__ import annotations

from typing import Any, Self

from kubernetes import client as k8s
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field, model_validator

from tasks.errors import SafetyViolation
from tasks.kubernetes.api import (
    get_deployment,
    kube_session,
    run_logger,
)
from tasks.kubernetes.semantics import meta, require_platform_pods, validated_plan
from tasks.kubernetes.workload import (
    ContainerFieldWrite,
    apply_container_field,
    container_named,
    container_patch,
)
from tasks.retry import RETRY_IDEMPOTENT_WRITE, RETRY_READ
from tasks.settings import KubernetesSettings


def _entry_of(container: k8s.V1Container, env: str) -> dict[str, Any] | None:
    """The container's env entry as plain JSON (None when unset); the last one wins."""
    entry = next((e for e in reversed(container.env or []) if e.name == env), None)
    if entry is None:
        return None
    value: dict[str, Any] = k8s.ApiClient().sanitize_for_serialization(entry)
    return value


def env_patch(container: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A strategic-merge patch setting one env entry of one container (both matched by name)."""
    return container_patch(container, {"env": [entry]})


def describe_entry(entry: dict[str, Any] | None) -> str:
    """An env entry for the report: `10`, `unset`, or where its value comes from."""
    if entry is None:
        return "unset"
    if "valueFrom" in entry:
        ref = entry["valueFrom"].get("configMapKeyRef")
        if ref:
            return f"from ConfigMap {ref.get('name')} key {ref.get('key')}"
        return "from " + ", ".join(sorted(entry["valueFrom"]))
    return repr(str(entry.get("value", "")))


class EnvChange(BaseModel):
    """A planned env var write: target within [1, cap], and the entry it replaces (the undo)."""

    deployment: str
    namespace: str
    container: str
    env: str
    previous: dict[str, Any] | None = Field(description="The entry before, as JSON; None = unset.")
    target: int = Field(ge=1)
    cap: int = Field(ge=1, description="The most the target may be (the sizing formula).")
    generation: int | None

    @model_validator(mode="after")
    def _within_cap(self) -> Self:
        if self.target > self.cap:
            raise ValueError(
                f"{self.env}={self.target} is above the cap of {self.cap} (the sizing formula)"
            )
        return self

    @property
    def target_entry(self) -> dict[str, Any]:
        """The entry to write: a literal; `valueFrom: null` drops a reference if there was one."""
        entry: dict[str, Any] = {"name": self.env, "value": str(self.target)}
        if self.previous is not None and "valueFrom" in self.previous:
            entry["valueFrom"] = None
        return entry

    @property
    def undo_patch(self) -> dict[str, Any]:
        """The strategic-merge patch that puts the previous entry back exactly."""
        if self.previous is None:
            return env_patch(self.container, {"name": self.env, "$patch": "delete"})
        entry = dict(self.previous)
        if "valueFrom" in entry:
            entry["value"] = None
        return env_patch(self.container, entry)


class EnvChangeResult(BaseModel):
    """What `apply_env_value` did."""

    deployment: str
    namespace: str
    container: str
    env: str
    before: str
    after: str
    patched: bool
    dry_run: bool
    message: str
    undo_patch: dict[str, Any]


@task(
    **RETRY_READ,
    cache_policy=NO_CACHE,
    task_run_name="plan-env-{namespace}/{deployment}-{env}",
)
def plan_env_value(
    deployment: str,
    namespace: str,
    container: str,
    env: str,
    target: int,
    cap: int,
    settings: KubernetesSettings | None = None,
) -> EnvChange:
    """Read the env entry now (the undo) and check the target is within [1, cap] (read only)."""
    settings = settings or KubernetesSettings()
    with kube_session(settings) as kube:
        dep = get_deployment(kube, deployment, namespace)
    if dep.spec.paused:
        # The new value would not roll out and the restart would be refused: change nothing.
        raise SafetyViolation(
            f"deployment {deployment} in namespace {namespace} is paused; resume it first"
        )
    doing = f"change {env} of deployment {deployment} in namespace {namespace}"
    require_platform_pods(settings.label_selector, dep, doing)
    planned = {
        "deployment": deployment,
        "namespace": namespace,
        "container": container,
        "env": env,
        "previous": _entry_of(container_named(dep, "deployment", container), env),
        "target": target,
        "cap": cap,
        "generation": meta(dep).generation,
    }
    return validated_plan(EnvChange, planned, f"deployment {deployment} {env}")


@task(
    **RETRY_IDEMPOTENT_WRITE,
    cache_policy=NO_CACHE,
    task_run_name="apply-env-{plan.namespace}/{plan.deployment}-{plan.env}",
)
def apply_env_value(
    plan: EnvChange, dry_run: bool = False, settings: KubernetesSettings | None = None
) -> EnvChangeResult:
    """Write the planned env value; a no-op when the container already has it."""
    plan = validated_plan(EnvChange, plan.model_dump(), f"deployment {plan.deployment} {plan.env}")
    log = run_logger()
    name, namespace = plan.deployment, plan.namespace
    before = describe_entry(plan.previous)

    def result(patched: bool, message: str) -> EnvChangeResult:
        log.info(message)
        return EnvChangeResult(
            deployment=name,
            namespace=namespace,
            container=plan.container,
            env=plan.env,
            before=before,
            after=before if dry_run else repr(str(plan.target)),
            patched=patched,
            dry_run=dry_run,
            message=message,
            undo_patch=plan.undo_patch,
        )

    write = ContainerFieldWrite(
        kind="deployment",
        name=name,
        namespace=namespace,
        container=plan.container,
        read=lambda container: _entry_of(container, plan.env),
        at_target=lambda now: now == {"name": plan.env, "value": str(plan.target)},
        as_planned=lambda now: now == plan.previous,
        moved=lambda now: (
            f"deployment {name} {plan.env} changed since the plan ({before} -> "
            f"{describe_entry(now)}); nothing patched, plan again"
        ),
        fields={"env": [plan.target_entry]},
    )
    with kube_session(settings) as kube:
        patched, _ = apply_container_field(kube, write, dry_run)
    if not patched:
        return result(
            False, f"deployment.apps/{name} {plan.env} is already {plan.target}; nothing patched"
        )
    verb = "would set" if dry_run else "set"
    return result(
        True,
        f"deployment.apps/{name} container {plan.container}: {verb} {plan.env} "
        f"{before} -> {plan.target}" + (" (server dry run)" if dry_run else ""),
    )
