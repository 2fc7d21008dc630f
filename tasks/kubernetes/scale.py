"""`scale`: set a platform Deployment's replicas (0 isolates it), guarded and idempotent.

The write is a merge patch of `deployments/scale` carrying the `metadata.resourceVersion`
just read: if anything wrote the Deployment in between, the API server answers 409 and
nothing is written. The task then re-reads and decides: already at the target -> done;
`spec.replicas` moved (someone else scaled) -> refuse; only status churn (the controller
bumps resourceVersion too) -> try again with the fresh resourceVersion, a bounded number
of times. A retry after a lost response finds the target reached and changes nothing.
"""

from __future__ import annotations

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.errors import SafetyViolation, TransientError
from tasks.kubernetes.api import (
    MERGE_PATCH,
    Kube,
    classify_api_error,
    get_deployment,
    kube_session,
    run_logger,
)
from tasks.kubernetes.models import ScaleResult
from tasks.kubernetes.semantics import meta, require_platform_pods
from tasks.retry import RETRY_IDEMPOTENT_WRITE
from tasks.settings import KubernetesSettings

#: Writes tried with a fresh resourceVersion when only status churn caused the 409.
CONFLICT_ATTEMPTS = 3


def _replicas(dep: k8s.V1Deployment) -> int:
    return dep.spec.replicas if dep.spec.replicas is not None else 1


def _patch_scale(
    kube: Kube, name: str, namespace: str, replicas: int, resource_version: str, dry_run: bool
) -> bool:
    """One precondition write; True if written, False on 409 Conflict."""
    body = {"metadata": {"resourceVersion": resource_version}, "spec": {"replicas": replicas}}
    try:
        kube.apps.patch_namespaced_deployment_scale(
            name,
            namespace,
            body,
            dry_run="All" if dry_run else None,
            _content_type=MERGE_PATCH,
            _request_timeout=kube.timeout,
        )
    except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
        if isinstance(exc, ApiException) and exc.status == 409:
            return False
        raise classify_api_error(
            exc,
            verb="patch",
            resource="deployments/scale",
            name=name,
            namespace=namespace,
            host=kube.host,
        ) from None
    return True


@task(
    **RETRY_IDEMPOTENT_WRITE,
    cache_policy=NO_CACHE,
    task_run_name="scale-{deployment}-to-{replicas}",
)
def scale(
    deployment: str,
    replicas: int,
    namespace: str | None = None,
    max_replicas: int = 20,
    dry_run: bool = False,
    settings: KubernetesSettings | None = None,
) -> ScaleResult:
    """Scale a platform Deployment (0 isolates it); refuses foreign workloads and oversize."""
    settings = settings or KubernetesSettings()
    namespace = namespace or settings.namespace
    if replicas < 0:
        raise SafetyViolation(f"refusing to scale {deployment} to {replicas} replicas")
    if replicas > max_replicas:
        raise SafetyViolation(
            f"refusing to scale {deployment} to {replicas} replicas: the cap is {max_replicas}"
        )
    log = run_logger()
    with kube_session(settings) as kube:
        dep = get_deployment(kube, deployment, namespace)
        before = _replicas(dep)
        for _ in range(CONFLICT_ATTEMPTS):
            require_platform_pods(
                settings.label_selector, dep, f"scale {deployment} in namespace {namespace}"
            )
            current = _replicas(dep)
            if current == replicas:
                message = (
                    f"deployment.apps/{deployment} already at {replicas} replicas; nothing written"
                )
                log.info("%s/%s: %s", namespace, deployment, message)
                return ScaleResult(
                    deployment=deployment,
                    namespace=namespace,
                    replicas_before=before,
                    replicas_after=replicas,
                    dry_run=dry_run,
                    changed=False,
                    message=message,
                )
            if current != before:
                raise SafetyViolation(
                    f"deployment {deployment} in namespace {namespace} was scaled from {before} "
                    f"to {current} by someone else while scaling to {replicas} (409 Conflict); "
                    "nothing written, plan again"
                )
            written = _patch_scale(
                kube,
                deployment,
                namespace,
                replicas,
                str(meta(dep).resource_version),
                dry_run,
            )
            if written:
                break
            # 409: the Deployment changed after our read; look again before deciding.
            dep = get_deployment(kube, deployment, namespace)
        else:
            raise TransientError(
                f"deployment {deployment} in namespace {namespace} kept changing "
                f"({CONFLICT_ATTEMPTS} conflicts in a row); nothing written"
            )
    message = f"deployment.apps/{deployment} scaled {before} -> {replicas}" + (
        " (server dry run)" if dry_run else ""
    )
    log.info("%s/%s: %s", namespace, deployment, message)
    return ScaleResult(
        deployment=deployment,
        namespace=namespace,
        replicas_before=before,
        replicas_after=before if dry_run else replicas,
        dry_run=dry_run,
        changed=not dry_run,
        message=message,
    )
