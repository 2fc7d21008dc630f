"""When a Deployment's revision became current, and which revision an undo just left.

A rollout creates a ReplicaSet; an undo does not. `kubectl rollout undo` (and our
`apply_rollback`, the same patch) puts an old template back, and the Deployment controller
re-uses the old ReplicaSet whose template matches: it gives it the next revision number and
moves its earlier numbers into `deployment.kubernetes.io/revision-history`. That
ReplicaSet's `creationTimestamp` stays the old release's. So a revision is dated by
`became_current`:

- a ReplicaSet that never held another revision became current when it was created
  (`creationTimestamp`);
- a re-used one became current when the controller wrote its new revision annotation: the
  `time` of the managedFields entry that owns that annotation (`kube-controller-manager`,
  `Update`, whoever changed the template). Up to 1.21 the controller's status writes land
  in the same entry (no `subresource` in the key yet), and a field it adds or removes later
  (scaled to zero and back, `readyReplicas` appearing) moves that time on, so it is the
  moment or later, never earlier. Both times have 1 s resolution.

`undone_previous` tells whether the previous revision (the one `rollout undo` would go back
to) was itself rolled back from: the current revision returned to an older template. Nothing
here talks to the API server (unit-tested in tests/unit/test_kubernetes_revisions_logic.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Literal

from kubernetes import client as k8s

from tasks.kubernetes.models import RevisionInfo, RevisionUndo
from tasks.kubernetes.semantics import (
    CHANGE_CAUSE,
    REVISION,
    REVISION_HISTORY,
    annotation,
    equal_ignore_hash,
    images_of,
    meta,
    parse_revision,
    rs_template,
)

DatedBy = Literal["created", "revision annotation", "unknown"]

#: Clock skew allowed between the source that dates a failure's onset (Prometheus, the
#: payments database) and the API server; it also covers the 1 s resolution of the
#: Kubernetes times a revision is dated by.
ONSET_TOLERANCE_S = 15.0


def began_after_rollout(
    onset: datetime | None,
    became_current: datetime | None,
    window: timedelta,
    tolerance_s: float = ONSET_TOLERANCE_S,
) -> bool:
    """Whether failures that began at `onset` began within `window` after a revision became
    current (`became_current`, never its ReplicaSet's creation), give or take `tolerance_s`.

    The one dating rule of every runbook that suspects a release (high-error-rate's D,
    payment-failure's rollout row). Unknown times suspect nothing.
    """
    if onset is None or became_current is None:
        return False
    tolerance = timedelta(seconds=tolerance_s)
    return onset >= became_current - tolerance and onset - became_current <= window


def began_before_rollout(
    onset: datetime | None, became_current: datetime | None, tolerance_s: float = ONSET_TOLERANCE_S
) -> bool:
    """Whether the failures plainly began before the revision became current."""
    if onset is None or became_current is None:
        return False
    return onset < became_current - timedelta(seconds=tolerance_s)


def earlier_revisions(rs: k8s.V1ReplicaSet) -> list[int]:
    """The revisions a ReplicaSet held before its current one (`revision-history`), sorted."""
    history = annotation(rs, REVISION_HISTORY) or ""
    found = {parse_revision(part.strip()) for part in history.split(",") if part.strip()}
    return sorted(r for r in found if r is not None and r > 0)


def revision_written_at(obj: k8s.V1ReplicaSet | k8s.V1Deployment) -> datetime | None:
    """The managedFields time of whoever last wrote the revision annotation (1 s resolution).

    An entry's time moves on with every later change its manager makes, so this is when the
    annotation was written or later.
    """
    times = []
    for entry in meta(obj).managed_fields or []:
        fields = entry.fields_v1 or {}
        annotations = (fields.get("f:metadata") or {}).get("f:annotations") or {}
        if f"f:{REVISION}" in annotations and entry.time is not None:
            times.append(entry.time)
    return max(times) if times else None


def became_current(rs: k8s.V1ReplicaSet) -> tuple[datetime | None, DatedBy]:
    """When a ReplicaSet's revision became the Deployment's, and what says so.

    Never the creation time of a re-used ReplicaSet: that is the old release's.
    """
    if not earlier_revisions(rs):
        created = meta(rs).creation_timestamp
        return created, "created" if created is not None else "unknown"
    written = revision_written_at(rs)
    return written, "revision annotation" if written is not None else "unknown"


def revision_info(rs: k8s.V1ReplicaSet, dep: k8s.V1Deployment) -> RevisionInfo | None:
    """One entry of the rollout history (None for a ReplicaSet without a valid revision)."""
    rev = parse_revision(annotation(rs, REVISION))
    if rev is None:
        return None
    status = rs.status or k8s.V1ReplicaSetStatus(replicas=0)
    since, dated_by = became_current(rs)
    return RevisionInfo(
        revision=rev,
        replica_set=meta(rs).name or "",
        images=images_of(rs_template(rs)),
        change_cause=annotation(rs, CHANGE_CAUSE),
        replicas=status.replicas or 0,
        ready_replicas=status.ready_replicas or 0,
        created=meta(rs).creation_timestamp,
        current=equal_ignore_hash(rs_template(rs), dep.spec.template),
        earlier_revisions=earlier_revisions(rs),
        became_current=since,
        dated_by=dated_by,
    )


def revision_infos(
    replica_sets: Sequence[k8s.V1ReplicaSet], dep: k8s.V1Deployment
) -> list[RevisionInfo]:
    """The rollout history of a Deployment's ReplicaSets, oldest revision first."""
    infos = [info for rs in replica_sets if (info := revision_info(rs, dep)) is not None]
    return sorted(infos, key=lambda r: r.revision)


def current_and_previous(
    revisions: Sequence[RevisionInfo],
) -> tuple[RevisionInfo | None, RevisionInfo | None]:
    """The current revision (highest whose template is the Deployment's) and the previous one
    (the highest other: what `rollout undo` goes back to)."""
    current = [r for r in revisions if r.current]
    others = [r for r in revisions if not r.current]
    latest = max(current, key=lambda r: r.revision) if current else None
    previous = max(others, key=lambda r: r.revision) if others else None
    return latest, previous


def undone_previous(revisions: Sequence[RevisionInfo]) -> RevisionUndo | None:
    """The previous revision, when the current one is an undo of it; else None.

    The current ReplicaSet replaced the previous revision. It is an undo when that
    ReplicaSet is older than the previous revision: it held a lower revision number before
    (its `revision-history` lists one), or, should that annotation be missing (the
    controller stops appending past its length limit), it was created before the previous
    revision's ReplicaSet.
    """
    latest, previous = current_and_previous(revisions)
    if latest is None or previous is None:
        return None
    older = [r for r in latest.earlier_revisions if r < previous.revision]
    created_before = (
        latest.created is not None
        and previous.created is not None
        and latest.created < previous.created
    )
    if not older and not created_before:
        return None
    return RevisionUndo(
        revision=previous.revision,
        images=previous.images,
        by_revision=latest.revision,
        template_of=max(older) if older else None,
        at=latest.became_current,
    )
