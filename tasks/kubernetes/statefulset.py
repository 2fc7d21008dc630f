"""StatefulSet restart and rollout status (Redis, database pods), following kubectl.

`kubectl rollout restart statefulset/x` (`pkg/polymorphichelpers/objectrestarter.go`) sets
`spec.template.metadata.annotations["kubectl.kubernetes.io/restartedAt"]` to the current
RFC 3339 time with a strategic-merge patch, field manager `kubectl-rollout`. Unlike a
Deployment a StatefulSet has no `paused` field, so kubectl refuses nothing; its only failure
is the empty patch when the same second was already set. The same plan/apply split as for
Deployments (`rollout.py`) keeps a retried write from restarting twice:

- `plan_statefulset_restart` (read, retried) picks the `restartedAt` value once;
- `apply_statefulset_restart` (idempotent write, retried) sets it, a no-op once it is set.

`wait_for_statefulset` is `kubectl rollout status statefulset/x --timeout`
(`StatefulSetStatusViewer`, `semantics.statefulset_status_message`).
"""

from __future__ import annotations

from kubernetes import client as k8s
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.kubernetes.api import (
    Kube,
    kube_session,
    run_logger,
)
from tasks.kubernetes.models import (
    StatefulSetRestartPlan,
    StatefulSetRestartResult,
    StatefulSetRolloutStatus,
)
from tasks.kubernetes.semantics import (
    meta,
    statefulset_status_message,
)
from tasks.kubernetes.workload import (
    WriteCall,
    apply_restart_value,
    get_workload,
    plan_restart_value,
    poll_rollout,
    workload_write,
)
from tasks.retry import RETRY_IDEMPOTENT_WRITE, RETRY_READ
from tasks.settings import KubernetesSettings


def get_statefulset(kube: Kube, name: str, namespace: str) -> k8s.V1StatefulSet:
    """GET one StatefulSet (404 -> PermanentError naming it)."""
    sts: k8s.V1StatefulSet = get_workload(kube, "statefulset", name, namespace)
    return sts


@task(
    **RETRY_READ,
    cache_policy=NO_CACHE,
    task_run_name="plan-restart-{namespace}/statefulset-{statefulset}",
)
def plan_statefulset_restart(
    statefulset: str,
    namespace: str,
    restarted_at: str | None = None,
    settings: KubernetesSettings | None = None,
) -> StatefulSetRestartPlan:
    """Pick the `restartedAt` value of a StatefulSet restart, once (read only)."""
    with kube_session(settings) as kube:
        sts = get_statefulset(kube, statefulset, namespace)
    value, previous = plan_restart_value("statefulset", sts, restarted_at)
    strategy = sts.spec.update_strategy.type if sts.spec.update_strategy else "RollingUpdate"
    return StatefulSetRestartPlan(
        statefulset=statefulset,
        namespace=namespace,
        restarted_at=value,
        previous_restarted_at=previous,
        generation=meta(sts).generation,
        update_strategy=strategy or "RollingUpdate",
    )


@task(
    **RETRY_IDEMPOTENT_WRITE,
    cache_policy=NO_CACHE,
    task_run_name="apply-restart-{plan.namespace}/statefulset-{plan.statefulset}",
)
def apply_statefulset_restart(
    plan: StatefulSetRestartPlan, dry_run: bool = False, settings: KubernetesSettings | None = None
) -> StatefulSetRestartResult:
    """Set the planned `restartedAt` on a StatefulSet; a no-op when already set."""
    with kube_session(settings) as kube:
        done = apply_restart_value(
            kube, "statefulset", plan.statefulset, plan.namespace, plan.restarted_at, dry_run
        )
    message = done.message
    if done.patched and plan.update_strategy != "RollingUpdate":
        # kubectl patches it all the same; the controller then waits for someone to delete pods.
        message += f" (updateStrategy {plan.update_strategy}: pods restart only when deleted)"
    run_logger().info(message)
    return StatefulSetRestartResult(
        statefulset=plan.statefulset,
        namespace=plan.namespace,
        restarted_at=plan.restarted_at,
        generation=done.generation,
        dry_run=dry_run,
        patched=done.patched,
        message=message,
    )


@workload_write(plan_statefulset_restart, apply_statefulset_restart)
def restart_statefulset(
    statefulset: str,
    namespace: str,
    dry_run: bool = False,
    settings: KubernetesSettings | None = None,
    restarted_at: str | None = None,
) -> WriteCall:
    """`kubectl rollout restart statefulset/x`: plan (read) then apply (idempotent write)."""
    planned = {"statefulset": statefulset, "namespace": namespace, "restarted_at": restarted_at}
    return WriteCall(planned, dry_run, settings)


def _status_model(
    sts: k8s.V1StatefulSet, message: str, complete: bool, elapsed: float
) -> StatefulSetRolloutStatus:
    status = sts.status or k8s.V1StatefulSetStatus(replicas=0)
    return StatefulSetRolloutStatus(
        statefulset=meta(sts).name,
        namespace=meta(sts).namespace,
        complete=complete,
        message=message,
        generation=meta(sts).generation,
        observed_generation=status.observed_generation,
        replicas=sts.spec.replicas if sts.spec.replicas is not None else 1,
        ready_replicas=status.ready_replicas or 0,
        updated_replicas=status.updated_replicas or 0,
        current_revision=status.current_revision,
        update_revision=status.update_revision,
        elapsed_s=round(elapsed, 3),
    )


@task(
    **RETRY_READ,
    cache_policy=NO_CACHE,
    task_run_name="wait-for-rollout-{namespace}/statefulset-{statefulset}",
)
def wait_for_statefulset(
    statefulset: str,
    namespace: str,
    timeout_s: float | None = None,
    poll_s: float = 1.0,
    settings: KubernetesSettings | None = None,
) -> StatefulSetRolloutStatus:
    """Wait until a StatefulSet is rolled out, like `kubectl rollout status --timeout`."""
    settings = settings or KubernetesSettings()
    timeout = settings.rollout_timeout_s if timeout_s is None else timeout_s
    with kube_session(settings) as kube:
        return poll_rollout(
            lambda: get_statefulset(kube, statefulset, namespace),
            statefulset_status_message,
            lambda sts, message, elapsed: _status_model(sts, message, True, elapsed),
            f"statefulset {statefulset} in namespace {namespace}",
            timeout,
            poll_s,
        )
