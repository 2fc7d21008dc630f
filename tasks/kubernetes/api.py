"""API access for the Kubernetes tasks: one session per task, every error mapped to ours.

- 404 -> `PermanentError` naming the object and namespace;
- 401/403 -> `PermanentError` naming the verb and resource (RBAC), never the token;
- 429, 5xx, connection refused, timeouts, a lost response -> `TransientError`, retried by
  `@task` only (and only on reads and idempotent writes, see `tasks.retry`).

The client itself comes from the one builder, `tasks.clients.kube_api_client`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from tasks.clients import kube_api_client, kube_request_timeout
from tasks.errors import PermanentError, TransientError
from tasks.kubernetes.semantics import (
    RESTARTED_AT,
    ROLLOUT_FIELD_MANAGER,
    label_selector_string,
    meta,
)
from tasks.settings import KubernetesSettings

JSON_PATCH = "application/json-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
MERGE_PATCH = "application/merge-patch+json"

_T = TypeVar("_T")
_fallback_logger = logging.getLogger("tasks.kubernetes")


def run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """Prefect's run logger inside a run, a module logger outside (`task.fn(...)`)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return _fallback_logger


class Kube:
    """The typed APIs of one ApiClient plus the request timeout to pass on every call."""

    def __init__(self, settings: KubernetesSettings) -> None:
        self.settings = settings
        self.client = kube_api_client(settings)
        self.apps = k8s.AppsV1Api(self.client)
        self.core = k8s.CoreV1Api(self.client)
        self.timeout = kube_request_timeout(settings)

    @property
    def host(self) -> str:
        return str(self.client.configuration.host)


@contextmanager
def kube_session(settings: KubernetesSettings | None) -> Iterator[Kube]:
    """One ApiClient for the length of a task, closed afterwards."""
    kube = Kube(settings or KubernetesSettings())
    try:
        yield kube
    finally:
        kube.client.close()


def _server_message(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "")
        return str(body.get("message") or exc.reason)[:300]
    except (ValueError, AttributeError):
        return str(exc.reason)[:300]


def classify_api_error(
    exc: Exception, *, verb: str, resource: str, name: str | None, namespace: str | None, host: str
) -> TransientError | PermanentError:
    """Map a kubernetes client / urllib3 error to TransientError or PermanentError."""
    where = f" in namespace {namespace}" if namespace else ""
    what = f"{resource} {name}" if name else resource
    if isinstance(exc, ApiException):
        status = exc.status or 0
        if status == 404:
            kind = resource.split("/")[0].rstrip("s") if name else resource
            return PermanentError(f"{kind} {name or ''} not found{where}".replace("  ", " "))
        if status == 403:
            return PermanentError(
                f"forbidden: cannot {verb} {resource}{where} (RBAC): {_server_message(exc)}"
            )
        if status == 401:
            return PermanentError(f"Kubernetes API {host} rejected the credentials (401)")
        if status == 0 or status == 429 or status >= 500:
            detail = _server_message(exc) if status else str(exc.reason).splitlines()[0][:200]
            if status == 0 and "CERTIFICATE_VERIFY_FAILED" in str(exc.reason):
                return PermanentError(f"Kubernetes API {host}: TLS verification failed")
            return TransientError(
                f"Kubernetes API {host} failed to {verb} {what}{where} (HTTP {status}): {detail}"
            )
        return PermanentError(
            f"Kubernetes API refused to {verb} {what}{where} (HTTP {status}): "
            f"{_server_message(exc)}"
        )
    reason = type(exc).__name__
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        reason = type(exc.reason).__name__
    return TransientError(
        f"Kubernetes API {host} unreachable while trying to {verb} {what}{where}: {reason}"
    )


def call(
    kube: Kube,
    fn: Callable[..., _T],
    *args: Any,
    verb: str,
    resource: str,
    name: str | None = None,
    namespace: str | None = None,
    **kwargs: Any,
) -> _T:
    """One API call with the request timeout, its errors mapped to ours."""
    try:
        return fn(*args, _request_timeout=kube.timeout, **kwargs)
    except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise classify_api_error(
            exc, verb=verb, resource=resource, name=name, namespace=namespace, host=kube.host
        ) from None


def get_deployment(kube: Kube, name: str, namespace: str) -> k8s.V1Deployment:
    """GET one Deployment (404 -> PermanentError naming it)."""
    return call(
        kube,
        kube.apps.read_namespaced_deployment,
        name,
        namespace,
        verb="get",
        resource="deployments",
        name=name,
        namespace=namespace,
    )


def owned_replica_sets(kube: Kube, dep: k8s.V1Deployment) -> list[k8s.V1ReplicaSet]:
    """ReplicaSets matching the Deployment's selector whose controller is the Deployment."""
    namespace = meta(dep).namespace
    listed = call(
        kube,
        kube.apps.list_namespaced_replica_set,
        namespace,
        label_selector=label_selector_string(dep.spec.selector),
        verb="list",
        resource="replicasets",
        namespace=namespace,
    )
    owned = []
    for rs in listed.items:
        controller = next((o for o in meta(rs).owner_references or [] if o.controller), None)
        if controller is not None and controller.uid == meta(dep).uid:
            owned.append(rs)
    return owned


def patch_restarted_at(
    kube: Kube,
    patch: Callable[..., _T],
    *,
    resource: str,
    name: str,
    namespace: str,
    restarted_at: str,
    dry_run: bool,
) -> _T:
    """`kubectl rollout restart`'s write: the pod template's `restartedAt`, as kubectl sets it."""
    body = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: restarted_at}}}}}
    return call(
        kube,
        patch,
        name,
        namespace,
        body,
        field_manager=ROLLOUT_FIELD_MANAGER,
        dry_run="All" if dry_run else None,
        _content_type=STRATEGIC_MERGE_PATCH,
        verb="patch",
        resource=resource,
        name=name,
        namespace=namespace,
    )
