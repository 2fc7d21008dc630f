"""The pure parts of tasks.kubernetes: kubectl's rollback algorithm, status, selectors, errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import urllib3
from hypothesis import given, settings
from hypothesis import strategies as st
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from tasks.errors import PermanentError, TransientError
from tasks.kubernetes import (
    ANNOTATIONS_TO_SKIP,
    MEMORY_LIMIT_MAX_FACTOR,
    POD_TEMPLATE_HASH,
    REVISION,
    classify_api_error,
    equal_ignore_hash,
    label_selector_string,
    labels_match,
    memory_bytes,
    order_like_kubectl,
    parse_revision,
    rfc3339_now,
    rollback_annotations,
    rollback_patch,
    rollout_status_message,
    select_rollback_revision,
    semantic_equal,
    statefulset_status_message,
)
from tasks.kubernetes.models import MemoryLimitChange

API = k8s.ApiClient()


def model(data: dict[str, Any], klass: str) -> Any:
    return API.deserialize(json.dumps(data), klass, "application/json")


def template(
    image: str = "nginx:1", labels: dict[str, str] | None = None, **spec_extra: Any
) -> Any:
    spec = {"containers": [{"name": "app", "image": image}], **spec_extra}
    meta: dict[str, Any] = {}
    if labels is not None:
        meta["labels"] = labels
    return model({"metadata": meta, "spec": spec}, "V1PodTemplateSpec")


# --- revision selection ----------------------------------------------------------------------

label_key = st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)
label_value = st.from_regex(r"[a-z0-9]{0,8}", fullmatch=True)


@given(st.lists(st.integers(0, 50), unique=True, min_size=2, max_size=12), st.randoms())
def test_undo_to_zero_picks_second_highest(revisions, rnd):
    rnd.shuffle(revisions)
    items = [(str(r), f"rs-{r}") for r in revisions]
    rev, item = select_rollback_revision(items, 0, "d")
    assert rev == sorted(revisions)[-2]
    assert item == f"rs-{rev}"


@given(st.lists(st.integers(1, 50), unique=True, min_size=1, max_size=12), st.integers(1, 60))
def test_undo_to_exact_revision_or_kubectl_error(revisions, wanted):
    items = [(str(r), f"rs-{r}") for r in revisions]
    if wanted in revisions:
        assert select_rollback_revision(items, wanted, "d") == (wanted, f"rs-{wanted}")
    else:
        with pytest.raises(
            PermanentError, match=f"^unable to find specified revision {wanted} in history$"
        ):
            select_rollback_revision(items, wanted, "d")


def test_no_history_and_negative_revision():
    with pytest.raises(PermanentError, match=r'^no rollout history found for deployment "web"$'):
        select_rollback_revision([("1", "a")], 0, "web")
    with pytest.raises(PermanentError, match='no rollout history found for deployment "web"'):
        select_rollback_revision([], 0, "web")
    with pytest.raises(PermanentError, match="unable to find specified revision -1 in history"):
        select_rollback_revision([("1", "a"), ("2", "b")], -1, "web")


def test_unparsable_revisions_are_ignored_and_missing_is_zero():
    items = [("x", "bad"), (None, "zero"), ("3", "three"), (" 2", "spaced"), ("1_0", "underscore")]
    assert select_rollback_revision(items, 0, "d") == (0, "zero")
    assert parse_revision("+7") == 7
    assert parse_revision("9223372036854775808") is None
    assert parse_revision("") is None


def test_equal_revisions_follow_kubectl_order():
    # Two ReplicaSets with the same revision: the later one becomes "previous".
    assert select_rollback_revision([("2", "a"), ("2", "b")], 0, "d") == (2, "b")
    assert select_rollback_revision([("2", "a"), ("2", "b")], 2, "d") == (2, "a")


# --- template equality -----------------------------------------------------------------------


@settings(deadline=None, max_examples=40)
@given(st.dictionaries(label_key, label_value, max_size=4), label_value, label_value)
def test_hash_label_is_ignored(labels, h1, h2):
    a = template(labels={**labels, POD_TEMPLATE_HASH: h1})
    b = template(labels={**labels, POD_TEMPLATE_HASH: h2})
    assert equal_ignore_hash(a, b)
    assert equal_ignore_hash(a, template(labels=labels))
    # The inputs are not modified.
    assert a.metadata.labels[POD_TEMPLATE_HASH] == h1


def test_null_equals_empty_for_maps_and_lists_but_not_structs():
    assert equal_ignore_hash(template(labels={}), template(labels=None))
    assert equal_ignore_hash(template(labels={POD_TEMPLATE_HASH: "x"}), template())
    assert equal_ignore_hash(template(volumes=[]), template())
    with_empty_dir = template(volumes=[{"name": "v", "emptyDir": {}}])
    without = template(volumes=[{"name": "v"}])
    assert not equal_ignore_hash(with_empty_dir, without)
    assert not equal_ignore_hash(template(image="a"), template(image="b"))
    assert not equal_ignore_hash(template(labels={"a": "1"}), template(labels={"a": "2"}))


def test_semantic_equal_basics():
    assert semantic_equal({"a": []}, {"a": None})
    assert not semantic_equal({"a": 1}, {"b": 1})
    assert not semantic_equal(1, True)
    t = datetime(2024, 1, 1, tzinfo=UTC)
    assert semantic_equal(t, t.astimezone(timezone(timedelta(hours=2))))


def test_new_replica_set_goes_last():
    def rs(name: str, image: str, minute: int) -> Any:
        return model(
            {
                "metadata": {
                    "name": name,
                    "creationTimestamp": f"2024-01-01T00:{minute:02d}:00Z",
                },
                "spec": {
                    "selector": {"matchLabels": {"a": "b"}},
                    "template": {"spec": {"containers": [{"name": "app", "image": image}]}},
                },
            },
            "V1ReplicaSet",
        )

    a, b, c = rs("a", "v2", 1), rs("b", "v1", 0), rs("c", "v2", 2)
    ordered = order_like_kubectl([a, b, c], template(image="v2"))
    assert [r.metadata.name for r in ordered] == ["b", "c", "a"]  # type: ignore[union-attr]
    # (the oldest match "a" is the new one; no match: listing order unchanged)
    unmatched = order_like_kubectl([a, b], template(image="v9"))
    assert [r.metadata.name for r in unmatched] == ["a", "b"]  # type: ignore[union-attr]


# --- annotations and patch -------------------------------------------------------------------

annotation_maps = st.dictionaries(
    st.sampled_from([*sorted(ANNOTATIONS_TO_SKIP), "kubernetes.io/change-cause", "team", "x/y"]),
    label_value,
    max_size=8,
)


@given(annotation_maps, annotation_maps)
def test_rollback_annotations_merge(dep, rs):
    merged = rollback_annotations(dep, rs)
    for key, value in merged.items():
        if key in ANNOTATIONS_TO_SKIP:
            assert dep[key] == value
        else:
            assert rs[key] == value
    assert set(merged) == {k for k in dep if k in ANNOTATIONS_TO_SKIP} | {
        k for k in rs if k not in ANNOTATIONS_TO_SKIP
    }


def test_rollback_patch_shape():
    t = template(labels={"app": "x", POD_TEMPLATE_HASH: "abc"})
    patch = rollback_patch(t, {REVISION: "3", "team": "a"})
    assert [(op["op"], op["path"]) for op in patch] == [
        ("replace", "/spec/template"),
        ("replace", "/metadata/annotations"),
    ]
    assert patch[0]["value"] == {
        "metadata": {"labels": {"app": "x"}},
        "spec": {"containers": [{"image": "nginx:1", "name": "app"}]},
    }
    assert patch[1]["value"] == {REVISION: "3", "team": "a"}
    only_hash = rollback_patch(template(labels={POD_TEMPLATE_HASH: "abc"}), {})
    assert only_hash[0]["value"]["metadata"] == {}


# --- selectors -------------------------------------------------------------------------------


@settings(deadline=None)
@given(st.dictionaries(label_key, label_value, min_size=1, max_size=5))
def test_selector_string_matches_its_own_labels(labels):
    selector = label_selector_string(k8s.V1LabelSelector(match_labels=labels))
    assert labels_match(selector, labels)
    key = next(iter(labels))
    assert not labels_match(selector, {k: v for k, v in labels.items() if k != key})
    assert not labels_match(selector, {**labels, key: labels[key] + "z"})


def test_selector_expressions():
    sel = k8s.V1LabelSelector(
        match_labels={"app": "akig"},
        match_expressions=[
            k8s.V1LabelSelectorRequirement(key="tier", operator="In", values=["web", "api"]),
            k8s.V1LabelSelectorRequirement(key="canary", operator="DoesNotExist"),
            k8s.V1LabelSelectorRequirement(key="team", operator="Exists"),
            k8s.V1LabelSelectorRequirement(key="env", operator="NotIn", values=["dev"]),
        ],
    )
    text = label_selector_string(sel)
    assert text == "app=akig,tier in (api,web),!canary,team,env notin (dev)"
    assert labels_match(text, {"app": "akig", "tier": "api", "team": "x"})
    assert not labels_match(text, {"app": "akig", "tier": "api", "team": "x", "canary": "1"})
    assert not labels_match(text, {"app": "akig", "tier": "db", "team": "x"})
    assert not labels_match(text, {"app": "akig", "tier": "api", "team": "x", "env": "dev"})
    assert labels_match("app!=x", {"app": "y"})
    assert labels_match("app==akig", {"app": "akig"})
    assert labels_match("", {})
    with pytest.raises(PermanentError, match="cannot parse"):
        labels_match("app=(", {"app": "x"})


# --- rollout status --------------------------------------------------------------------------


def deployment(generation=2, observed=2, replicas=3, updated=3, total=3, available=3, reason=None):
    conditions = []
    if reason:
        conditions.append({"type": "Progressing", "status": "False", "reason": reason})
    return model(
        {
            "metadata": {"name": "web", "namespace": "ns", "generation": generation},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"a": "b"}},
                "template": {"spec": {"containers": [{"name": "c", "image": "i"}]}},
            },
            "status": {
                "observedGeneration": observed,
                "replicas": total,
                "updatedReplicas": updated,
                "availableReplicas": available,
                "conditions": conditions,
            },
        },
        "V1Deployment",
    )


@pytest.mark.parametrize(
    ("kwargs", "message", "done"),
    [
        ({"observed": 1}, "Waiting for deployment spec update to be observed...", False),
        (
            {"updated": 1},
            'Waiting for deployment "web" rollout to finish: '
            "1 out of 3 new replicas have been updated...",
            False,
        ),
        (
            {"total": 5},
            'Waiting for deployment "web" rollout to finish: '
            "2 old replicas are pending termination...",
            False,
        ),
        (
            {"available": 2},
            'Waiting for deployment "web" rollout to finish: '
            "2 of 3 updated replicas are available...",
            False,
        ),
        ({}, 'deployment "web" successfully rolled out', True),
        (
            {"replicas": 0, "updated": 0, "total": 0, "available": 0},
            'deployment "web" successfully rolled out',
            True,
        ),
    ],
)
def test_rollout_status_like_kubectl(kwargs, message, done):
    assert rollout_status_message(deployment(**kwargs)) == (message, done)


def test_progress_deadline_is_a_failure():
    with pytest.raises(PermanentError, match='deployment "web" exceeded its progress deadline'):
        rollout_status_message(deployment(updated=1, reason="ProgressDeadlineExceeded"))
    # Not yet observed: kubectl keeps waiting, whatever the condition says.
    assert not rollout_status_message(deployment(observed=1, reason="ProgressDeadlineExceeded"))[1]


def test_rfc3339_like_go():
    assert rfc3339_now(datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)) == "2024-05-06T07:08:09Z"
    tz = timezone(timedelta(hours=-5))
    assert rfc3339_now(datetime(2024, 5, 6, 7, 8, 9, tzinfo=tz)) == "2024-05-06T07:08:09-05:00"
    now = datetime.fromisoformat(rfc3339_now().replace("Z", "+00:00"))
    assert abs((now - datetime.now(UTC)).total_seconds()) < 5


# --- error mapping ---------------------------------------------------------------------------


def api_error(status: int, message: str = "boom") -> ApiException:
    exc = ApiException(status=status, reason="r")
    exc.body = json.dumps({"kind": "Status", "message": message})
    return exc


def classify(exc: Exception, **kw):
    args = {
        "verb": "get",
        "resource": "deployments",
        "name": "web",
        "namespace": "prod",
        "host": "https://k",
    }
    return classify_api_error(exc, **{**args, **kw})


def test_error_mapping():
    err = classify(api_error(404))
    assert isinstance(err, PermanentError)
    assert str(err) == "deployment web not found in namespace prod"
    err = classify(
        api_error(403, 'deployments.apps "web" is forbidden: User "u" cannot delete'), verb="delete"
    )
    assert isinstance(err, PermanentError)
    assert "forbidden: cannot delete deployments in namespace prod (RBAC)" in str(err)
    assert isinstance(classify(api_error(401)), PermanentError)
    assert isinstance(classify(api_error(422)), PermanentError)
    for status in (429, 500, 503, 504):
        assert isinstance(classify(api_error(status)), TransientError)
    refused = urllib3.exceptions.NewConnectionError(None, "refused")  # type: ignore[arg-type]
    err = classify(urllib3.exceptions.MaxRetryError(None, "/", refused))  # type: ignore[arg-type]
    assert isinstance(err, TransientError)
    assert "unreachable" in str(err)
    assert "NewConnectionError" in str(err)
    assert isinstance(classify(urllib3.exceptions.ReadTimeoutError(None, "/", "t")), TransientError)  # type: ignore[arg-type]
    assert isinstance(classify(ConnectionRefusedError()), TransientError)


# ------------------------------------------------------- StatefulSet status, memory cap


def statefulset(
    replicas: int = 3,
    generation: int = 2,
    observed: int = 2,
    ready: int = 3,
    updated: int = 3,
    current_rev: str = "r1",
    update_rev: str = "r1",
    strategy: dict[str, Any] | None = None,
) -> Any:
    return model(
        {
            "metadata": {"name": "akig-redis", "generation": generation},
            "spec": {
                "replicas": replicas,
                "selector": {},
                "serviceName": "akig-redis",
                "template": {},
                "updateStrategy": strategy
                or {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}},
            },
            "status": {
                "replicas": replicas,
                "observedGeneration": observed,
                "readyReplicas": ready,
                "updatedReplicas": updated,
                "currentReplicas": replicas,
                "currentRevision": current_rev,
                "updateRevision": update_rev,
            },
        },
        "V1StatefulSet",
    )


@pytest.mark.parametrize(
    ("kwargs", "message", "done"),
    [
        ({"observed": 1}, "Waiting for statefulset spec update to be observed...", False),
        (
            {"observed": 0, "generation": 0},
            "Waiting for statefulset spec update to be observed...",
            False,
        ),
        ({"ready": 1}, "Waiting for 2 pods to be ready...", False),
        (
            {"updated": 1},
            "Waiting for partitioned roll out to finish: 1 out of 3 new pods have been updated...",
            False,
        ),
        (
            {
                "updated": 1,
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 2}},
            },
            "partitioned roll out complete: 1 new pods have been updated...",
            True,
        ),
        ({}, "partitioned roll out complete: 3 new pods have been updated...", True),
        (
            {"update_rev": "r2", "strategy": {"type": "RollingUpdate"}},
            "waiting for statefulset rolling update to complete 3 pods at revision r2...",
            False,
        ),
        (
            {"strategy": {"type": "RollingUpdate"}},
            "statefulset rolling update complete 3 pods at revision r1...",
            True,
        ),
    ],
)
def test_statefulset_status_like_kubectl(kwargs: dict[str, Any], message: str, done: bool):
    assert statefulset_status_message(statefulset(**kwargs)) == (message, done)


def test_statefulset_status_refuses_on_delete():
    with pytest.raises(PermanentError, match="only available for RollingUpdate strategy type"):
        statefulset_status_message(statefulset(strategy={"type": "OnDelete"}))


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [("512Mi", 512 * 2**20), ("1Gi", 2**30), ("1G", 10**9), ("0.5Gi", 2**29), ("1e3", 1000)],
)
def test_memory_bytes(quantity: str, expected: int):
    assert memory_bytes(quantity) == expected


def test_memory_bytes_rejects_garbage():
    with pytest.raises(PermanentError, match="invalid memory quantity"):
        memory_bytes("lots")


def _change(current: int, target: int) -> MemoryLimitChange:
    return MemoryLimitChange(
        kind="statefulset",
        name="akig-redis",
        namespace="prod",
        container="main",
        current=str(current),
        current_bytes=current,
        target=str(target),
        target_bytes=target,
        generation=1,
    )


@given(current=st.integers(1, 2**40), factor=st.floats(0, 4, allow_nan=False))
@settings(max_examples=300)
def test_memory_limit_change_is_capped_at_twice(current: int, factor: float):
    target = max(1, int(current * factor))
    if current <= target <= MEMORY_LIMIT_MAX_FACTOR * current:
        change = _change(current, target)
        assert change.already_at_target == (target == current)
    else:
        with pytest.raises(ValueError, match=r"more than 2x|lower than the current"):
            _change(current, target)


def test_memory_limit_cap_boundaries():
    assert _change(256, 512).target_bytes == 512
    with pytest.raises(ValueError, match="more than 2x"):
        _change(256, 513)
    with pytest.raises(ValueError, match="lower"):
        _change(256, 255)
