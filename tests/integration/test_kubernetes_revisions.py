"""When a revision became current, on the real API server and controller (1.20): a rollout,
our own undo (`plan_rollback` + `apply_rollback`) and the real `kubectl rollout undo`."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes import client as k8s

from tasks.kubernetes import REVISION, plan_rollback, rollout_history, undo_rollout
from tests.fixtures.kube import KubeCluster
from tests.integration.kube_helpers import (
    IMAGE,
    create_with_revisions,
    revision_of,
    rolled_out,
    set_image,
)
from tests.integration.kube_helpers import wait_until as wait
from tests.integration.test_kubernetes_kubectl import Kubectl

pytestmark = pytest.mark.kube

NAME = "akig-backend"
#: managedFields and creation times have 1 s resolution (truncated).
RESOLUTION = timedelta(seconds=1)


def revision_entries(apps: Any, ns: str) -> list[tuple[str | None, str | None]]:
    """(manager, operation) of every managedFields entry owning a ReplicaSet's revision."""
    out = []
    for rs in apps.list_namespaced_replica_set(ns).items:
        for entry in rs.metadata.managed_fields or []:
            annotations = ((entry.fields_v1 or {}).get("f:metadata") or {}).get("f:annotations")
            if f"f:{REVISION}" in (annotations or {}):
                out.append((entry.manager, entry.operation))
    return out


@pytest.mark.parametrize("undo_by", ["apply_rollback", "kubectl rollout undo"])
def test_a_revision_is_dated_from_when_it_became_current(
    kube_cluster: KubeCluster, kube_namespace: str, kubectl: Any, undo_by: str
) -> None:
    ns = kube_namespace
    apps: Any = k8s.AppsV1Api(kube_cluster.api())
    settings = kube_cluster.settings(ns)
    create_with_revisions(apps, settings, ns, NAME, revisions=2, replicas=1)

    # A rollout: the new ReplicaSet became current when it was created.
    history = rollout_history.fn(NAME, ns, settings=settings)
    v1, v2 = history.revisions
    assert (v2.revision, v2.current, v2.dated_by) == (2, True, "created")
    assert v2.became_current == v2.created and v1.became_current == v1.created
    assert history.undone is None
    assert plan_rollback.fn(NAME, ns, settings=settings).target_undone is None
    # Every revision annotation is written by the controller, whoever changed the template.
    assert set(revision_entries(apps, ns)) == {("kube-controller-manager", "Update")}

    time.sleep(2.5)  # past the 1 s resolution, so the undo's time differs from v1's creation
    before = datetime.now(UTC)
    if undo_by == "apply_rollback":
        undo_rollout.fn(NAME, ns, settings=settings)
    else:
        out = Kubectl(kubectl, kube_cluster.kubeconfig, ns)("rollout", "undo", f"deployment/{NAME}")
        assert out.returncode == 0, out.stderr
    wait(lambda: revision_of(apps, ns, NAME) == 3, what="revision 3")
    rolled_out(settings, ns, NAME)
    after = datetime.now(UTC)

    # The undo re-used v1's ReplicaSet: its creation is v1's, but it is current since the undo.
    history = rollout_history.fn(NAME, ns, settings=settings)
    v2, v1 = history.revisions
    assert (v1.revision, v1.current, v1.images, v1.earlier_revisions) == (
        3,
        True,
        [f"{IMAGE}:1"],
        [1],
    )
    assert v1.dated_by == "revision annotation"
    assert v1.created is not None and v1.became_current is not None
    assert v1.created < before - RESOLUTION
    assert before - RESOLUTION <= v1.became_current <= after
    # Revision 2 is the one it rolled back from: kubectl's undo would go back to it.
    assert history.undone is not None
    assert (history.undone.revision, history.undone.by_revision) == (2, 3)
    assert history.undone.template_of == 1 and history.undone.at == v1.became_current
    plan = plan_rollback.fn(NAME, ns, settings=settings)
    assert plan.to_revision == 2 and plan.target_undone == history.undone
    assert set(revision_entries(apps, ns)) == {("kube-controller-manager", "Update")}


def test_rolling_forward_after_an_undo_dates_the_new_replica_set(
    kube_cluster: KubeCluster, kube_namespace: str
) -> None:
    ns = kube_namespace
    apps: Any = k8s.AppsV1Api(kube_cluster.api())
    settings = kube_cluster.settings(ns)
    create_with_revisions(apps, settings, ns, NAME, revisions=2, replicas=1)
    undo_rollout.fn(NAME, ns, settings=settings)
    wait(lambda: revision_of(apps, ns, NAME) == 3, what="revision 3")
    image = f"{IMAGE}:fix-{uuid.uuid4().hex[:4]}"
    set_image(apps, ns, NAME, image)
    wait(lambda: revision_of(apps, ns, NAME) == 4, what="revision 4")
    history = rollout_history.fn(NAME, ns, settings=settings)
    current = history.revisions[-1]
    assert (current.revision, current.images, current.dated_by) == (4, [image], "created")
    # Going back from the fix to v1 (revision 3) undoes nothing that was just undone.
    assert history.undone is None
    assert plan_rollback.fn(NAME, ns, settings=settings).target_undone is None
