"""Kubernetes actions: inspect, restart, roll back and isolate Deployments.

Each task opens one API client (`tasks.clients.kube_api_client`), maps failures to our error
types and returns a pydantic model:

- 404 -> `PermanentError` naming the object and namespace;
- 401/403 -> `PermanentError` naming the verb and resource (RBAC), never the token;
- 429, 5xx, connection refused, timeouts -> `TransientError`, retried by `@task` only.

`undo_rollout` and `restart_rollout` follow kubectl (`pkg/polymorphichelpers/rollback.go`,
`objectrestarter.go`) step for step, refusals and messages included; `wait_for_rollout`
follows `kubectl rollout status`. The pure parts (revision selection, template equality,
annotation merge, status, selectors) are plain functions so they can be tested alone.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from pydantic import BaseModel, Field

from tasks.clients import kube_api_client, kube_request_timeout
from tasks.errors import PermanentError, SafetyViolation, TransientError
from tasks.retry import RETRY_IDEMPOTENT_WRITE, RETRY_READ
from tasks.settings import KubernetesSettings

# kubectl's constants (k8s.io/api/apps/v1, deploymentutil, corev1).
POD_TEMPLATE_HASH = "pod-template-hash"
REVISION = "deployment.kubernetes.io/revision"
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
CHANGE_CAUSE = "kubernetes.io/change-cause"
ANNOTATIONS_TO_SKIP = frozenset(
    {
        "kubectl.kubernetes.io/last-applied-configuration",
        REVISION,
        "deployment.kubernetes.io/revision-history",
        "deployment.kubernetes.io/desired-replicas",
        "deployment.kubernetes.io/max-replicas",
        "deprecated.deployment.rollback.to",
    }
)
TIMED_OUT_REASON = "ProgressDeadlineExceeded"
ROLLOUT_FIELD_MANAGER = "kubectl-rollout"

_JSON_PATCH = "application/json-patch+json"
_STRATEGIC = "application/strategic-merge-patch+json"
_MERGE = "application/merge-patch+json"
_INT64 = re.compile(r"[+-]?[0-9]+")
_T = TypeVar("_T")

_fallback_logger = logging.getLogger(__name__)


def _meta(obj: Any) -> k8s.V1ObjectMeta:
    meta = obj.metadata
    return meta if isinstance(meta, k8s.V1ObjectMeta) else k8s.V1ObjectMeta()


def _rs_template(rs: k8s.V1ReplicaSet) -> k8s.V1PodTemplateSpec:
    if rs.spec is None or rs.spec.template is None:
        return k8s.V1PodTemplateSpec()
    return rs.spec.template


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    try:
        return get_run_logger()
    except MissingContextError:
        return _fallback_logger


# ---------------------------------------------------------------------------------------------
# Result models
# ---------------------------------------------------------------------------------------------


class RollbackResult(BaseModel):
    """What `undo_rollout` did (or would do, on a dry run)."""

    deployment: str
    namespace: str
    outcome: Literal["rolled back", "skipped rollback", "dry run"]
    message: str = Field(description="kubectl's wording, e.g. 'deployment.apps/x rolled back'.")
    from_revision: int | None = Field(description="The Deployment's revision before.")
    to_revision: int = Field(description="Revision of the ReplicaSet whose template is restored.")
    images_before: list[str]
    images_after: list[str]
    patch: list[dict[str, Any]] = Field(default_factory=list, description="The JSON patch sent.")


class RestartResult(BaseModel):
    """What `restart_rollout` did."""

    deployment: str
    namespace: str
    restarted_at: str = Field(description="RFC 3339 value of kubectl.kubernetes.io/restartedAt.")
    generation: int | None = Field(description="Deployment generation after the patch.")
    dry_run: bool
    message: str


class RolloutStatus(BaseModel):
    """A Deployment's rollout progress, as `kubectl rollout status` sees it."""

    deployment: str
    namespace: str
    complete: bool
    message: str
    revision: int | None
    generation: int | None
    observed_generation: int | None
    replicas: int = Field(description="Desired replicas (spec).")
    updated_replicas: int
    ready_replicas: int
    available_replicas: int
    elapsed_s: float = 0.0


class PodInfo(BaseModel):
    """One pod, the way `kubectl get pods -o wide` summarises it."""

    name: str
    namespace: str
    phase: str | None
    ready: bool
    ready_containers: int
    containers: int
    restarts: int
    node: str | None
    ip: str | None
    created: datetime | None
    terminating: bool


class PodLogs(BaseModel):
    """The tail of one container's log."""

    pod: str
    container: str
    lines: list[str]
    error: str | None = Field(None, description="Why this container's log could not be read.")


class TailLogsResult(BaseModel):
    """The last lines of every pod of a Deployment, optionally filtered."""

    deployment: str
    namespace: str
    lines: int
    grep: str | None
    logs: list[PodLogs]

    @property
    def all_lines(self) -> list[str]:
        """Every line, prefixed with pod/container like `kubectl logs --prefix`."""
        return [f"[pod/{p.pod}/{p.container}] {line}" for p in self.logs for line in p.lines]


class EventInfo(BaseModel):
    """One core/v1 Event."""

    type: str | None
    reason: str | None
    message: str | None
    kind: str | None
    name: str | None
    count: int | None
    first_seen: datetime | None
    last_seen: datetime = Field(description="lastTimestamp, else eventTime, else creation.")


class NodeInfo(BaseModel):
    """A Node's health."""

    name: str
    ready: bool
    unschedulable: bool
    problems: list[str] = Field(description="Conditions other than Ready that are True.")
    kubelet_version: str | None
    addresses: list[str]


class ScaleResult(BaseModel):
    """What `scale` did."""

    deployment: str
    namespace: str
    replicas_before: int
    replicas_after: int
    dry_run: bool


class RevisionInfo(BaseModel):
    """One entry of a Deployment's rollout history."""

    revision: int
    replica_set: str
    images: list[str]
    change_cause: str | None
    replicas: int
    ready_replicas: int
    created: datetime | None
    current: bool


class RolloutHistory(BaseModel):
    """`kubectl rollout history`, with the images of each revision."""

    deployment: str
    namespace: str
    current_revision: int | None
    revisions: list[RevisionInfo]


# ---------------------------------------------------------------------------------------------
# Pure helpers (unit tested in tests/unit/test_kubernetes_logic.py)
# ---------------------------------------------------------------------------------------------


def parse_revision(value: str | None) -> int | None:
    """deploymentutil.Revision: a missing annotation is 0, an unparsable one is None."""
    if value is None:
        return 0
    if not _INT64.fullmatch(value):
        return None
    number = int(value)
    if not -(2**63) <= number < 2**63:
        return None
    return number


def select_rollback_revision(
    candidates: Sequence[tuple[str | None, _T]], to_revision: int, deployment: str
) -> tuple[int, _T]:
    """kubectl's deploymentRevision: to_revision 0 -> the second highest, else the exact one.

    `candidates` are (revision annotation, item) in kubectl's order: old ReplicaSets as
    listed, then the new one. Raises PermanentError with kubectl's messages.
    """
    if to_revision < 0:
        raise PermanentError(f"unable to find specified revision {to_revision} in history")
    latest: tuple[int, _T] | None = None
    previous: tuple[int, _T] | None = None
    latest_rev, previous_rev = -1, -1
    for annotation, item in candidates:
        rev = parse_revision(annotation)
        if rev is None:
            continue
        if to_revision == 0:
            if latest_rev < rev:
                previous, previous_rev = latest, latest_rev
                latest, latest_rev = (rev, item), rev
            elif previous_rev < rev:
                previous, previous_rev = (rev, item), rev
        elif to_revision == rev:
            return rev, item
    if to_revision > 0:
        raise PermanentError(f"unable to find specified revision {to_revision} in history")
    if previous is None:
        raise PermanentError(f'no rollout history found for deployment "{deployment}"')
    return previous


def semantic_equal(a: Any, b: Any) -> bool:
    """apimachinery's Semantic.DeepEqual on client models: a nil map/slice equals an empty one.

    Structs (models) stay distinct from nil: `emptyDir: {}` is not the same as no emptyDir.
    """
    if a is None and b is None:
        return True
    if a is None or b is None:
        other = b if a is None else a
        return isinstance(other, dict | list) and len(other) == 0
    if isinstance(a, BaseModel) and isinstance(b, BaseModel):
        if type(a) is not type(b):
            return False
        return all(
            semantic_equal(getattr(a, field), getattr(b, field)) for field in type(a).model_fields
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(semantic_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(semantic_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, datetime) and isinstance(b, datetime):
        return a == b
    return type(a) is type(b) and bool(a == b)


def without_hash_label(template: k8s.V1PodTemplateSpec) -> k8s.V1PodTemplateSpec:
    """A deep copy of a pod template minus the `pod-template-hash` label."""
    copy = template.model_copy(deep=True)
    if copy.metadata is None:  # a value (not pointer) field in Go: absent == zero
        copy.metadata = k8s.V1ObjectMeta()
    if copy.metadata.labels is not None:
        copy.metadata.labels.pop(POD_TEMPLATE_HASH, None)
    return copy


def equal_ignore_hash(t1: k8s.V1PodTemplateSpec, t2: k8s.V1PodTemplateSpec) -> bool:
    """deploymentutil.EqualIgnoreHash: templates equal apart from `pod-template-hash`."""
    return semantic_equal(without_hash_label(t1), without_hash_label(t2))


def rollback_annotations(
    deployment_annotations: Mapping[str, str] | None, rs_annotations: Mapping[str, str] | None
) -> dict[str, str]:
    """The Deployment's annotations after a rollback, as kubectl computes them.

    The Deployment keeps its own revision / last-applied / replica keys; every other
    annotation comes from the ReplicaSet (so a Deployment-only annotation is dropped).
    """
    own = deployment_annotations or {}
    merged = {k: own[k] for k in ANNOTATIONS_TO_SKIP if k in own}
    for key, value in (rs_annotations or {}).items():
        if key not in ANNOTATIONS_TO_SKIP:
            merged[key] = value
    return merged


def rollback_patch(
    rs_template: k8s.V1PodTemplateSpec, annotations: Mapping[str, str]
) -> list[dict[str, Any]]:
    """kubectl's getDeploymentPatch: replace /spec/template and /metadata/annotations."""
    template = without_hash_label(rs_template)
    if template.metadata is not None and template.metadata.labels == {}:
        template.metadata.labels = None  # Go's omitempty on an emptied map
    value = k8s.ApiClient().sanitize_for_serialization(template)
    return [
        {"op": "replace", "path": "/spec/template", "value": value},
        {"op": "replace", "path": "/metadata/annotations", "value": dict(annotations)},
    ]


def label_selector_string(selector: k8s.V1LabelSelector | None) -> str:
    """metav1.LabelSelectorAsSelector rendered as a `labelSelector` query string."""
    if selector is None:
        return ""
    parts = [f"{k}={v}" for k, v in sorted((selector.match_labels or {}).items())]
    for expr in selector.match_expressions or []:
        values = ",".join(sorted(expr.values or []))
        op = expr.operator
        if op == "In":
            parts.append(f"{expr.key} in ({values})")
        elif op == "NotIn":
            parts.append(f"{expr.key} notin ({values})")
        elif op == "Exists":
            parts.append(expr.key)
        elif op == "DoesNotExist":
            parts.append(f"!{expr.key}")
        else:
            raise PermanentError(f"unsupported label selector operator {op!r}")
    return ",".join(parts)


_REQ = re.compile(
    r"""\s*(?:
        (?P<not>!)\s*(?P<nkey>[^\s=!,()]+)
      | (?P<skey>[^\s=!,()]+)\s+(?P<sop>in|notin)\s*\((?P<vals>[^)]*)\)
      | (?P<key>[^\s=!,()]+)\s*(?:(?P<op>==|=|!=)\s*(?P<val>[^\s=!,()]*))?
    )\s*(?:,|$)""",
    re.VERBOSE,
)


def labels_match(selector: str, labels: Mapping[str, str] | None) -> bool:
    """Whether `labels` satisfy a label selector string (equality and set-based forms)."""
    labels = labels or {}
    pos, text = 0, selector.strip()
    if not text:
        return True
    while pos < len(text):
        m = _REQ.match(text, pos)
        if m is None or m.end() == pos:
            raise PermanentError(f"cannot parse label selector {selector!r}")
        pos = m.end()
        if m["not"]:
            ok = m["nkey"] not in labels
        elif m["skey"]:
            vals = {v.strip() for v in m["vals"].split(",") if v.strip()}
            if m["sop"] == "in":
                ok = labels.get(m["skey"]) in vals
            else:
                ok = labels.get(m["skey"]) not in vals
        elif m["op"] is None:
            ok = m["key"] in labels
        elif m["op"] == "!=":
            ok = labels.get(m["key"]) != m["val"]
        else:
            ok = labels.get(m["key"]) == m["val"]
        if not ok:
            return False
    return True


def rollout_status_message(dep: k8s.V1Deployment) -> tuple[str, bool]:
    """kubectl's DeploymentStatusViewer.Status: (message, done); raises past the deadline."""
    name = _meta(dep).name
    status = dep.status or k8s.V1DeploymentStatus()
    generation = _meta(dep).generation or 0
    if generation <= (status.observed_generation or 0):
        for cond in status.conditions or []:
            if cond.type == "Progressing" and cond.reason == TIMED_OUT_REASON:
                raise PermanentError(f'deployment "{name}" exceeded its progress deadline')
        updated = status.updated_replicas or 0
        if dep.spec.replicas is not None and updated < dep.spec.replicas:
            return (
                f'Waiting for deployment "{name}" rollout to finish: {updated} out of '
                f"{dep.spec.replicas} new replicas have been updated...",
                False,
            )
        if (status.replicas or 0) > updated:
            return (
                f'Waiting for deployment "{name}" rollout to finish: '
                f"{(status.replicas or 0) - updated} old replicas are pending termination...",
                False,
            )
        if (status.available_replicas or 0) < updated:
            return (
                f'Waiting for deployment "{name}" rollout to finish: '
                f"{status.available_replicas or 0} of {updated} updated replicas are available...",
                False,
            )
        return f'deployment "{name}" successfully rolled out', True
    return "Waiting for deployment spec update to be observed...", False


def rfc3339_now(now: datetime | None = None) -> str:
    """Go's time.Now().Format(time.RFC3339): seconds, 'Z' for UTC, else +hh:mm."""
    now = (now or datetime.now(UTC).astimezone()).replace(microsecond=0)
    text = now.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def order_like_kubectl(
    replica_sets: Sequence[k8s.V1ReplicaSet], template: k8s.V1PodTemplateSpec
) -> list[k8s.V1ReplicaSet]:
    """deploymentutil.GetAllReplicaSets order: old ReplicaSets as listed, then the new one.

    The new one is the oldest (by creation time, then name) whose template equals the
    Deployment's, ignoring the hash label.
    """

    def created(rs: k8s.V1ReplicaSet) -> tuple[datetime, str]:
        ts = _meta(rs).creation_timestamp or datetime.min.replace(tzinfo=UTC)
        return ts, _meta(rs).name or ""

    new = next(
        (
            rs
            for rs in sorted(replica_sets, key=created)
            if equal_ignore_hash(_rs_template(rs), template)
        ),
        None,
    )
    return [rs for rs in replica_sets if rs is not new] + ([new] if new is not None else [])


def images_of(template: k8s.V1PodTemplateSpec | None) -> list[str]:
    """The container images of a pod template, in order."""
    if template is None or template.spec is None:
        return []
    return [c.image or "" for c in template.spec.containers]


# ---------------------------------------------------------------------------------------------
# API access and error mapping
# ---------------------------------------------------------------------------------------------


class _Kube:
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
def _kube(settings: KubernetesSettings | None) -> Iterator[_Kube]:
    kube = _Kube(settings or KubernetesSettings())
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


def _call(
    kube: _Kube,
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


def _get_deployment(kube: _Kube, name: str, namespace: str) -> k8s.V1Deployment:
    return _call(
        kube,
        kube.apps.read_namespaced_deployment,
        name,
        namespace,
        verb="get",
        resource="deployments",
        name=name,
        namespace=namespace,
    )


def _owned_replica_sets(kube: _Kube, dep: k8s.V1Deployment) -> list[k8s.V1ReplicaSet]:
    """ReplicaSets matching the Deployment's selector whose controller is the Deployment."""
    namespace = _meta(dep).namespace
    listed = _call(
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
        controller = next((o for o in _meta(rs).owner_references or [] if o.controller), None)
        if controller is not None and controller.uid == _meta(dep).uid:
            owned.append(rs)
    return owned


def _annotation(obj: k8s.V1Deployment | k8s.V1ReplicaSet, key: str) -> str | None:
    return (_meta(obj).annotations or {}).get(key)


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------


@task(
    **RETRY_IDEMPOTENT_WRITE,
    cache_policy=NO_CACHE,
    task_run_name="undo-rollout-{namespace}/{deployment}",
)
def undo_rollout(
    deployment: str,
    namespace: str,
    to_revision: int = 0,
    dry_run: bool = False,
    settings: KubernetesSettings | None = None,
) -> RollbackResult:
    """Roll a Deployment back to a previous revision exactly like `kubectl rollout undo`."""
    log = _logger()
    with _kube(settings) as kube:
        if to_revision < 0:
            raise PermanentError(f"unable to find specified revision {to_revision} in history")
        dep = _get_deployment(kube, deployment, namespace)
        owned = order_like_kubectl(_owned_replica_sets(kube, dep), dep.spec.template)
        revision, rs = select_rollback_revision(
            [(_annotation(r, REVISION), r) for r in owned], to_revision, deployment
        )
        current = parse_revision(_annotation(dep, REVISION))
        if dep.spec.paused:
            raise SafetyViolation(
                # kubectl's exact words (checked by tests/integration/test_kubernetes_kubectl.py)
                "you cannot rollback a paused deployment; resume it first with "
                "'kubectl rollout resume' and try again"
            )
        before = images_of(dep.spec.template)
        if equal_ignore_hash(_rs_template(rs), dep.spec.template):
            message = (
                f"deployment.apps/{deployment} skipped rollback "
                f"(current template already matches revision {to_revision})"
            )
            log.info(message)
            return RollbackResult(
                deployment=deployment,
                namespace=namespace,
                outcome="skipped rollback",
                message=message,
                from_revision=current,
                to_revision=revision,
                images_before=before,
                images_after=before,
            )
        annotations = rollback_annotations(_meta(dep).annotations, _meta(rs).annotations)
        patch = rollback_patch(_rs_template(rs), annotations)
        _call(
            kube,
            kube.apps.patch_namespaced_deployment,
            deployment,
            namespace,
            patch,
            dry_run="All" if dry_run else None,
            _content_type=_JSON_PATCH,
            verb="patch",
            resource="deployments",
            name=deployment,
            namespace=namespace,
        )
        after = images_of(_rs_template(rs))
        if dry_run:
            message = f"deployment.apps/{deployment} would roll back to revision {revision}"
        else:
            message = f"deployment.apps/{deployment} rolled back"
        log.info(
            "%s (revision %s -> %s, images %s -> %s)", message, current, revision, before, after
        )
        return RollbackResult(
            deployment=deployment,
            namespace=namespace,
            outcome="dry run" if dry_run else "rolled back",
            message=message,
            from_revision=current,
            to_revision=revision,
            images_before=before,
            images_after=after,
            patch=patch,
        )


@task(
    **RETRY_IDEMPOTENT_WRITE,
    cache_policy=NO_CACHE,
    task_run_name="restart-rollout-{namespace}/{deployment}",
)
def restart_rollout(
    deployment: str,
    namespace: str,
    dry_run: bool = False,
    settings: KubernetesSettings | None = None,
) -> RestartResult:
    """Restart a Deployment's pods like `kubectl rollout restart` (restartedAt annotation)."""
    log = _logger()
    with _kube(settings) as kube:
        dep = _get_deployment(kube, deployment, namespace)
        if dep.spec.paused:
            raise SafetyViolation("can't restart paused deployment (run rollout resume first)")
        now = rfc3339_now()
        current = (
            (dep.spec.template.metadata.annotations or {}) if dep.spec.template.metadata else {}
        )
        if current.get(RESTARTED_AT) == now:
            # kubectl's patch would be empty: nothing would restart.
            raise TransientError(
                f"failed to create patch for {deployment}: if restart has already been "
                "triggered within the past second, please wait before attempting to trigger another"
            )
        body = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: now}}}}}
        patched = _call(
            kube,
            kube.apps.patch_namespaced_deployment,
            deployment,
            namespace,
            body,
            field_manager=ROLLOUT_FIELD_MANAGER,
            dry_run="All" if dry_run else None,
            _content_type=_STRATEGIC,
            verb="patch",
            resource="deployments",
            name=deployment,
            namespace=namespace,
        )
        message = f"deployment.apps/{deployment} restarted" + (
            " (server dry run)" if dry_run else ""
        )
        log.info(message)
        return RestartResult(
            deployment=deployment,
            namespace=namespace,
            restarted_at=now,
            generation=_meta(patched).generation,
            dry_run=dry_run,
            message=message,
        )


def _status_model(
    dep: k8s.V1Deployment, message: str, complete: bool, elapsed: float
) -> RolloutStatus:
    status = dep.status or k8s.V1DeploymentStatus()
    return RolloutStatus(
        deployment=_meta(dep).name,
        namespace=_meta(dep).namespace,
        complete=complete,
        message=message,
        revision=parse_revision(_annotation(dep, REVISION)),
        generation=_meta(dep).generation,
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
    log = _logger()
    start = time.monotonic()
    last = ""
    with _kube(settings) as kube:
        while True:
            dep = _get_deployment(kube, deployment, namespace)
            message, done = rollout_status_message(dep)
            elapsed = time.monotonic() - start
            if message != last:
                log.info("%s/%s: %s", namespace, deployment, message)
                last = message
            if done:
                return _status_model(dep, message, True, elapsed)
            if elapsed >= timeout:
                raise PermanentError(
                    f"timed out after {timeout:g} s waiting for deployment {deployment} in "
                    f"namespace {namespace} to roll out; last status: {message}"
                )
            time.sleep(min(poll_s, max(0.05, timeout - elapsed)))


def _pod_info(pod: k8s.V1Pod) -> PodInfo:
    status = pod.status or k8s.V1PodStatus()
    statuses = status.container_statuses or []
    ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])
    return PodInfo(
        name=_meta(pod).name,
        namespace=_meta(pod).namespace,
        phase=status.phase,
        ready=ready,
        ready_containers=sum(1 for c in statuses if c.ready),
        containers=len(pod.spec.containers) if pod.spec else len(statuses),
        restarts=sum(c.restart_count or 0 for c in statuses),
        node=pod.spec.node_name if pod.spec else None,
        ip=status.pod_ip,
        created=_meta(pod).creation_timestamp,
        terminating=_meta(pod).deletion_timestamp is not None,
    )


def _list_pods(kube: _Kube, namespace: str, selector: str) -> list[k8s.V1Pod]:
    pods = _call(
        kube,
        kube.core.list_namespaced_pod,
        namespace,
        label_selector=selector or None,
        verb="list",
        resource="pods",
        namespace=namespace,
    )
    return sorted(pods.items, key=lambda p: _meta(p).name or "")


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
    with _kube(settings) as kube:
        return [_pod_info(p) for p in _list_pods(kube, namespace, selector)]


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="tail-logs-{deployment}")
def tail_logs(
    deployment: str,
    lines: int = 100,
    grep: str | None = None,
    namespace: str | None = None,
    settings: KubernetesSettings | None = None,
) -> TailLogsResult:
    """The last `lines` log lines of every container of a Deployment's pods, optionally grepped."""
    if not 1 <= lines <= 10_000:
        raise PermanentError(f"lines must be between 1 and 10000, not {lines}")
    try:
        pattern = re.compile(grep) if grep else None
    except re.error as exc:
        raise PermanentError(f"invalid grep pattern {grep!r}: {exc}") from None
    settings = settings or KubernetesSettings()
    namespace = namespace or settings.namespace
    out: list[PodLogs] = []
    with _kube(settings) as kube:
        dep = _get_deployment(kube, deployment, namespace)
        for pod in _list_pods(kube, namespace, label_selector_string(dep.spec.selector)):
            containers = pod.spec.containers if pod.spec else []
            node_name = pod.spec.node_name if pod.spec else None
            for container in containers:
                name = _meta(pod).name
                if not node_name:
                    out.append(
                        PodLogs(pod=name, container=container.name, lines=[], error="not scheduled")
                    )
                    continue
                try:
                    text = _call(
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
                got = str(text).splitlines()
                if pattern is not None:
                    got = [line for line in got if pattern.search(line)]
                out.append(PodLogs(pod=name, container=container.name, lines=got))
    return TailLogsResult(
        deployment=deployment, namespace=namespace, lines=lines, grep=grep, logs=out
    )


def _event_time(ev: k8s.CoreV1Event) -> datetime:
    for ts in (
        ev.last_timestamp,
        ev.event_time,
        ev.first_timestamp,
        _meta(ev).creation_timestamp,
    ):
        if ts is not None:
            return ts if ts.tzinfo else ts.replace(tzinfo=UTC)
    return datetime.min.replace(tzinfo=UTC)


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="list-events-{namespace}")
def list_events(
    namespace: str | None = None,
    object_name: str | None = None,
    settings: KubernetesSettings | None = None,
) -> list[EventInfo]:
    """A namespace's events, oldest first (by last seen), optionally for one object."""
    settings = settings or KubernetesSettings()
    namespace = namespace or settings.namespace
    with _kube(settings) as kube:
        events = _call(
            kube,
            kube.core.list_namespaced_event,
            namespace,
            field_selector=f"involvedObject.name={object_name}" if object_name else None,
            verb="list",
            resource="events",
            namespace=namespace,
        )
    return [
        EventInfo(
            type=ev.type,
            reason=ev.reason,
            message=ev.message,
            kind=ev.involved_object.kind,
            name=ev.involved_object.name,
            count=ev.count,
            first_seen=ev.first_timestamp,
            last_seen=_event_time(ev),
        )
        for ev in sorted(events.items, key=_event_time)
    ]


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="node-status")
def node_status(settings: KubernetesSettings | None = None) -> list[NodeInfo]:
    """Every Node's readiness, schedulability and pressure conditions (needs the ClusterRole)."""
    with _kube(settings) as kube:
        nodes = _call(kube, kube.core.list_node, verb="list", resource="nodes")
    result = []
    for node in sorted(nodes.items, key=lambda n: _meta(n).name or ""):
        conditions = (node.status.conditions if node.status else None) or []
        result.append(
            NodeInfo(
                name=_meta(node).name,
                ready=any(c.type == "Ready" and c.status == "True" for c in conditions),
                unschedulable=bool(node.spec and node.spec.unschedulable),
                problems=[
                    f"{c.type}: {c.message or c.reason or ''}".strip()
                    for c in conditions
                    if c.type != "Ready" and c.status == "True"
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
    log = _logger()
    with _kube(settings) as kube:
        dep = _get_deployment(kube, deployment, namespace)
        labels = dep.spec.template.metadata.labels if dep.spec.template.metadata else None
        if not labels_match(settings.label_selector, labels):
            raise SafetyViolation(
                f"refusing to scale {deployment} in namespace {namespace}: its pods do not match "
                f"the platform selector {settings.label_selector!r}"
            )
        before = dep.spec.replicas if dep.spec.replicas is not None else 1
        _call(
            kube,
            kube.apps.patch_namespaced_deployment_scale,
            deployment,
            namespace,
            {"spec": {"replicas": replicas}},
            dry_run="All" if dry_run else None,
            _content_type=_MERGE,
            verb="patch",
            resource="deployments/scale",
            name=deployment,
            namespace=namespace,
        )
    log.info(
        "%s/%s scaled %d -> %d%s",
        namespace,
        deployment,
        before,
        replicas,
        " (dry run)" if dry_run else "",
    )
    return ScaleResult(
        deployment=deployment,
        namespace=namespace,
        replicas_before=before,
        replicas_after=before if dry_run else replicas,
        dry_run=dry_run,
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
    """A Deployment's revisions (ReplicaSets it controls) with images and change-cause."""
    with _kube(settings) as kube:
        dep = _get_deployment(kube, deployment, namespace)
        owned = _owned_replica_sets(kube, dep)
    current = parse_revision(_annotation(dep, REVISION))
    revisions = []
    for rs in owned:
        rev = parse_revision(_annotation(rs, REVISION))
        if rev is None:
            continue
        status = rs.status or k8s.V1ReplicaSetStatus(replicas=0)
        revisions.append(
            RevisionInfo(
                revision=rev,
                replica_set=_meta(rs).name,
                images=images_of(_rs_template(rs)),
                change_cause=_annotation(rs, CHANGE_CAUSE),
                replicas=status.replicas or 0,
                ready_replicas=status.ready_replicas or 0,
                created=_meta(rs).creation_timestamp,
                current=equal_ignore_hash(_rs_template(rs), dep.spec.template),
            )
        )
    revisions.sort(key=lambda r: r.revision)
    return RolloutHistory(
        deployment=deployment, namespace=namespace, current_revision=current, revisions=revisions
    )
