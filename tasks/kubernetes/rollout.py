"""Rollout tasks: undo, restart, wait, history, following kubectl step for step.

`undo_rollout` and `restart_rollout` are each a read step and a write step, so a retried
write can never repeat or reverse a change:

- `plan_rollback` (read, retried) resolves the target revision once and keeps the template
  to apply; `apply_rollback` (idempotent write, retried) applies that template and, finding
  it already in place (its own earlier patch landed, the response was lost), does nothing.
  Resolving `to_revision=0` again after a landed patch would pick the bad revision: the
  rollback itself became the newest revision.
- `plan_restart` (read, retried) picks the `restartedAt` timestamp once; `apply_restart`
  (idempotent write, retried) sets that value, a no-op once it is set.

kubectl's own algorithms (`pkg/polymorphichelpers/rollback.go`, `objectrestarter.go`,
`rollout status`) are kept: refusals, skip rule and messages are compared with the real
kubectl in tests/integration/test_kubernetes_kubectl.py.
"""

from __future__ import annotations

from typing import Any, Literal

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import PermanentError, SafetyViolation, TransientError
from tasks.kubernetes.api import (
    JSON_PATCH,
    Kube,
    classify_api_error,
    get_deployment,
    kube_session,
    owned_replica_sets,
    run_logger,
)
from tasks.kubernetes.models import (
    RestartPlan,
    RestartResult,
    RollbackPlan,
    RollbackResult,
    RolloutHistory,
    RolloutStatus,
)
from tasks.kubernetes.revisions import revision_infos, undone_previous
from tasks.kubernetes.semantics import (
    REVISION,
    annotation,
    equal_ignore_hash,
    images_of,
    meta,
    order_like_kubectl,
    parse_revision,
    rollback_annotations,
    rollback_patch,
    rollout_status_message,
    rs_template,
    select_rollback_revision,
)
from tasks.kubernetes.workload import (
    WriteCall,
    apply_restart_value,
    plan_restart_value,
    poll_rollout,
    workload_write,
)
from tasks.retry import RETRY_IDEMPOTENT_WRITE, RETRY_READ
from tasks.settings import KubernetesSettings

# kubectl's exact words (checked by tests/integration/test_kubernetes_kubectl.py).
PAUSED_ROLLBACK = (
    "you cannot rollback a paused deployment; resume it first with "
    "'kubectl rollout resume' and try again"
)
Outcome = Literal["rolled back", "skipped rollback", "already rolled back", "dry run"]


# ------------------------------------------------------------------------------ undo


@task(
    **RETRY_READ,
    cache_policy=NO_CACHE,
    task_run_name="plan-rollback-{namespace}/{deployment}",
)
def plan_rollback(
    deployment: str,
    namespace: str,
    to_revision: int = 0,
    settings: KubernetesSettings | None = None,
) -> RollbackPlan:
    """Resolve the revision `kubectl rollout undo` would restore, once (read only)."""
    if to_revision < 0:
        raise PermanentError(f"unable to find specified revision {to_revision} in history")
    with kube_session(settings) as kube:
        dep = get_deployment(kube, deployment, namespace)
        owned = order_like_kubectl(owned_replica_sets(kube, dep), dep.spec.template)
    revision, rs = select_rollback_revision(
        [(annotation(r, REVISION), r) for r in owned], to_revision, deployment
    )
    if dep.spec.paused:
        raise SafetyViolation(PAUSED_ROLLBACK)
    template = rs_template(rs)
    annotations = rollback_annotations(meta(dep).annotations, meta(rs).annotations)
    # kubectl would go there; the plan says when that means undoing an undo.
    undone = undone_previous(revision_infos(owned, dep))
    return RollbackPlan(
        deployment=deployment,
        namespace=namespace,
        requested_revision=to_revision,
        to_revision=revision,
        from_revision=parse_revision(annotation(dep, REVISION)),
        generation=meta(dep).generation,
        already_current=equal_ignore_hash(template, dep.spec.template),
        template=template,
        patch=rollback_patch(template, annotations),
        images_before=images_of(dep.spec.template),
        images_after=images_of(template),
        target_undone=undone if undone is not None and undone.revision == revision else None,
    )


def _generation_precondition(plan: RollbackPlan) -> list[dict[str, Any]]:
    # A JSON-patch `test` is checked by the API server against the object it patches, so a
    # spec change between our GET and our PATCH fails the whole patch (422), nothing written.
    if plan.generation is None:
        return []
    return [{"op": "test", "path": "/metadata/generation", "value": plan.generation}]


def _rollback_result(
    plan: RollbackPlan, outcome: Outcome, message: str, patch: list[dict[str, Any]] | None = None
) -> RollbackResult:
    applied = outcome != "skipped rollback"
    return RollbackResult(
        deployment=plan.deployment,
        namespace=plan.namespace,
        outcome=outcome,
        message=message,
        from_revision=plan.from_revision,
        to_revision=plan.to_revision,
        images_before=plan.images_before,
        images_after=plan.images_after if applied else plan.images_before,
        patch=patch or [],
    )


def _already_applied(plan: RollbackPlan) -> RollbackResult:
    message = (
        f"deployment.apps/{plan.deployment} already has revision {plan.to_revision}'s "
        "template (put there by an earlier attempt whose answer was lost, or by another "
        "writer); nothing patched"
    )
    run_logger().info(message)
    return _rollback_result(plan, "already rolled back", message)


def _changed_since_plan(plan: RollbackPlan, dep: k8s.V1Deployment) -> SafetyViolation:
    return SafetyViolation(
        f"deployment {plan.deployment} in namespace {plan.namespace} changed since the "
        f"rollback was planned (generation {plan.generation} -> {meta(dep).generation}); "
        "nothing patched, plan again"
    )


@task(
    **RETRY_IDEMPOTENT_WRITE,
    cache_policy=NO_CACHE,
    task_run_name="apply-rollback-{plan.namespace}/{plan.deployment}",
)
def apply_rollback(
    plan: RollbackPlan, dry_run: bool = False, settings: KubernetesSettings | None = None
) -> RollbackResult:
    """Apply a planned rollback; a no-op when the planned template is already in place."""
    log = run_logger()
    name, namespace = plan.deployment, plan.namespace
    with kube_session(settings) as kube:
        dep = get_deployment(kube, name, namespace)
        if dep.spec.paused:
            raise SafetyViolation(PAUSED_ROLLBACK)
        if equal_ignore_hash(plan.template, dep.spec.template):
            if not plan.already_current:
                return _already_applied(plan)
            message = (
                f"deployment.apps/{name} skipped rollback "
                f"(current template already matches revision {plan.requested_revision})"
            )
            log.info(message)
            return _rollback_result(plan, "skipped rollback", message)
        if plan.generation is not None and meta(dep).generation != plan.generation:
            raise _changed_since_plan(plan, dep)
        patch = _generation_precondition(plan) + plan.patch
        if not _patch_rollback(kube, plan, patch, dry_run):
            return _already_applied(plan)
    if dry_run:
        message = f"deployment.apps/{name} would roll back to revision {plan.to_revision}"
    else:
        message = f"deployment.apps/{name} rolled back"
    log.info(
        "%s (revision %s -> %s, images %s -> %s)",
        message,
        plan.from_revision,
        plan.to_revision,
        plan.images_before,
        plan.images_after,
    )
    return _rollback_result(plan, "dry run" if dry_run else "rolled back", message, patch)


def _patch_error(
    exc: Exception, kube: Kube, name: str, namespace: str
) -> TransientError | PermanentError:
    return classify_api_error(
        exc, verb="patch", resource="deployments", name=name, namespace=namespace, host=kube.host
    )


def _patch_rollback(
    kube: Kube, plan: RollbackPlan, patch: list[dict[str, Any]], dry_run: bool
) -> bool:
    """Send the patch; False when the planned template turned out to be in place already."""
    name, namespace = plan.deployment, plan.namespace
    try:
        kube.apps.patch_namespaced_deployment(
            name,
            namespace,
            patch,
            dry_run="All" if dry_run else None,
            _content_type=JSON_PATCH,
            _request_timeout=kube.timeout,
        )
    except ApiException as exc:
        if exc.status == 422 and plan.generation is not None:
            # 422 is how a failed JSON-patch `test` comes back (its detail is not in the
            # body's message): look again to tell it from an invalid patch.
            dep = get_deployment(kube, name, namespace)
            if equal_ignore_hash(plan.template, dep.spec.template):
                return False  # what changed it put our template in place: nothing to do
            if meta(dep).generation != plan.generation:
                raise _changed_since_plan(plan, dep) from None
        raise _patch_error(exc, kube, name, namespace) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise _patch_error(exc, kube, name, namespace) from None
    return True


@workload_write(plan_rollback, apply_rollback)
def undo_rollout(
    deployment: str,
    namespace: str,
    to_revision: int = 0,
    dry_run: bool = False,
    settings: KubernetesSettings | None = None,
) -> WriteCall:
    """`kubectl rollout undo`: `plan_rollback` (read) then `apply_rollback` (idempotent write)."""
    planned = {"deployment": deployment, "namespace": namespace, "to_revision": to_revision}
    return WriteCall(planned, dry_run, settings)


# --------------------------------------------------------------------------- restart


@task(
    **RETRY_READ,
    cache_policy=NO_CACHE,
    task_run_name="plan-restart-{namespace}/{deployment}",
)
def plan_restart(
    deployment: str,
    namespace: str,
    restarted_at: str | None = None,
    settings: KubernetesSettings | None = None,
) -> RestartPlan:
    """Check a restart is allowed and pick its `restartedAt` value, once (read only)."""
    with kube_session(settings) as kube:
        dep = get_deployment(kube, deployment, namespace)
    value, previous = plan_restart_value("deployment", dep, restarted_at)
    return RestartPlan(
        deployment=deployment,
        namespace=namespace,
        restarted_at=value,
        previous_restarted_at=previous,
        generation=meta(dep).generation,
    )


@task(
    **RETRY_IDEMPOTENT_WRITE,
    cache_policy=NO_CACHE,
    task_run_name="apply-restart-{plan.namespace}/{plan.deployment}",
)
def apply_restart(
    plan: RestartPlan, dry_run: bool = False, settings: KubernetesSettings | None = None
) -> RestartResult:
    """Set the planned `restartedAt`; a no-op when that exact value is already set."""
    with kube_session(settings) as kube:
        done = apply_restart_value(
            kube, "deployment", plan.deployment, plan.namespace, plan.restarted_at, dry_run
        )
    run_logger().info(done.message)
    return RestartResult(
        deployment=plan.deployment,
        namespace=plan.namespace,
        restarted_at=plan.restarted_at,
        generation=done.generation,
        dry_run=dry_run,
        patched=done.patched,
        message=done.message,
    )


@workload_write(plan_restart, apply_restart)
def restart_rollout(
    deployment: str,
    namespace: str,
    dry_run: bool = False,
    settings: KubernetesSettings | None = None,
    restarted_at: str | None = None,
) -> WriteCall:
    """`kubectl rollout restart`: `plan_restart` (read) then `apply_restart` (idempotent write)."""
    planned = {"deployment": deployment, "namespace": namespace, "restarted_at": restarted_at}
    return WriteCall(planned, dry_run, settings)


# ------------------------------------------------------------------- status, history


def _status_model(
    dep: k8s.V1Deployment, message: str, complete: bool, elapsed: float
) -> RolloutStatus:
    status = dep.status or k8s.V1DeploymentStatus()
    return RolloutStatus(
        deployment=meta(dep).name,
        namespace=meta(dep).namespace,
        complete=complete,
        message=message,
        revision=parse_revision(annotation(dep, REVISION)),
        generation=meta(dep).generation,
        observed_generation=status.observed_generation,
        replicas=dep.spec.replicas if dep.spec.replicas is not None else 1,
        updated_replicas=status.updated_replicas or 0,
        ready_replicas=status.ready_replicas or 0,
        available_replicas=status.available_replicas or 0,
        elapsed_s=round(elapsed, 3),
    )


@task(
    **RETRY_READ,
    cache_policy=NO_CACHE,
    task_run_name="wait-for-rollout-{namespace}/{deployment}",
)
def wait_for_rollout(
    deployment: str,
    namespace: str,
    timeout_s: float | None = None,
    poll_s: float = 1.0,
    settings: KubernetesSettings | None = None,
) -> RolloutStatus:
    """Wait until a Deployment is rolled out, like `kubectl rollout status --timeout`."""
    settings = settings or KubernetesSettings()
    timeout = settings.rollout_timeout_s if timeout_s is None else timeout_s
    with kube_session(settings) as kube:
        return poll_rollout(
            lambda: get_deployment(kube, deployment, namespace),
            rollout_status_message,
            lambda dep, message, elapsed: _status_model(dep, message, True, elapsed),
            f"deployment {deployment} in namespace {namespace}",
            timeout,
            poll_s,
        )


@task(
    **RETRY_READ,
    cache_policy=NO_CACHE,
    task_run_name="rollout-history-{namespace}/{deployment}",
)
def rollout_history(
    deployment: str,
    namespace: str,
    settings: KubernetesSettings | None = None,
) -> RolloutHistory:
    """A Deployment's revisions with images, change-cause and when each became current."""
    with kube_session(settings) as kube:
        dep = get_deployment(kube, deployment, namespace)
        owned = owned_replica_sets(kube, dep)
    revisions = revision_infos(owned, dep)
    return RolloutHistory(
        deployment=deployment,
        namespace=namespace,
        current_revision=parse_revision(annotation(dep, REVISION)),
        revisions=revisions,
        undone=undone_previous(revisions),
    )
