"""When a revision became current, and whether the previous one was just rolled back from."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes import client as k8s

from tasks.kubernetes import (
    REVISION,
    REVISION_HISTORY,
    RevisionInfo,
    became_current,
    earlier_revisions,
    undone_previous,
)
from tasks.kubernetes.revisions import revision_infos

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def template(image: str) -> k8s.V1PodTemplateSpec:
    return k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(labels={"app": "akig"}),
        spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="app", image=image)]),
    )


def controller_entry(at: datetime, revision: bool = True) -> k8s.V1ManagedFieldsEntry:
    """What kube-controller-manager 1.20 records on a ReplicaSet it bumped (status included)."""
    annotations: dict[str, Any] = {".": {}, "f:deployment.kubernetes.io/desired-replicas": {}}
    if revision:
        annotations[f"f:{REVISION}"] = {}
        annotations[f"f:{REVISION_HISTORY}"] = {}
    return k8s.V1ManagedFieldsEntry(
        manager="kube-controller-manager",
        operation="Update",
        api_version="apps/v1",
        fields_type="FieldsV1",
        fields_v1={
            "f:metadata": {"f:annotations": annotations},
            "f:status": {"f:replicas": {}},
        },
        time=at,
    )


def replica_set(
    name: str,
    image: str,
    revision: int,
    created: datetime,
    history: str | None = None,
    managed: list[k8s.V1ManagedFieldsEntry] | None = None,
) -> k8s.V1ReplicaSet:
    annotations = {REVISION: str(revision)}
    if history is not None:
        annotations[REVISION_HISTORY] = history
    return k8s.V1ReplicaSet(
        metadata=k8s.V1ObjectMeta(
            name=name,
            annotations=annotations,
            creation_timestamp=created,
            managed_fields=managed,
        ),
        spec=k8s.V1ReplicaSetSpec(
            selector=k8s.V1LabelSelector(match_labels={"app": "akig"}), template=template(image)
        ),
    )


def deployment(image: str) -> k8s.V1Deployment:
    return k8s.V1Deployment(
        metadata=k8s.V1ObjectMeta(name="akig-backend", namespace="n"),
        spec=k8s.V1DeploymentSpec(
            selector=k8s.V1LabelSelector(match_labels={"app": "akig"}), template=template(image)
        ),
    )


def test_earlier_revisions_parse_the_controllers_list() -> None:
    rs = replica_set("a", "img:v1", 5, T0, history="1,3, x,,3")
    assert earlier_revisions(rs) == [1, 3]
    assert earlier_revisions(replica_set("b", "img:v1", 2, T0)) == []


def test_a_new_replica_set_became_current_when_it_was_created() -> None:
    rs = replica_set("v2", "img:v2", 2, T0, managed=[controller_entry(T0 + timedelta(seconds=9))])
    assert became_current(rs) == (T0, "created")


def test_a_reused_replica_set_is_dated_by_its_revision_annotation_not_its_creation() -> None:
    undo = T0 + timedelta(minutes=7)
    rs = replica_set(
        "v1",
        "img:v1",
        3,
        T0,
        history="1",
        managed=[
            # Another manager's entry that does not own the revision annotation is ignored.
            k8s.V1ManagedFieldsEntry(
                manager="kubectl",
                operation="Update",
                fields_v1={"f:metadata": {"f:labels": {}}},
                time=undo + timedelta(minutes=5),
            ),
            controller_entry(undo),
        ],
    )
    assert became_current(rs) == (undo, "revision annotation")


def test_a_reused_replica_set_without_managed_fields_is_undated() -> None:
    rs = replica_set("v1", "img:v1", 3, T0, history="1")
    assert became_current(rs) == (None, "unknown")


def history_after(*replica_sets: k8s.V1ReplicaSet, image: str) -> list[RevisionInfo]:
    return revision_infos(list(replica_sets), deployment(image))


def test_a_rollout_after_a_rollout_undoes_nothing() -> None:
    revisions = history_after(
        replica_set("v1", "img:v1", 1, T0),
        replica_set("v2", "img:v2", 2, T0 + timedelta(minutes=1)),
        image="img:v2",
    )
    assert undone_previous(revisions) is None
    assert [(r.revision, r.current, r.became_current) for r in revisions] == [
        (1, False, T0),
        (2, True, T0 + timedelta(minutes=1)),
    ]


def test_an_undo_makes_the_previous_revision_one_rolled_back_from() -> None:
    undo = T0 + timedelta(minutes=3)
    revisions = history_after(
        replica_set("v1", "img:v1", 3, T0, history="1", managed=[controller_entry(undo)]),
        replica_set("v2", "img:v2", 2, T0 + timedelta(minutes=1)),
        image="img:v1",
    )
    undone = undone_previous(revisions)
    assert undone is not None
    assert (undone.revision, undone.images, undone.by_revision, undone.template_of) == (
        2,
        ["img:v2"],
        3,
        1,
    )
    assert undone.at == undo
    assert (
        undone.describe()
        == "revision 2 (img:v2) was rolled back from at 12:03:00 UTC by revision 3"
    )


def test_an_undo_is_told_by_creation_order_when_the_history_annotation_is_missing() -> None:
    revisions = history_after(
        replica_set("v1", "img:v1", 3, T0),
        replica_set("v2", "img:v2", 2, T0 + timedelta(minutes=1)),
        image="img:v1",
    )
    undone = undone_previous(revisions)
    assert undone is not None and undone.revision == 2 and undone.template_of is None


def test_rolling_forward_after_an_undo_undoes_nothing() -> None:
    # v1, v2, undo to v1 (revision 3), then v3: going back to v1 is a plain rollback again.
    revisions = history_after(
        replica_set("v1", "img:v1", 3, T0, history="1"),
        replica_set("v2", "img:v2", 2, T0 + timedelta(minutes=1)),
        replica_set("v3", "img:v3", 4, T0 + timedelta(minutes=5)),
        image="img:v3",
    )
    assert undone_previous(revisions) is None


def test_undoing_an_undo_is_an_undo_too() -> None:
    # v1, v2, v3; undo to v2 (4); undo again: kubectl goes to v3 (5, it held 3 before).
    revisions = history_after(
        replica_set("v1", "img:v1", 1, T0),
        replica_set("v2", "img:v2", 4, T0 + timedelta(minutes=1), history="2"),
        replica_set("v3", "img:v3", 5, T0 + timedelta(minutes=2), history="3"),
        image="img:v3",
    )
    undone = undone_previous(revisions)
    assert undone is not None and (undone.revision, undone.template_of) == (4, 3)


def test_began_after_rollout_is_the_one_dating_rule() -> None:
    from datetime import UTC, datetime, timedelta

    from tasks.kubernetes import began_after_rollout, began_before_rollout

    rolled = datetime(2026, 12, 6, 22, 0, tzinfo=UTC)
    window = timedelta(minutes=30)
    assert began_after_rollout(rolled + timedelta(minutes=5), rolled, window)
    assert began_after_rollout(rolled - timedelta(seconds=10), rolled, window)  # skew
    assert not began_after_rollout(rolled - timedelta(seconds=20), rolled, window)
    assert not began_after_rollout(rolled + timedelta(minutes=31), rolled, window)
    assert not began_after_rollout(None, rolled, window)
    assert not began_after_rollout(rolled, None, window)
    assert began_before_rollout(rolled - timedelta(seconds=20), rolled)
    assert not began_before_rollout(rolled - timedelta(seconds=10), rolled)
