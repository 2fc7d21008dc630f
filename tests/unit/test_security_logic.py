"""Pure logic of the security evidence and assessments: slugs, drift, baselines, managedFields,
and the bundle check on files written here."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kubernetes import client as k8s

from tasks.errors import PermanentError
from tasks.security.assess import compare_volumes, drift_reasons, secret_change_of
from tasks.security.evidence import (
    MANIFEST,
    MANIFEST_HASH,
    _sha256,
    _workload_of,
    _Writer,
    verify_bundle,
)
from tasks.security.incident import SLUG_MAX, incident_slug

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@given(st.text(min_size=1, max_size=200).filter(lambda s: s.strip()))
def test_every_incident_id_gives_a_dns_label(incident: str) -> None:
    slug = incident_slug(incident)
    assert DNS_LABEL.match(slug) and len(slug) <= SLUG_MAX


@given(st.text(min_size=1, max_size=60), st.text(min_size=1, max_size=60))
def test_different_incident_ids_get_different_slugs(a: str, b: str) -> None:
    if a.strip() and b.strip() and a != b:
        assert incident_slug(a) != incident_slug(b)


def test_slugs_keep_clean_ids_and_refuse_empty_ones() -> None:
    assert incident_slug("inc-42") == "inc-42"
    assert incident_slug("INC-42").startswith("inc-42-")
    with pytest.raises(PermanentError, match="incident"):
        incident_slug("  ")


def test_drift_reasons() -> None:
    img = "registry.local/app:1"
    assert drift_reasons(img, img, img, f"fake://{img}") == []
    swapped = drift_reasons(img, "evil/x:1", img, "fake://x")
    assert any("the Deployment says" in r for r in swapped)
    assert any("runtime reports" in r for r in swapped)
    pinned = "registry.local/app@sha256:aaa"
    assert drift_reasons(pinned, pinned, pinned, "docker-pullable://app@sha256:aaa") == []
    moved = drift_reasons(pinned, pinned, pinned, "docker-pullable://app@sha256:bbb")
    assert moved == ["running digest sha256:bbb is not the pinned sha256:aaa"]
    # A bare pod (no Deployment) is compared with itself only.
    assert drift_reasons(None, img, img, None) == []


def test_compare_volumes_against_each_users_own_baseline() -> None:
    got = {
        u.user: u
        for u in compare_volumes(
            {"a": 100.0, "b": 600.0, "c": 5.0, "d": 0.0}, {"a": 100.0, "b": 100.0, "d": 0.0}, 5
        )
    }
    assert not got["a"].flagged and got["a"].ratio == 1
    assert got["b"].flagged and got["b"].ratio == 6
    assert got["c"].flagged and got["c"].baseline is None  # volume with no history
    assert not got["d"].flagged  # nothing now, nothing before
    exactly = compare_volumes({"e": 500.0}, {"e": 100.0}, 5)
    assert not exactly[0].flagged  # "above" the factor, not at it


def test_secret_change_reads_managers_times_and_key_names_only() -> None:
    item = {
        "metadata": {
            "name": "db",
            "creationTimestamp": "2026-12-01T00:00:00Z",
            "labels": {"app.kubernetes.io/managed-by": "incident-runbooks"},
            "managedFields": [
                {
                    "manager": "kubectl-edit",
                    "operation": "Update",
                    "time": "2026-12-06T10:00:00Z",
                    "fieldsV1": {"f:data": {".": {}, "f:password": {}, "f:user": {}}},
                },
                {"manager": "setup", "operation": "Update", "time": "2026-12-01T00:00:00Z"},
            ],
        }
    }
    change = secret_change_of(item)
    assert change.last_changed == datetime(2026, 12, 6, 10, tzinfo=UTC)
    assert [w.manager for w in change.managers] == ["setup", "kubectl-edit"]
    assert change.managers[1].keys == ["password", "user"] and change.ours


def _bundle(root: Path) -> None:
    w = _Writer(root)
    w.write("logs/p/app.log", b"line\n", "log")
    w.write_json("images.json", [{"pod": "p"}], "images")
    data = json.dumps({"files": [f.model_dump() for f in w.files]}).encode()
    w.write(MANIFEST, data, "manifest")
    w.write(MANIFEST_HASH, f"{_sha256(data)}  {MANIFEST}\n".encode(), "manifest")


def test_verify_names_changed_missing_extra_and_escaping_files(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    _bundle(root)
    assert verify_bundle.fn(str(root)).ok
    (root / "stray.txt").write_text("x")
    assert verify_bundle.fn(str(root)).unexpected == ["stray.txt"]
    (root / "images.json").write_text("[]")
    (root / "logs/p/app.log").unlink()
    check = verify_bundle.fn(str(root))
    assert (check.ok, check.mismatched, check.missing) == (
        False,
        ["images.json"],
        ["logs/p/app.log"],
    )
    # A manifest rewritten with its hash, pointing outside the bundle, is refused anyway.
    data = json.dumps({"files": [{"path": "../outside", "sha256": "0" * 64}]}).encode()
    (root / MANIFEST).write_bytes(data)
    (root / MANIFEST_HASH).write_text(f"{_sha256(data)}  {MANIFEST}\n")
    (tmp_path / "outside").write_text("x")
    assert verify_bundle.fn(str(root)).mismatched == ["../outside"]


def test_the_writer_never_replaces_a_file(tmp_path: Path) -> None:
    w = _Writer(tmp_path)
    w.write("a.txt", b"1", "log")
    with pytest.raises(FileExistsError):
        w.write("a.txt", b"2", "log")
    assert (tmp_path / "a.txt").read_bytes() == b"1"


def _owned(name: str, kind: str | None, owner: str = "o", controller: bool = True) -> k8s.V1Pod:
    refs = (
        [
            k8s.V1OwnerReference(
                api_version="v1", kind=kind, name=owner, uid="u", controller=controller
            )
        ]
        if kind
        else None
    )
    return k8s.V1Pod(metadata=k8s.V1ObjectMeta(name=name, owner_references=refs))


def test_a_pods_workload_is_named_as_the_rotations_restarts_name_it() -> None:
    rs = k8s.V1ReplicaSet(
        metadata=k8s.V1ObjectMeta(
            name="web-5d9",
            owner_references=[
                k8s.V1OwnerReference(
                    api_version="apps/v1", kind="Deployment", name="web", uid="d", controller=True
                )
            ],
        ),
        spec=k8s.V1ReplicaSetSpec(selector=k8s.V1LabelSelector()),
    )
    assert _workload_of(_owned("web-5d9-x", "ReplicaSet", "web-5d9"), [rs]) == "deployment/web"
    assert _workload_of(_owned("db-0", "StatefulSet", "db"), []) == "statefulset/db"
    assert _workload_of(_owned("agent-x", "DaemonSet", "agent"), []) == "daemonset/agent"
    # A bare pod, a ReplicaSet of no Deployment, a reference that does not control the pod.
    assert _workload_of(_owned("lone", None), []) == "pod/lone"
    assert _workload_of(_owned("rs-only-x", "ReplicaSet", "rs-only"), [rs]) == "pod/rs-only-x"
    assert _workload_of(_owned("p", "StatefulSet", "db", controller=False), []) == "pod/p"
