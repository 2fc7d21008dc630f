"""One plan -> apply mechanism for every write to a workload (Deployment, StatefulSet, DaemonSet).

Every workload write is two tasks, so a retried write never repeats or reverses a change
(DESIGN: "decide the target in a read step, pass it in, let the write no-op when done"):

- a plan task (read, `RETRY_READ`): reads the object, decides the target value and records
  the previous one (the undo), e.g. `plan_restart`, `plan_rollback`, `plan_memory_limit`,
  `plan_env_value`;
- an apply task (`RETRY_IDEMPOTENT_WRITE`): re-reads; the target already in place -> a no-op
  (an earlier attempt's patch landed, its answer was lost); the field moved since the plan ->
  `SafetyViolation`, nothing patched; otherwise one patch.

`WorkloadWrite` (made with `@workload_write(plan, apply)`) runs the pair: in a flow two task
runs, each with its own retry policy; `.fn(...)` the same two steps without Prefect. The
helpers below are what the pairs share: one GET/PATCH per kind, the `restartedAt` restart
(the same annotation for every kind, `kubectl rollout restart`), and the preconditioned
container-field write (memory limit, env var).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import update_wrapper
from typing import Any, Generic, Literal, ParamSpec, TypeVar

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from prefect import Task

from tasks.errors import PermanentError, SafetyViolation, TransientError
from tasks.kubernetes.api import (
    STRATEGIC_MERGE_PATCH,
    Kube,
    call,
    classify_api_error,
    patch_restarted_at,
    run_logger,
)
from tasks.kubernetes.semantics import RESTARTED_AT, meta, rfc3339_now
from tasks.settings import KubernetesSettings

Kind = Literal["deployment", "statefulset", "daemonset"]

# kubectl's exact words (checked by tests/integration/test_kubernetes_kubectl.py).
PAUSED_RESTART = "can't restart paused deployment (run rollout resume first)"

P = ParamSpec("P")
PlanT = TypeVar("PlanT")
ResultT = TypeVar("ResultT")
V = TypeVar("V")

#: Container-field writes tried with a fresh resourceVersion after a 409 Conflict.
CONFLICT_ATTEMPTS = 3

# AppsV1Api method suffixes per kind: read_namespaced_<x>, patch_namespaced_<x>.
_API_NAME: dict[Kind, str] = {
    "deployment": "deployment",
    "statefulset": "stateful_set",
    "daemonset": "daemon_set",
}


# -------------------------------------------------------------------------- the pair


@dataclass(frozen=True)
class WriteCall:
    """One call of a workload write: the plan task's arguments, then how to apply."""

    plan_kwargs: dict[str, Any]
    dry_run: bool = False
    settings: KubernetesSettings | None = field(default=None)


class WorkloadWrite(Generic[P, PlanT, ResultT]):
    """A workload write: its plan task (read) then its apply task (idempotent write).

    Call it in a flow like a task (two task runs, each with its retry policy); `.fn(...)`
    runs the same two steps as plain functions (no Prefect run, no retries). Its signature is
    that of the binding function it wraps, which maps the arguments to a `WriteCall`.
    """

    def __init__(
        self,
        bind: Callable[P, WriteCall],
        plan: Task[..., PlanT],
        apply: Task[..., ResultT],
    ) -> None:
        self.bind = bind
        self.plan = plan
        self.apply = apply
        update_wrapper(self, bind)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> ResultT:
        """Plan, then apply that plan, as two Prefect tasks."""
        how = self.bind(*args, **kwargs)
        plan = self.plan(**how.plan_kwargs, settings=how.settings)
        return self.apply(plan, dry_run=how.dry_run, settings=how.settings)

    def fn(self, *args: P.args, **kwargs: P.kwargs) -> ResultT:
        """The same two steps as plain functions (no Prefect run, no retries)."""
        how = self.bind(*args, **kwargs)
        plan = self.plan.fn(**how.plan_kwargs, settings=how.settings)
        return self.apply.fn(plan, dry_run=how.dry_run, settings=how.settings)


def workload_write(
    plan: Task[..., PlanT], apply: Task[..., ResultT]
) -> Callable[[Callable[P, WriteCall]], WorkloadWrite[P, PlanT, ResultT]]:
    """Decorate a binding function (the public signature) into its plan -> apply pair."""

    def wrap(bind: Callable[P, WriteCall]) -> WorkloadWrite[P, PlanT, ResultT]:
        return WorkloadWrite(bind, plan, apply)

    return wrap


# ----------------------------------------------------------------------- GET, PATCH


def get_workload(kube: Kube, kind: Kind, name: str, namespace: str) -> Any:
    """GET one workload of `kind` (404 -> PermanentError naming it)."""
    return call(
        kube,
        getattr(kube.apps, f"read_namespaced_{_API_NAME[kind]}"),
        name,
        namespace,
        verb="get",
        resource=f"{kind}s",
        name=name,
        namespace=namespace,
    )


def _patch_pinned(
    kube: Kube,
    kind: Kind,
    name: str,
    namespace: str,
    body: dict[str, Any],
    version: str,
    dry_run: bool,
) -> bool:
    """One strategic-merge PATCH pinned to `version`; True if written, False on 409 Conflict."""
    pinned = {"metadata": {"resourceVersion": version}, **body}
    try:
        getattr(kube.apps, f"patch_namespaced_{_API_NAME[kind]}")(
            name,
            namespace,
            pinned,
            dry_run="All" if dry_run else None,
            _content_type=STRATEGIC_MERGE_PATCH,
            _request_timeout=kube.timeout,
        )
    except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
        if isinstance(exc, ApiException) and exc.status == 409:
            return False
        raise classify_api_error(
            exc, verb="patch", resource=f"{kind}s", name=name, namespace=namespace, host=kube.host
        ) from None
    return True


def template_annotations(obj: Any) -> dict[str, str]:
    """The pod template's annotations (empty when none)."""
    template_meta = obj.spec.template.metadata if obj.spec and obj.spec.template else None
    return dict((template_meta.annotations if template_meta else None) or {})


# --------------------------------------------------------------------------- restart


@dataclass(frozen=True)
class RestartWrite:
    """What the apply step of a restart did."""

    patched: bool
    generation: int | None
    message: str


def _refuse_paused(kind: Kind, obj: Any) -> None:
    # Only a Deployment can be paused; kubectl refuses to restart it then.
    if kind == "deployment" and obj.spec.paused:
        raise SafetyViolation(PAUSED_RESTART)


def plan_restart_value(kind: Kind, obj: Any, restarted_at: str | None) -> tuple[str, str | None]:
    """The `restartedAt` value to set and the one it replaces (kubectl's refusals included)."""
    _refuse_paused(kind, obj)
    value = restarted_at or rfc3339_now()
    previous = template_annotations(obj).get(RESTARTED_AT)
    if previous == value:
        # kubectl's patch would be empty: nothing would restart. A read, so retrying it
        # (a second later, a new timestamp) is safe.
        raise TransientError(
            f"failed to create patch for {meta(obj).name}: if restart has already been "
            "triggered within the past second, please wait before attempting to trigger another"
        )
    return value, previous


def apply_restart_value(
    kube: Kube, kind: Kind, name: str, namespace: str, restarted_at: str, dry_run: bool
) -> RestartWrite:
    """Set the planned `restartedAt`; a no-op when that exact value is already set."""
    obj = get_workload(kube, kind, name, namespace)
    _refuse_paused(kind, obj)
    if template_annotations(obj).get(RESTARTED_AT) == restarted_at:
        return RestartWrite(
            patched=False,
            generation=meta(obj).generation,
            message=(
                f"{kind}.apps/{name} already restarted at {restarted_at} "
                "(an earlier attempt's patch landed, its answer was lost); nothing patched"
            ),
        )
    patched = patch_restarted_at(
        kube,
        getattr(kube.apps, f"patch_namespaced_{_API_NAME[kind]}"),
        resource=f"{kind}s",
        name=name,
        namespace=namespace,
        restarted_at=restarted_at,
        dry_run=dry_run,
    )
    message = f"{kind}.apps/{name} restarted" + (" (server dry run)" if dry_run else "")
    return RestartWrite(patched=True, generation=meta(patched).generation, message=message)


# ------------------------------------------------------------------- container fields


def container_named(obj: Any, kind: Kind, container: str) -> k8s.V1Container:
    """The pod template's container called `container` (PermanentError naming the others)."""
    containers: list[k8s.V1Container] = obj.spec.template.spec.containers or []
    found = next((c for c in containers if c.name == container), None)
    if found is None:
        raise PermanentError(
            f"{kind} {meta(obj).name} in namespace {meta(obj).namespace} has no container "
            f"{container!r} (containers: {', '.join(c.name for c in containers)})"
        )
    return found


def container_patch(container: str, fields: dict[str, Any]) -> dict[str, Any]:
    """A strategic-merge patch of one container's fields (the container matched by name)."""
    return {"spec": {"template": {"spec": {"containers": [{"name": container, **fields}]}}}}


@dataclass(frozen=True)
class ContainerFieldWrite(Generic[V]):
    """A planned write of one container field: how to read it, its target, its plan value."""

    kind: Kind
    name: str
    namespace: str
    container: str
    read: Callable[[k8s.V1Container], V]
    at_target: Callable[[V], bool]
    as_planned: Callable[[V], bool]
    moved: Callable[[V], str]
    fields: dict[str, Any]


def apply_container_field(
    kube: Kube, write: ContainerFieldWrite[V], dry_run: bool
) -> tuple[bool, V]:
    """Re-read the field: at target -> (False, it); moved -> SafetyViolation; else patch it.

    The patch carries the resourceVersion just read, so a write in between (409) changes
    nothing; then read again and decide again, a bounded number of times (the controller's
    status updates bump the resourceVersion too). Returns whether this call sent the patch,
    and the value read before it.
    """
    for _ in range(CONFLICT_ATTEMPTS):
        obj = get_workload(kube, write.kind, write.name, write.namespace)
        now = write.read(container_named(obj, write.kind, write.container))
        if write.at_target(now):
            return False, now
        if not write.as_planned(now):
            raise SafetyViolation(write.moved(now))
        body = container_patch(write.container, write.fields)
        version = str(meta(obj).resource_version)
        if _patch_pinned(kube, write.kind, write.name, write.namespace, body, version, dry_run):
            return True, now
    raise TransientError(
        f"{write.kind} {write.name} in namespace {write.namespace} kept changing "
        f"({CONFLICT_ATTEMPTS} conflicts in a row); nothing patched"
    )


W = TypeVar("W")
S = TypeVar("S")


def poll_rollout(
    read: Callable[[], W],
    status: Callable[[W], tuple[str, bool]],
    result: Callable[[W, str, float], S],
    what: str,
    timeout_s: float,
    poll_s: float,
) -> S:
    """Read a workload until `status` says rolled out, like `kubectl rollout status
    --timeout`: each new status message logged once, a clear error at the timeout."""
    log = run_logger()
    start = time.monotonic()
    last = ""
    while True:
        obj = read()
        message, done = status(obj)
        elapsed = time.monotonic() - start
        if message != last:
            log.info("%s: %s", what, message)
            last = message
        if done:
            return result(obj, message, elapsed)
        if elapsed >= timeout_s:
            raise PermanentError(
                f"timed out after {timeout_s:g} s waiting for {what} to roll out;"
                f" last status: {message}"
            )
        time.sleep(min(poll_s, max(0.05, timeout_s - elapsed)))
