"""kubectl's algorithms as pure functions: revisions, template equality, patches, status.

Nothing here talks to the API server, so every piece is unit-tested alone
(tests/unit/test_kubernetes_logic.py) and the tasks stay thin.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from kubernetes import client as k8s
from pydantic import BaseModel, ValidationError

from tasks.errors import PermanentError, SafetyViolation

# kubectl's constants (k8s.io/api/apps/v1, deploymentutil, corev1).
POD_TEMPLATE_HASH = "pod-template-hash"
REVISION = "deployment.kubernetes.io/revision"
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
CHANGE_CAUSE = "kubernetes.io/change-cause"
#: The revisions a re-used ReplicaSet held before (set by the controller on an undo).
REVISION_HISTORY = "deployment.kubernetes.io/revision-history"
ANNOTATIONS_TO_SKIP = frozenset(
    {
        "kubectl.kubernetes.io/last-applied-configuration",
        REVISION,
        REVISION_HISTORY,
        "deployment.kubernetes.io/desired-replicas",
        "deployment.kubernetes.io/max-replicas",
        "deprecated.deployment.rollback.to",
    }
)
TIMED_OUT_REASON = "ProgressDeadlineExceeded"
ROLLOUT_FIELD_MANAGER = "kubectl-rollout"

_INT64 = re.compile(r"[+-]?[0-9]+")

_T = TypeVar("_T")


def meta(obj: Any) -> k8s.V1ObjectMeta:
    """An object's metadata, an empty one when absent."""
    value = obj.metadata
    return value if isinstance(value, k8s.V1ObjectMeta) else k8s.V1ObjectMeta()


def rs_template(rs: k8s.V1ReplicaSet) -> k8s.V1PodTemplateSpec:
    """A ReplicaSet's pod template, an empty one when absent."""
    if rs.spec is None or rs.spec.template is None:
        return k8s.V1PodTemplateSpec()
    return rs.spec.template


def annotation(obj: k8s.V1Deployment | k8s.V1ReplicaSet, key: str) -> str | None:
    """One annotation of an object, None when absent."""
    return (meta(obj).annotations or {}).get(key)


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


def require_platform_pods(selector: str, workload: Any, doing: str) -> None:
    """Refuse `doing` unless the workload's pod template matches the platform selector.

    A typo in a name must not change someone else's workload.
    """
    template = workload.spec.template
    labels = template.metadata.labels if template.metadata else None
    if not labels_match(selector, labels):
        raise SafetyViolation(
            f"refusing to {doing}: its pods do not match the platform selector {selector!r}"
        )


Planned = TypeVar("Planned", bound=BaseModel)


def validated_plan(model: type[Planned], data: Any, what: str) -> Planned:
    """`data` as a planned change, its caps and ranges checked; a `SafetyViolation` if not.

    Used for the plan a read step builds and again by the write step: a plan built by hand
    (`model_construct`) must not skip the cap.
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SafetyViolation(f"{what}: " + "; ".join(e["msg"] for e in exc.errors())) from None


@dataclass(frozen=True)
class _Requirement:
    """One requirement of a label selector string: `key`, a LabelSelector operator
    (In, NotIn, Exists, DoesNotExist) and its values; `equality` for `key=value`."""

    key: str
    operator: str
    values: tuple[str, ...] = ()
    equality: bool = False


def _requirements(selector: str) -> list[_Requirement]:
    """The requirements of a selector string (equality and set-based forms), in order."""
    text = selector.strip()
    found: list[_Requirement] = []
    pos = 0
    while pos < len(text):
        m = _REQ.match(text, pos)
        if m is None or m.end() == pos:
            raise PermanentError(f"cannot parse label selector {selector!r}")
        pos = m.end()
        if m["not"]:
            found.append(_Requirement(m["nkey"], "DoesNotExist"))
        elif m["skey"]:
            vals = tuple(sorted({v.strip() for v in m["vals"].split(",") if v.strip()}))
            found.append(_Requirement(m["skey"], "In" if m["sop"] == "in" else "NotIn", vals))
        elif m["op"] is None:
            found.append(_Requirement(m["key"], "Exists"))
        elif m["op"] == "!=":
            found.append(_Requirement(m["key"], "NotIn", (m["val"],)))
        else:
            found.append(_Requirement(m["key"], "In", (m["val"],), equality=True))
    return found


def labels_match(selector: str, labels: Mapping[str, str] | None) -> bool:
    """Whether `labels` satisfy a label selector string (equality and set-based forms)."""
    labels = labels or {}
    for req in _requirements(selector):
        if req.operator == "Exists":
            ok = req.key in labels
        elif req.operator == "DoesNotExist":
            ok = req.key not in labels
        elif req.operator == "In":
            ok = labels.get(req.key) in req.values
        else:
            ok = labels.get(req.key) not in req.values
        if not ok:
            return False
    return True


def parse_label_selector(selector: str) -> dict[str, Any]:
    """A label selector string as a LabelSelector body (`matchLabels`, `matchExpressions`).

    The inverse of `label_selector_string`; an empty or unparsable selector is refused.
    """
    if not selector.strip():
        raise PermanentError("an empty label selector selects every pod: refused")
    match_labels: dict[str, str] = {}
    exprs: list[dict[str, Any]] = []
    for req in _requirements(selector):
        if not req.equality:
            expr: dict[str, Any] = {"key": req.key, "operator": req.operator}
            if req.operator in ("In", "NotIn"):
                expr["values"] = list(req.values)
            exprs.append(expr)
            continue
        (value,) = req.values
        if match_labels.get(req.key, value) != value:
            raise PermanentError(f"label selector {selector!r} asks {req.key} for two values")
        match_labels[req.key] = value
    body: dict[str, Any] = {}
    if match_labels:
        body["matchLabels"] = match_labels
    if exprs:
        body["matchExpressions"] = exprs
    return body


def rollout_status_message(dep: k8s.V1Deployment) -> tuple[str, bool]:
    """kubectl's DeploymentStatusViewer.Status: (message, done); raises past the deadline."""
    name = meta(dep).name
    status = dep.status or k8s.V1DeploymentStatus()
    generation = meta(dep).generation or 0
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
        ts = meta(rs).creation_timestamp or datetime.min.replace(tzinfo=UTC)
        return ts, meta(rs).name or ""

    new = next(
        (
            rs
            for rs in sorted(replica_sets, key=created)
            if equal_ignore_hash(rs_template(rs), template)
        ),
        None,
    )
    return [rs for rs in replica_sets if rs is not new] + ([new] if new is not None else [])


def images_of(template: k8s.V1PodTemplateSpec | None) -> list[str]:
    """The container images of a pod template, in order."""
    if template is None or template.spec is None:
        return []
    return [c.image or "" for c in template.spec.containers]


def statefulset_status_message(sts: k8s.V1StatefulSet) -> tuple[str, bool]:
    """kubectl's StatefulSetStatusViewer.Status: (message, done); OnDelete -> PermanentError."""
    spec = sts.spec
    status = sts.status or k8s.V1StatefulSetStatus(replicas=0)
    strategy = spec.update_strategy or k8s.V1StatefulSetUpdateStrategy(type="RollingUpdate")
    if strategy.type != "RollingUpdate":
        raise PermanentError("rollout status is only available for RollingUpdate strategy type")
    observed = status.observed_generation or 0
    if observed == 0 or (meta(sts).generation or 0) > observed:
        return "Waiting for statefulset spec update to be observed...", False
    ready = status.ready_replicas or 0
    if spec.replicas is not None and ready < spec.replicas:
        return f"Waiting for {spec.replicas - ready} pods to be ready...", False
    updated = status.updated_replicas or 0
    rolling = strategy.rolling_update
    if rolling is not None:
        # The API server defaults partition to 0, so this is the usual branch (kubectl's
        # wording included: "partitioned roll out complete" with no partition set).
        partition = rolling.partition
        if (
            spec.replicas is not None
            and partition is not None
            and (updated < spec.replicas - partition)
        ):
            return (
                "Waiting for partitioned roll out to finish: "
                f"{updated} out of {spec.replicas - partition} new pods have been updated...",
                False,
            )
        return f"partitioned roll out complete: {updated} new pods have been updated...", True
    if status.update_revision != status.current_revision:
        return (
            f"waiting for statefulset rolling update to complete {updated} pods at revision "
            f"{status.update_revision}...",
            False,
        )
    return (
        f"statefulset rolling update complete {status.current_replicas or 0} pods at revision "
        f"{status.current_revision}...",
        True,
    )
