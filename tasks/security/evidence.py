"""The evidence bundle of a security incident: captured read-only, before anything changes.

`capture_evidence` writes, for the pods a label selector picks in one namespace:

- `pods/<pod>.json`: the pod object as the API returns it (what `kubectl describe` reads);
- `logs/<pod>/<container>.log` for every container (init containers too), and
  `<container>.previous.log` where the container restarted or has a last termination;
- `images.json`: per pod and container, the spec image and the running image ID (digest);
- `events.json`: the namespace's events about those pods, their ReplicaSets, Deployments;
- `workloads/replicaset-<name>.json`, `workloads/deployment-<name>.json`: the owners' specs;
- `audit.json`: the login assessment and the audit table's login rows of the window;
- `manifest.json`: every file with its SHA-256 and size, and `manifest.sha256` (the
  manifest's own hash, in `sha256sum -c` format).

Layout: `<evidence_dir>/<incident-slug>/<UTC timestamp>/`. A second capture for the same
incident never overwrites: it gets a new timestamped folder (the earlier bundles stay, and
`bundles_of` lists them for `verify_bundle`). Folders are 0700, files 0600, created
exclusively (an existing file is never replaced).

Nothing is masked in the files (they are the forensic record, readable only by the runbook's
user); nothing of their content is logged or returned, only names, sizes and hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from tasks.errors import PermanentError, TransientError
from tasks.kubernetes.api import Kube, call, get_deployment, kube_session, run_logger
from tasks.kubernetes.pods import event_time, list_pod_objects
from tasks.kubernetes.semantics import meta
from tasks.retry import RETRY_READ
from tasks.security.assess import audit_login_rows, logins_of
from tasks.security.incident import incident_slug
from tasks.settings import KubernetesSettings, PostgresSettings, SecuritySettings

MANIFEST = "manifest.json"
MANIFEST_HASH = "manifest.sha256"
#: Log bytes kept per container log (the newest); a bigger log is cut and says so.
LOG_LIMIT_BYTES = 20 * 1024 * 1024
#: Audit rows kept in `audit.json` (the newest of the window).
AUDIT_ROW_LIMIT = 20_000


class EvidenceFile(BaseModel):
    """One file of a bundle: its path relative to the bundle, hash and size."""

    path: str
    sha256: str
    bytes: int
    kind: str = Field(description="pod, log, previous-log, images, events, workload, audit.")


class EvidenceBundle(BaseModel):
    """Where a capture wrote its files, what they hash to, and what it could not read."""

    incident: str
    slug: str
    namespace: str
    selector: str
    directory: str
    files: list[EvidenceFile]
    manifest_sha256: str
    pods: list[str]
    captured_at: datetime
    audit_status: str = Field(description="ok, or why the audit query gave nothing.")
    errors: list[str] = Field(
        default_factory=list, description="What could not be captured (no values)."
    )
    unkept: dict[str, str] = Field(
        default_factory=dict,
        description="Pods with a log of a container that ran but could not be read, each with"
        " its workload (`deployment/<name>`, `statefulset/...`, `daemonset/...`, or `pod/...`):"
        " restarting that workload would lose the log.",
    )


class BundleCheck(BaseModel):
    """A bundle's files re-hashed against its manifest."""

    directory: str
    ok: bool
    manifest_ok: bool
    checked: int = 0
    mismatched: list[str] = Field(default_factory=list)
    missing: list[str] = Field(default_factory=list)
    unexpected: list[str] = Field(default_factory=list, description="Files not in the manifest.")
    incomplete: str | None = Field(
        None, description="Why the capture stopped early (its files still hashed), or None."
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _safe_part(name: str) -> str:
    """A Kubernetes name as one path component (they are DNS names; be strict anyway)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "_"


class _Writer:
    """Writes files of one bundle exclusively, 0600, and remembers their hashes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: list[EvidenceFile] = []

    def write(self, rel: str, data: bytes, kind: str) -> None:
        path = self.root / rel
        # Each folder 0700 (mkdir's `parents` would give the intermediate ones the umask's).
        folder = self.root
        for part in Path(rel).parent.parts:
            folder = folder / part
            if not folder.is_dir():
                folder.mkdir(mode=0o700)
                os.chmod(folder, 0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        self.files.append(EvidenceFile(path=rel, sha256=_sha256(data), bytes=len(data), kind=kind))

    def write_json(self, rel: str, obj: Any, kind: str) -> None:
        self.write(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), kind)


def _new_bundle_dir(base: Path, slug: str, now: datetime) -> Path:
    """`<base>/<slug>/<timestamp>` created 0700 (a clash gets a suffix, never a reuse)."""
    if not base.is_dir():
        base.mkdir(mode=0o700, parents=True)
        os.chmod(base, 0o700)
    incident_dir = base / slug
    incident_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(incident_dir, 0o700)
    stamp = now.strftime("%Y%m%dT%H%M%S%fZ")
    for n in range(100):
        candidate = incident_dir / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            candidate.mkdir(mode=0o700)
        except FileExistsError:
            continue
        os.chmod(candidate, 0o700)
        return candidate
    raise PermanentError(f"cannot create a new evidence folder under {incident_dir}")


def bundles_of(incident: str, settings: SecuritySettings | None = None) -> list[str]:
    """The incident's earlier bundle folders (those with a manifest), oldest first."""
    settings = settings or SecuritySettings()
    incident_dir = settings.evidence_dir / incident_slug(incident)
    if not incident_dir.is_dir():
        return []
    return sorted(str(d) for d in incident_dir.iterdir() if (d / MANIFEST).is_file())


def _owners(kube: Kube, namespace: str, pods: list[k8s.V1Pod]) -> tuple[list[Any], list[Any]]:
    """The ReplicaSets controlling the pods and the Deployments controlling those."""
    rs_names = sorted(
        {
            o.name
            for p in pods
            for o in meta(p).owner_references or []
            if o.controller and o.kind == "ReplicaSet"
        }
    )
    replica_sets = []
    for name in rs_names:
        replica_sets.append(
            call(
                kube,
                kube.apps.read_namespaced_replica_set,
                name,
                namespace,
                verb="get",
                resource="replicasets",
                name=name,
                namespace=namespace,
            )
        )
    dep_names = sorted(
        {
            o.name
            for rs in replica_sets
            for o in meta(rs).owner_references or []
            if o.controller and o.kind == "Deployment"
        }
    )
    deployments = [get_deployment(kube, name, namespace) for name in dep_names]
    return replica_sets, deployments


def _container_log(
    kube: Kube, pod: str, namespace: str, container: str, previous: bool
) -> bytes | str:
    """The container's log (bytes, the newest LOG_LIMIT_BYTES), or why not (str)."""
    try:
        text = call(
            kube,
            kube.core.read_namespaced_pod_log,
            pod,
            namespace,
            container=container,
            previous=previous,
            limit_bytes=LOG_LIMIT_BYTES,
            _preload_content=False,
            verb="get",
            resource="pods/log",
            name=pod,
            namespace=namespace,
        )
    except PermanentError as exc:
        if "forbidden" in str(exc) or "credentials" in str(exc):
            raise
        return str(exc)
    return bytes(text.data)  # type: ignore[attr-defined]


def _containers(pod: k8s.V1Pod) -> list[k8s.V1Container]:
    """Init containers first, then the containers (what the pod ran, in order)."""
    if pod.spec is None:
        return []
    return list(pod.spec.init_containers or []) + list(pod.spec.containers or [])


def _images(pods: list[k8s.V1Pod]) -> list[dict[str, Any]]:
    out = []
    for pod in pods:
        spec = {c.name: c.image for c in _containers(pod)}
        status = pod.status or k8s.V1PodStatus()
        statuses = {
            s.name: s
            for s in (status.init_container_statuses or []) + (status.container_statuses or [])
        }
        for name, image in spec.items():
            s = statuses.get(name)
            out.append(
                {
                    "pod": meta(pod).name,
                    "container": name,
                    "spec_image": image,
                    "status_image": s.image if s else None,
                    "image_id": s.image_id if s else None,
                }
            )
    return out


def _workload_of(pod: k8s.V1Pod, replica_sets: list[Any]) -> str:
    """`<kind>/<name>` of what a restart would replace the pod through (as the rotation's
    restarts name them); `pod/<name>` for a pod no workload controls."""
    deployment_of = {
        str(meta(rs).name): str(o.name)
        for rs in replica_sets
        for o in meta(rs).owner_references or []
        if o.controller and o.kind == "Deployment"
    }
    for o in meta(pod).owner_references or []:
        if not o.controller:
            continue
        if o.kind == "ReplicaSet" and o.name in deployment_of:
            return f"deployment/{deployment_of[o.name]}"
        if o.kind in ("StatefulSet", "DaemonSet"):
            return f"{o.kind.lower()}/{o.name}"
    return f"pod/{meta(pod).name}"


def _capture_pods(
    kube: Kube, w: _Writer, namespace: str, pods: list[k8s.V1Pod], errors: list[str]
) -> set[str]:
    """Write each pod's object and logs; the pods with a log that ran but was not read."""
    api = kube.client
    unkept: set[str] = set()
    for pod in pods:
        name = str(meta(pod).name)
        part = _safe_part(name)
        w.write_json(f"pods/{part}.json", api.sanitize_for_serialization(pod), "pod")
        status = pod.status or k8s.V1PodStatus()
        statuses = {
            s.name: s
            for s in (status.init_container_statuses or []) + (status.container_statuses or [])
        }
        for c in _containers(pod):
            s = statuses.get(c.name)
            if not (pod.spec and pod.spec.node_name):
                errors.append(f"{name}/{c.name}: not scheduled, no logs")
                continue
            got = _container_log(kube, name, namespace, c.name, previous=False)
            if isinstance(got, str):
                errors.append(f"{name}/{c.name} log: {got}")
                # A container still waiting has written nothing yet; one that ran has.
                state = s.state if s is not None else None
                if state is not None and (state.running or state.terminated):
                    unkept.add(name)
            else:
                w.write(f"logs/{part}/{_safe_part(c.name)}.log", got, "log")
            # kubectl logs --previous exists only after a restart / a termination.
            restarted = s is not None and (
                (s.restart_count or 0) > 0 or (s.last_state and s.last_state.terminated)
            )
            if restarted:
                prev = _container_log(kube, name, namespace, c.name, previous=True)
                if isinstance(prev, str):
                    errors.append(f"{name}/{c.name} previous log: {prev}")
                    unkept.add(name)
                else:
                    w.write(f"logs/{part}/{_safe_part(c.name)}.previous.log", prev, "previous-log")
    return unkept


def _capture_objects(
    kube: Kube,
    w: _Writer,
    pods: list[k8s.V1Pod],
    replica_sets: list[Any],
    deployments: list[Any],
    events: list[Any],
) -> None:
    """images.json, events.json and the owners' objects."""
    api = kube.client
    w.write_json("images.json", _images(pods), "images")
    involved = {meta(o).name for o in [*pods, *replica_sets, *deployments]}
    about = [e for e in sorted(events, key=event_time) if e.involved_object.name in involved]
    w.write_json("events.json", api.sanitize_for_serialization(about), "events")
    for rs in replica_sets:
        w.write_json(
            f"workloads/replicaset-{_safe_part(str(meta(rs).name))}.json",
            api.sanitize_for_serialization(rs),
            "workload",
        )
    for dep in deployments:
        w.write_json(
            f"workloads/deployment-{_safe_part(str(meta(dep).name))}.json",
            api.sanitize_for_serialization(dep),
            "workload",
        )


def _capture_audit(
    w: _Writer, settings: SecuritySettings, pg: PostgresSettings | None, errors: list[str]
) -> str:
    """audit.json: the login assessment and the window's login rows; returns the status."""
    logins = logins_of(settings, pg)
    rows: list[dict[str, Any]] = []
    truncated = False
    if logins.ok:
        try:
            rows, truncated = audit_login_rows(settings, pg, AUDIT_ROW_LIMIT)
        except (PermanentError, TransientError) as exc:
            errors.append(f"audit rows: {exc}")
    w.write_json(
        "audit.json",
        {"assessment": logins.model_dump(mode="json"), "rows": rows, "truncated": truncated},
        "audit",
    )
    return "ok" if logins.ok else f"{logins.status}: {logins.detail}"


def _write_manifest(w: _Writer, header: dict[str, Any]) -> str:
    """manifest.json (every file written so far) and manifest.sha256; returns the hash."""
    manifest = {**header, "files": [f.model_dump() for f in w.files]}
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    w.write(MANIFEST, data, "manifest")
    digest = _sha256(data)
    w.write(MANIFEST_HASH, f"{digest}  {MANIFEST}\n".encode(), "manifest")
    return digest


@task(cache_policy=NO_CACHE, task_run_name="capture-evidence-{incident}")
def capture_evidence(
    incident: str,
    selector: str,
    namespace: str | None = None,
    settings: SecuritySettings | None = None,
    kube: KubernetesSettings | None = None,
    pg: PostgresSettings | None = None,
) -> EvidenceBundle:
    """Write the selected pods' logs, objects, images, events, owners and the audit rows to a
    new evidence folder with a SHA-256 manifest (read-only on every system)."""
    settings = settings or SecuritySettings()
    kube = kube or KubernetesSettings()
    namespace = namespace or kube.namespace
    slug = incident_slug(incident)
    if not selector or not selector.strip():
        raise PermanentError("a label selector is required to capture evidence (e.g. app=akig)")
    captured_at = datetime.now(UTC)
    errors: list[str] = []
    with kube_session(kube) as session:
        # Read everything from the API first: a bad selector or missing RBAC creates nothing.
        pods = list_pod_objects(session, namespace, selector.strip())
        replica_sets, deployments = _owners(session, namespace, pods)
        events = call(
            session,
            session.core.list_namespaced_event,
            namespace,
            verb="list",
            resource="events",
            namespace=namespace,
        )
        root = _new_bundle_dir(settings.evidence_dir, slug, captured_at)
        w = _Writer(root)
        header = {
            "incident": incident,
            "slug": slug,
            "namespace": namespace,
            "selector": selector,
            "captured_at": captured_at.isoformat(),
            "pods": [meta(p).name for p in pods],
            "errors": errors,
        }
        try:
            unkept = _capture_pods(session, w, namespace, pods, errors)
            _capture_objects(session, w, pods, replica_sets, deployments, events.items)
            audit_status = _capture_audit(w, settings, pg, errors)
        except Exception as exc:
            # What was written stays, hashed and marked incomplete; the caller sees the error
            # (and must not go on to change anything).
            why = str(exc)[:300] if isinstance(exc, PermanentError | TransientError) else ""
            _write_manifest(w, {**header, "incomplete": why or type(exc).__name__})
            raise
    files = list(w.files)
    digest = _write_manifest(w, header)
    pod_names = [str(n) for n in header["pods"]]
    run_logger().info(
        "evidence for %s: %d pod(s), %d file(s) in %s, manifest sha256 %s",
        slug,
        len(pod_names),
        len(files),
        root,
        digest,
    )
    return EvidenceBundle(
        incident=incident,
        slug=slug,
        namespace=namespace,
        selector=selector,
        directory=str(root),
        files=files,
        manifest_sha256=digest,
        pods=pod_names,
        captured_at=captured_at,
        audit_status=audit_status,
        errors=errors,
        unkept={
            str(meta(p).name): _workload_of(p, replica_sets) for p in pods if meta(p).name in unkept
        },
    )


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="verify-evidence")
def verify_bundle(directory: str) -> BundleCheck:
    """Re-hash a bundle's manifest and every file in it; name what changed or went missing."""
    root = Path(directory)
    if not (root / MANIFEST).is_file():
        raise PermanentError(f"{directory} is not an evidence bundle (no {MANIFEST})")
    data = (root / MANIFEST).read_bytes()
    recorded = ""
    if (root / MANIFEST_HASH).is_file():
        recorded = (root / MANIFEST_HASH).read_text().split(" ")[0].strip()
    manifest_ok = recorded == _sha256(data)
    mismatched = [] if manifest_ok else [MANIFEST]
    missing = [] if (root / MANIFEST_HASH).is_file() else [MANIFEST_HASH]
    try:
        parsed = json.loads(data)
        listed = parsed["files"]
        incomplete = parsed.get("incomplete")
    except (ValueError, KeyError, TypeError):
        return BundleCheck(
            directory=directory, ok=False, manifest_ok=False, mismatched=[MANIFEST], missing=missing
        )
    known = {MANIFEST, MANIFEST_HASH}
    for entry in listed:
        rel = str(entry["path"])
        known.add(rel)
        path = root / rel
        if not path.resolve().is_relative_to(root.resolve()):
            mismatched.append(rel)  # a manifest pointing outside its bundle is not ours
        elif not path.is_file():
            missing.append(rel)
        elif _sha256(path.read_bytes()) != entry["sha256"]:
            mismatched.append(rel)
    unexpected = sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and str(p.relative_to(root)) not in known
    )
    ok = manifest_ok and not mismatched and not missing
    run_logger().info(
        "evidence %s: %d file(s) checked, %s",
        directory,
        len(listed),
        "hashes verify" if ok else f"{len(mismatched)} changed, {len(missing)} missing",
    )
    return BundleCheck(
        directory=directory,
        ok=ok,
        manifest_ok=manifest_ok,
        checked=len(listed),
        mismatched=mismatched,
        missing=missing,
        unexpected=unexpected,
        incomplete=None if incomplete is None else str(incomplete),
    )
