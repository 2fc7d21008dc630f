"""security-breach containment on the test Kubernetes API: the deny-all NetworkPolicy (the
API server stores it; nothing enforces it here, so the object and what it selects are
checked), its undo, the cordon, and the Secret rotation with its backup and the restart of
exactly the workloads that use the Secret."""

from __future__ import annotations

import base64
import logging
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from flows.security.steps import IsolateAction
from tasks.errors import PermanentError, SafetyViolation
from tasks.kubernetes.netpol import (
    CORDONED_FOR,
    apply_isolation,
    plan_isolation,
    policy_body,
    undo_isolation,
)
from tasks.kubernetes.secret_rotation import (
    BACKUP_OF,
    ROTATED_AT,
    ROTATED_FOR,
    apply_rotation,
    plan_rotation,
)
from tasks.kubernetes.semantics import RESTARTED_AT, labels_match
from tasks.security.incident import incident_slug
from tests.fixtures.kube import KubeCluster
from tests.integration.kube_helpers import (
    deployment_body,
    settled_pods,
    statefulset_body,
    wait_until,
)

pytestmark = pytest.mark.kube

INCIDENT = "SEC-2026/12-07 breach"


def _b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def _selector_string(pod_selector: Any) -> str:
    parts = [f"{k}={v}" for k, v in (pod_selector.match_labels or {}).items()]
    return ",".join(parts)


# ---------------------------------------------------------------------------- isolation


def test_isolation_selects_exactly_the_affected_pods_and_undo_removes_only_ours(
    kube_cluster: KubeCluster, kube_namespace: str
) -> None:
    ns, settings = kube_namespace, kube_cluster.settings(kube_namespace)
    admin = kube_cluster.api()
    apps: Any = k8s.AppsV1Api(admin)
    core: Any = k8s.CoreV1Api(admin)
    net: Any = k8s.NetworkingV1Api(admin)
    apps.create_namespaced_deployment(ns, deployment_body("akig-backend", replicas=2))
    apps.create_namespaced_deployment(ns, deployment_body("akig-frontend", replicas=1))
    backend = settled_pods(settings, ns, "component=akig-backend", 2)
    settled_pods(settings, ns, "app=akig", 3)
    slug = incident_slug(INCIDENT)

    plan = plan_isolation.fn(INCIDENT, "component=akig-backend", ns, kube=settings)
    assert plan.pods == sorted(p.name for p in backend)
    assert plan.policy_name == f"runbooks-isolate-{slug}"
    assert not plan.selects_all_pods and not plan.policy_exists and plan.nodes == []

    # Someone else's policy, and ours for another incident: both must survive the undo.
    net.create_namespaced_network_policy(
        ns,
        {
            "metadata": {"name": "team-policy"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
        },
    )
    other = plan_isolation.fn("SEC-other", "component=akig-frontend", ns, kube=settings)
    apply_isolation.fn(other, kube=settings)

    done = apply_isolation.fn(plan, kube=settings)
    assert done.created and done.pods == plan.pods
    policy = net.read_namespaced_network_policy(plan.policy_name, ns)
    assert policy.metadata.labels == {
        "app.kubernetes.io/managed-by": "incident-runbooks",
        "runbooks/incident": slug,
    }
    assert policy.spec.policy_types == ["Ingress", "Egress"]
    assert policy.spec.ingress is None and policy.spec.egress is None  # deny all, both ways
    # What the stored policy selects is exactly the affected pods, not the frontend's.
    selected = [
        p.metadata.name
        for p in core.list_namespaced_pod(ns).items
        if labels_match(_selector_string(policy.spec.pod_selector), p.metadata.labels)
    ]
    assert sorted(selected) == plan.pods
    assert _selector_string(policy.spec.pod_selector) == "component=akig-backend"

    # Idempotent: a second apply (a retry, a re-run) finds it and writes nothing.
    version = policy.metadata.resource_version
    again = apply_isolation.fn(plan, kube=settings)
    assert not again.created
    assert net.read_namespaced_network_policy(plan.policy_name, ns).metadata.resource_version == (
        version
    )
    assert plan_isolation.fn(INCIDENT, "component=akig-backend", ns, kube=settings).policy_exists
    # The pods are evidence: isolation neither restarts nor deletes them.
    assert sorted(p.metadata.name for p in core.list_namespaced_pod(ns).items) == sorted(
        plan.pods + other.pods
    )

    assert undo_isolation.fn(INCIDENT, ns, kube=settings) == [f"networkpolicy/{plan.policy_name}"]
    left = sorted(p.metadata.name for p in net.list_namespaced_network_policy(ns).items)
    assert left == sorted(["team-policy", other.policy_name])
    assert undo_isolation.fn(INCIDENT, ns, kube=settings) == []  # nothing left of ours


def test_isolation_refuses_bad_input_and_changes_nothing(
    kube_cluster: KubeCluster, kube_namespace: str
) -> None:
    ns, settings = kube_namespace, kube_cluster.settings(kube_namespace)
    admin = kube_cluster.api()
    apps: Any = k8s.AppsV1Api(admin)
    net: Any = k8s.NetworkingV1Api(admin)
    apps.create_namespaced_deployment(ns, deployment_body("akig-backend", replicas=1))
    settled_pods(settings, ns, "app=akig", 1)

    with pytest.raises(PermanentError, match="empty label selector"):
        plan_isolation.fn(INCIDENT, "  ", ns, kube=settings)
    with pytest.raises(PermanentError, match="cannot parse"):
        plan_isolation.fn(INCIDENT, "app in (", ns, kube=settings)
    with pytest.raises(SafetyViolation, match="matches no pod"):
        plan_isolation.fn(INCIDENT, "component=akig-typo", ns, kube=settings)
    with pytest.raises(SafetyViolation, match="not the platform namespace"):
        plan_isolation.fn(INCIDENT, "app=akig", "kube-system", kube=settings)
    with pytest.raises(PermanentError, match="incident id is required"):
        plan_isolation.fn(" ", "app=akig", ns, kube=settings)
    # Every pod selected: allowed (one-app namespace) but flagged for the approver.
    plan = plan_isolation.fn(INCIDENT, "app=akig", ns, kube=settings)
    assert plan.selects_all_pods

    # A policy of our name that is not ours: refused, left as it is.
    foreign = policy_body(plan)
    foreign["metadata"]["labels"] = {"team": "net"}
    net.create_namespaced_network_policy(ns, foreign)
    with pytest.raises(SafetyViolation, match="not ours"):
        plan_isolation.fn(INCIDENT, "app=akig", ns, kube=settings)
    with pytest.raises(SafetyViolation, match="not ours"):
        apply_isolation.fn(plan, kube=settings)
    assert undo_isolation.fn(INCIDENT, ns, kube=settings) == []
    assert net.read_namespaced_network_policy(plan.policy_name, ns).metadata.labels == {
        "team": "net"
    }


def _one_pod_bound(kube_cluster: KubeCluster, ns: str) -> str:
    """A one-pod akig-backend, settled; the node its pod is bound to."""
    admin = kube_cluster.api()
    apps: Any = k8s.AppsV1Api(admin)
    core: Any = k8s.CoreV1Api(admin)
    apps.create_namespaced_deployment(ns, deployment_body("akig-backend", replicas=1))
    (pod,) = settled_pods(kube_cluster.settings(ns), ns, "app=akig", 1)
    return str(
        wait_until(
            lambda: core.read_namespaced_pod(pod.name, ns).spec.node_name, what="the pod bound"
        )
    )


def test_cordon_marks_the_node_ours_and_undo_uncordons_only_it(
    kube_cluster: KubeCluster, kube_namespace: str
) -> None:
    ns, settings = kube_namespace, kube_cluster.settings(kube_namespace)
    admin = kube_cluster.api()
    core: Any = k8s.CoreV1Api(admin)
    node = _one_pod_bound(kube_cluster, ns)

    plan = plan_isolation.fn(INCIDENT, "app=akig", ns, cordon=True, kube=settings)
    assert plan.nodes == [node]
    try:
        done = apply_isolation.fn(plan, kube=settings)
        assert done.cordoned == [node]
        cordoned = core.read_node(node)
        assert cordoned.spec.unschedulable
        assert cordoned.metadata.annotations[CORDONED_FOR] == incident_slug(INCIDENT)
        assert apply_isolation.fn(plan, kube=settings).cordoned == []  # idempotent
        # Another incident sees the node cordoned by someone else: never its to uncordon.
        other = plan_isolation.fn("SEC-other", "app=akig", ns, cordon=True, kube=settings)
        assert other.nodes == [] and other.nodes_already_unschedulable == [node]
        assert undo_isolation.fn("SEC-other", ns, kube=settings) == []
        assert core.read_node(node).spec.unschedulable
    finally:
        undone = undo_isolation.fn(INCIDENT, ns, kube=settings)
    assert f"node/{node}" in undone
    after = core.read_node(node)
    assert not after.spec.unschedulable
    assert CORDONED_FOR not in (after.metadata.annotations or {})


def test_the_undo_an_approver_reads_is_kubectl_that_removes_exactly_ours(
    kube_cluster: KubeCluster, kube_namespace: str, kubectl: Path
) -> None:
    ns, settings = kube_namespace, kube_cluster.settings(kube_namespace)
    admin = kube_cluster.api()
    core: Any = k8s.CoreV1Api(admin)
    net: Any = k8s.NetworkingV1Api(admin)
    node = _one_pod_bound(kube_cluster, ns)
    net.create_namespaced_network_policy(
        ns, {"metadata": {"name": "team-policy"}, "spec": {"podSelector": {}}}
    )
    other = plan_isolation.fn("SEC-other", "app=akig", ns, kube=settings)
    apply_isolation.fn(other, kube=settings)
    plan = plan_isolation.fn(INCIDENT, "app=akig", ns, cordon=True, kube=settings)
    undo = IsolateAction(target="t", summary="s", isolation=plan).undo()
    commands = re.findall(r"`(kubectl [^`]+)`", undo)
    assert len(commands) == 3, undo  # the policies, uncordon, the annotation
    try:
        apply_isolation.fn(plan, kube=settings)
        assert core.read_node(node).spec.unschedulable
        for command in commands:
            argv = [str(kubectl), f"--kubeconfig={kube_cluster.kubeconfig}", *command.split()[1:]]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, (command, done.stderr)
    finally:
        undo_isolation.fn(INCIDENT, ns, kube=settings)  # never leave the shared node cordoned
    left = sorted(p.metadata.name for p in net.list_namespaced_network_policy(ns).items)
    assert left == sorted(["team-policy", other.policy_name])
    after = core.read_node(node)
    assert not after.spec.unschedulable
    assert CORDONED_FOR not in (after.metadata.annotations or {})


# ----------------------------------------------------------------------------- rotation


def _secret(name: str, data: dict[str, str], type_: str = "Opaque") -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "type": type_,
        "data": {k: _b64(v) for k, v in data.items()},
    }


def _with_spec(body: dict[str, Any], **pod_spec: Any) -> dict[str, Any]:
    body["spec"]["template"]["spec"].update(pod_spec)
    return body


def _workloads(apps: Any, ns: str) -> None:
    """Users of akig-db-credentials in every way, and workloads that must not be touched."""
    volume = deployment_body("uses-volume", replicas=1)
    _with_spec(
        volume,
        volumes=[{"name": "creds", "secret": {"secretName": "akig-db-credentials"}}],
    )
    keyref = deployment_body("uses-keyref", replicas=1)
    keyref["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {
            "name": "DB_PASSWORD",
            "valueFrom": {"secretKeyRef": {"name": "akig-db-credentials", "key": "password"}},
        }
    )
    envfrom = statefulset_body("uses-envfrom", replicas=1)
    _with_spec(
        envfrom,
        initContainers=[
            {
                "name": "migrate",
                "image": "registry.local/migrate:1",
                "envFrom": [{"secretRef": {"name": "akig-db-credentials"}}],
            }
        ],
    )
    bystander = deployment_body("uses-other-secret", replicas=1)
    _with_spec(
        bystander,
        volumes=[{"name": "keys", "secret": {"secretName": "akig-api-keys"}}],
    )
    plain = deployment_body("uses-nothing", replicas=1)
    for body in (volume, keyref, bystander, plain):
        apps.create_namespaced_deployment(ns, body)
    apps.create_namespaced_stateful_set(ns, envfrom)


def _restarted_at(apps: Any, ns: str, kind: str, name: str) -> str | None:
    read = (
        apps.read_namespaced_deployment
        if kind == "deployment"
        else (apps.read_namespaced_stateful_set)
    )
    annotations = read(name, ns).spec.template.metadata.annotations or {}
    return annotations.get(RESTARTED_AT)


def test_rotation_backs_up_rotates_and_restarts_exactly_its_users(
    kube_cluster: KubeCluster, kube_namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ns, settings = kube_namespace, kube_cluster.settings(kube_namespace)
    admin = kube_cluster.api()
    apps: Any = k8s.AppsV1Api(admin)
    core: Any = k8s.CoreV1Api(admin)
    old = {"username": "dbuser-Hk29", "password": "old-pw-Zq81xP"}
    core.create_namespaced_secret(ns, _secret("akig-db-credentials", old))
    core.create_namespaced_secret(ns, _secret("akig-api-keys", {"stripe": "old-sk-77aa"}))
    _workloads(apps, ns)
    slug = incident_slug(INCIDENT)

    plan = plan_rotation.fn(INCIDENT, ["akig-db-credentials"], ns, kube=settings)
    (item,) = plan.secrets
    assert item.key_names == ["password", "username"] and not item.already_rotated
    assert item.backup_name == f"akig-db-credentials-backup-{slug}"
    assert {(u.kind, u.name) for u in item.users} == {
        ("deployment", "uses-volume"),
        ("deployment", "uses-keyref"),
        ("statefulset", "uses-envfrom"),
    }
    how = {u.name: u.how for u in item.users}
    assert how["uses-volume"] == ["volume creds"]
    assert how["uses-keyref"] == ["env secretKeyRef container app DB_PASSWORD"]
    assert how["uses-envfrom"] == ["envFrom secretRef init container migrate"]
    assert [(r.kind, r.name) for r in plan.restarts] == [
        ("deployment", "uses-keyref"),
        ("deployment", "uses-volume"),
        ("statefulset", "uses-envfrom"),
    ]
    untouched = {
        n: apps.read_namespaced_deployment(n, ns).metadata.generation
        for n in ("uses-other-secret", "uses-nothing")
    }
    other_version = core.read_namespaced_secret("akig-api-keys", ns).metadata.resource_version

    # A server dry run writes nothing.
    dry = apply_rotation.fn(plan, kube=settings, dry_run=True)
    assert [s.outcome for s in dry.secrets] == ["dry run"]
    assert core.read_namespaced_secret("akig-db-credentials", ns).metadata.resource_version == (
        item.resource_version
    )
    assert core.list_namespaced_secret(ns, label_selector=BACKUP_OF).items == []

    result = apply_rotation.fn(plan, kube=settings)
    assert result.rotated == ["akig-db-credentials"]
    rotated = core.read_namespaced_secret("akig-db-credentials", ns)
    new = {k: base64.b64decode(v).decode() for k, v in rotated.data.items()}
    assert sorted(new) == ["password", "username"]
    assert all(new[k] != old[k] and len(new[k]) == 43 for k in new)  # token_urlsafe(32)
    assert rotated.metadata.annotations[ROTATED_FOR] == slug
    assert ROTATED_AT in rotated.metadata.annotations
    backup = core.read_namespaced_secret(item.backup_name, ns)
    assert {k: base64.b64decode(v).decode() for k, v in backup.data.items()} == old
    assert backup.metadata.labels[BACKUP_OF] == "akig-db-credentials"
    assert backup.type == "Opaque"
    for r in plan.restarts:
        assert _restarted_at(apps, ns, r.kind, r.name) == r.restarted_at
    assert all(d.patched for d in result.restarts)
    for name, generation in untouched.items():
        dep = apps.read_namespaced_deployment(name, ns)
        assert dep.metadata.generation == generation
        assert RESTARTED_AT not in (dep.spec.template.metadata.annotations or {})
    assert core.read_namespaced_secret("akig-api-keys", ns).metadata.resource_version == (
        other_version
    )

    # The same plan again (a retry after a lost answer): nothing rotated twice.
    retry = apply_rotation.fn(plan, kube=settings)
    assert [s.outcome for s in retry.secrets] == ["already rotated"]
    assert not any(d.patched for d in retry.restarts)
    # A second run for the same incident plans nothing to rotate and nothing to restart.
    second = plan_rotation.fn(INCIDENT, ["akig-db-credentials"], ns, kube=settings)
    assert second.secrets[0].already_rotated and second.restarts == []
    version = core.read_namespaced_secret("akig-db-credentials", ns).metadata.resource_version
    assert apply_rotation.fn(second, kube=settings).rotated == []
    assert core.read_namespaced_secret("akig-db-credentials", ns).metadata.resource_version == (
        version
    )

    # No value, old or new, in any result or log line.
    text = "\n".join(
        [plan.model_dump_json(), dry.model_dump_json(), result.model_dump_json()]
        + [r.getMessage() for r in caplog.records]
    )
    for value in [*old.values(), *new.values(), *rotated.data.values(), _b64(old["password"])]:
        assert value not in text


def test_rotation_users_of_a_run_that_died_before_its_restarts_are_still_restarted(
    kube_cluster: KubeCluster, kube_namespace: str
) -> None:
    ns, settings = kube_namespace, kube_cluster.settings(kube_namespace)
    admin = kube_cluster.api()
    apps: Any = k8s.AppsV1Api(admin)
    core: Any = k8s.CoreV1Api(admin)
    core.create_namespaced_secret(ns, _secret("akig-db-credentials", {"password": "p-1"}))
    _workloads(apps, ns)
    plan = plan_rotation.fn(INCIDENT, ["akig-db-credentials"], ns, kube=settings)
    # Rotate without the restarts (the run died between the two).
    apply_rotation.fn(plan.model_copy(update={"restarts": []}), kube=settings)
    again = plan_rotation.fn(INCIDENT, ["akig-db-credentials"], ns, kube=settings)
    assert again.secrets[0].already_rotated
    assert {r.name for r in again.restarts} == {"uses-volume", "uses-keyref", "uses-envfrom"}
    done = apply_rotation.fn(again, kube=settings)
    assert done.rotated == [] and all(d.patched for d in done.restarts)


def test_rotation_refuses_what_it_must_not_touch(
    kube_cluster: KubeCluster, kube_namespace: str
) -> None:
    ns, settings = kube_namespace, kube_cluster.settings(kube_namespace)
    core: Any = k8s.CoreV1Api(kube_cluster.api())
    core.create_namespaced_secret(ns, _secret("akig-db-credentials", {"password": "p-2"}))
    core.create_namespaced_secret(
        ns, _secret("akig-tls", {"tls.crt": "x", "tls.key": "y"}, "kubernetes.io/tls")
    )
    backup = _secret("akig-db-credentials-backup-old", {"password": "p-0"})
    backup["metadata"]["labels"] = {BACKUP_OF: "akig-db-credentials"}
    core.create_namespaced_secret(ns, backup)

    with pytest.raises(PermanentError, match="no Secret named"):
        plan_rotation.fn(INCIDENT, [], ns, kube=settings)
    with pytest.raises(PermanentError, match="not a Kubernetes object name"):
        plan_rotation.fn(INCIDENT, ["Bad_Name"], ns, kube=settings)
    with pytest.raises(PermanentError, match="named twice"):
        plan_rotation.fn(INCIDENT, ["akig-db-credentials"] * 2, ns, kube=settings)
    with pytest.raises(PermanentError, match="not found"):
        plan_rotation.fn(INCIDENT, ["akig-missing"], ns, kube=settings)
    with pytest.raises(SafetyViolation, match=r"kubernetes\.io/tls"):
        plan_rotation.fn(INCIDENT, ["akig-tls"], ns, kube=settings)
    with pytest.raises(SafetyViolation, match="is a backup"):
        plan_rotation.fn(INCIDENT, ["akig-db-credentials-backup-old"], ns, kube=settings)
    with pytest.raises(SafetyViolation, match="not the platform namespace"):
        plan_rotation.fn(INCIDENT, ["akig-db-credentials"], "default", kube=settings)

    # Changed since the plan: refused before the backup, nothing written.
    plan = plan_rotation.fn(INCIDENT, ["akig-db-credentials"], ns, kube=settings)
    core.patch_namespaced_secret(
        "akig-db-credentials", ns, {"data": {"password": _b64("changed-by-a-human")}}
    )
    with pytest.raises(SafetyViolation, match="changed since the plan") as err:
        apply_rotation.fn(plan, kube=settings)
    assert "changed-by-a-human" not in str(err.value)
    secret = core.read_namespaced_secret("akig-db-credentials", ns)
    assert base64.b64decode(secret.data["password"]).decode() == "changed-by-a-human"
    assert ROTATED_FOR not in (secret.metadata.annotations or {})
    names = [s.metadata.name for s in core.list_namespaced_secret(ns).items]
    assert plan.secrets[0].backup_name not in names


def test_rotation_after_a_lost_backup_answer_goes_on_and_a_foreign_backup_stops_it(
    kube_cluster: KubeCluster, kube_namespace: str
) -> None:
    ns, settings = kube_namespace, kube_cluster.settings(kube_namespace)
    core: Any = k8s.CoreV1Api(kube_cluster.api())
    for name in ("akig-db-credentials", "akig-api-keys"):
        core.create_namespaced_secret(ns, _secret(name, {"password": f"pw-{name}"}))
    plan = plan_rotation.fn(INCIDENT, ["akig-db-credentials", "akig-api-keys"], ns, kube=settings)
    first, second = plan.secrets
    # The backup of the first landed, its answer was lost: the same backup, ours, identical.
    landed = core.read_namespaced_secret(first.name, ns)
    core.create_namespaced_secret(
        ns,
        {
            "metadata": {"name": first.backup_name, "labels": {BACKUP_OF: first.name}},
            "type": "Opaque",
            "data": landed.data,
        },
    )
    # The second's backup name is taken by something else: that Secret must not be rotated.
    core.create_namespaced_secret(ns, _secret(second.backup_name, {"password": "stale"}))
    with pytest.raises(SafetyViolation, match="does not hold the current values"):
        apply_rotation.fn(plan, kube=settings)
    rotated = core.read_namespaced_secret(first.name, ns)
    assert rotated.metadata.annotations[ROTATED_FOR] == incident_slug(INCIDENT)
    assert rotated.data != landed.data
    untouched = core.read_namespaced_secret(second.name, ns)
    assert untouched.metadata.resource_version == second.resource_version


def test_second_run_restarts_nothing_when_the_plan_was_made_long_before_the_apply(
    kube_cluster: KubeCluster, kube_namespace: str
) -> None:
    # An approval takes minutes: the users' restartedAt (chosen at plan time) is older than
    # the rotation itself, and still counts as "restarted after the rotation".
    ns, settings = kube_namespace, kube_cluster.settings(kube_namespace)
    admin = kube_cluster.api()
    core: Any = k8s.CoreV1Api(admin)
    core.create_namespaced_secret(ns, _secret("akig-db-credentials", {"password": "p-3"}))
    _workloads(k8s.AppsV1Api(admin), ns)
    early = "2026-01-01T00:00:00Z"
    plan = plan_rotation.fn(INCIDENT, ["akig-db-credentials"], ns, kube=settings)
    plan = plan.model_copy(
        update={
            "restarted_at": early,
            "restarts": [r.model_copy(update={"restarted_at": early}) for r in plan.restarts],
        }
    )
    done = apply_rotation.fn(plan, kube=settings)
    assert done.rotated == ["akig-db-credentials"] and len(done.restarts) == 3
    second = plan_rotation.fn(INCIDENT, ["akig-db-credentials"], ns, kube=settings)
    assert second.secrets[0].already_rotated and second.restarts == []


@pytest.mark.usefixtures("prefect_api")
def test_as_prefect_tasks_in_a_flow_run_no_value_reaches_the_api(
    kube_cluster: KubeCluster, kube_namespace: str
) -> None:
    from prefect import flow

    from tests.fixtures.prefect_runs import flow_run_logs, task_run_states

    ns, settings = kube_namespace, kube_cluster.settings(kube_namespace)
    admin = kube_cluster.api()
    core: Any = k8s.CoreV1Api(admin)
    old = {"password": "old-flow-pw-Qe41", "api_key": "old-flow-key-8Hn"}
    core.create_namespaced_secret(ns, _secret("akig-db-credentials", old))
    _workloads(k8s.AppsV1Api(admin), ns)
    settled_pods(settings, ns, "component=uses-volume", 1)

    @flow(name="contain-test")
    def contain() -> tuple[Any, Any, list[str]]:
        isolation = apply_isolation(
            plan_isolation(INCIDENT, "component=uses-volume", ns, kube=settings), kube=settings
        )
        rotation = apply_rotation(
            plan_rotation(INCIDENT, ["akig-db-credentials"], ns, kube=settings), kube=settings
        )
        return isolation, rotation, undo_isolation(INCIDENT, ns, kube=settings)

    state = contain(return_state=True)
    isolation, rotation, undone = state.result()
    assert isolation.created and rotation.rotated == ["akig-db-credentials"]
    assert undone == [f"networkpolicy/{isolation.policy_name}"]
    new = core.read_namespaced_secret("akig-db-credentials", ns).data
    text = "\n".join(
        flow_run_logs(state.state_details.flow_run_id)
        + task_run_states(state.state_details.flow_run_id)
    )
    assert "rotated (2 key(s)" in text  # the scan looks at the real log
    values = [*old.values(), *(_b64(v) for v in old.values()), *new.values()]
    values += [base64.b64decode(v).decode() for v in new.values()]
    assert not [v for v in values if v in text]
