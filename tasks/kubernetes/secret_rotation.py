"""Rotate named Kubernetes Secrets to new random values, keep the old ones in a backup Secret,
then restart exactly the workloads that use them.

- `plan_rotation` (read): per Secret its resourceVersion (pinned), its key names (never the
  values), whether it was already rotated for this incident (annotation
  `runbooks/rotated-for=<slug>`), and its users: the Deployments, StatefulSets and DaemonSets
  of the namespace whose pod template references it through a volume (`secret`, or a
  `projected` source), `env[].valueFrom.secretKeyRef` or `envFrom[].secretRef`, in containers
  and initContainers. The `restartedAt` value of each restart is chosen here, once.
- `apply_rotation` (idempotent write): per Secret, first the backup `<name>-backup-<slug>`
  (same type and data, labelled ours), then every key gets `secrets.token_urlsafe(32)`,
  written with the pinned resourceVersion (a change since the plan: 409, nothing written)
  and the annotations `runbooks/rotated-for`, `runbooks/rotated-at` and
  `runbooks/users-restart-at` (the users' planned `restartedAt`). A Secret already rotated
  for the incident is never rotated again (a second run, or a retry after a lost answer);
  its users are restarted again only when their `restartedAt` is older than that planned
  one (a run that died in between). Then the users are restarted (`kubectl rollout
  restart` semantics, a no-op when the planned value is set).

Only `Opaque` and `kubernetes.io/basic-auth` Secrets are rotated: random bytes in a TLS key,
a registry credential or a ServiceAccount token would break them, not secure them. A
backup Secret is never rotated. No value, old or new, is logged, returned or put in an
exception (API errors on Secrets are reported by status only).

Undo is by hand and on purpose: the old values are the compromised ones. To restore them,
copy `.data` of `<name>-backup-<slug>` into `<name>` and restart the same workloads.
"""

from __future__ import annotations

import base64
import secrets
from datetime import datetime
from typing import Any, Literal

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from tasks.errors import PermanentError, SafetyViolation, TransientError
from tasks.kubernetes.api import Kube, call, kube_session, run_logger
from tasks.kubernetes.netpol import INCIDENT_LABEL, MANAGED_BY, OURS, platform_namespace
from tasks.kubernetes.semantics import RESTARTED_AT, meta, rfc3339_now
from tasks.kubernetes.workload import (
    Kind,
    apply_restart_value,
    plan_restart_value,
    template_annotations,
)
from tasks.retry import RETRY_IDEMPOTENT_WRITE, RETRY_READ
from tasks.security.incident import incident_slug
from tasks.settings import KubernetesSettings
from tasks.tls.secrets import KubeName

ROTATED_FOR = "runbooks/rotated-for"
ROTATED_AT = "runbooks/rotated-at"
#: The `restartedAt` the rotation's plan chose for the Secret's users: a user whose own value
#: is older was not restarted after the rotation.
USERS_RESTART_AT = "runbooks/users-restart-at"
BACKUP_OF = "runbooks/backup-of"
ROTATABLE_TYPES = ("Opaque", "kubernetes.io/basic-auth")
Outcome = Literal["rotated", "already rotated", "dry run"]
_NAME = TypeAdapter(KubeName)
_NETWORK = (urllib3.exceptions.HTTPError, OSError)

_LISTS: dict[Kind, str] = {
    "deployment": "list_namespaced_deployment",
    "statefulset": "list_namespaced_stateful_set",
    "daemonset": "list_namespaced_daemon_set",
}


class SecretUser(BaseModel):
    """A workload whose pods use a Secret, and how."""

    kind: Kind
    name: str
    how: list[str] = Field(description="volume, env secretKeyRef, envFrom secretRef (+ where).")


class SecretRotationPlan(BaseModel):
    """One Secret in a rotation plan: names only, never values."""

    name: str
    resource_version: str = Field(description="Pinned: the write fails if it changed since.")
    type: str
    key_names: list[str] = Field(description="The Secret's keys (never their values).")
    already_rotated: bool = Field(description="Rotated for this incident before: skipped.")
    backup_name: str
    users: list[SecretUser]


class PlannedRestart(BaseModel):
    """A workload to restart after the rotation, its `restartedAt` chosen once."""

    kind: Kind
    name: str
    restarted_at: str
    secrets: list[str] = Field(description="The rotated Secrets it uses.")


class RotationPlan(BaseModel):
    """What a rotation would do, read once."""

    incident: str
    slug: str
    namespace: str
    secrets: list[SecretRotationPlan]
    restarted_at: str = Field(description="The `restartedAt` chosen for every user restart.")
    restarts: list[PlannedRestart]


class RotatedSecret(BaseModel):
    """What happened to one Secret."""

    name: str
    outcome: Outcome
    backup_name: str
    key_names: list[str] = Field(description="The Secret's keys (never their values).")


class RestartDone(BaseModel):
    """One user restarted (or found restarted by an earlier attempt)."""

    kind: Kind
    name: str
    restarted_at: str
    patched: bool
    message: str


class RotationResult(BaseModel):
    """What `apply_rotation` did."""

    incident: str
    namespace: str
    secrets: list[RotatedSecret]
    restarts: list[RestartDone]
    dry_run: bool = False

    @property
    def rotated(self) -> list[str]:
        """Names of the Secrets this call rotated."""
        return [s.name for s in self.secrets if s.outcome == "rotated"]


def backup_name(name: str, slug: str) -> str:
    """The backup of `name` taken before its rotation for an incident."""
    return f"{name}-backup-{slug}"[:253].rstrip("-.")


def _secret_error(exc: Exception, verb: str, name: str, namespace: str) -> Exception:
    # Never the server's message: a validation error could quote a value.
    what = f"secret {namespace}/{name}"
    if not isinstance(exc, ApiException):
        return TransientError(f"cannot {verb} {what}: Kubernetes API unreachable")
    status = exc.status or 0
    if status == 404:
        return PermanentError(f"{what} not found")
    if status == 403:
        return PermanentError(f"forbidden: cannot {verb} secrets in namespace {namespace} (RBAC)")
    if status == 0 or status == 429 or status >= 500:
        return TransientError(f"cannot {verb} {what}: Kubernetes API answered {status}")
    return PermanentError(f"cannot {verb} {what}: Kubernetes API answered {status}")


def _read_secret(kube: Kube, name: str, namespace: str) -> Any:
    try:
        return kube.core.read_namespaced_secret(name, namespace, _request_timeout=kube.timeout)
    except (ApiException, *_NETWORK) as exc:
        raise _secret_error(exc, "get", name, namespace) from None


def _template_uses(spec: Any, name: str) -> list[str]:
    """How a pod spec references Secret `name` (empty: not at all)."""
    how: list[str] = []
    for vol in spec.volumes or []:
        if vol.secret is not None and vol.secret.secret_name == name:
            how.append(f"volume {vol.name}")
        for source in (vol.projected.sources or []) if vol.projected else []:
            if source.secret is not None and source.secret.name == name:
                how.append(f"projected volume {vol.name}")
    containers = [("", c) for c in spec.containers or []]
    containers += [("init ", c) for c in spec.init_containers or []]
    for prefix, c in containers:
        for env in c.env or []:
            ref = env.value_from.secret_key_ref if env.value_from else None
            if ref is not None and ref.name == name:
                how.append(f"env secretKeyRef {prefix}container {c.name} {env.name}")
        for source in c.env_from or []:
            if source.secret_ref is not None and source.secret_ref.name == name:
                how.append(f"envFrom secretRef {prefix}container {c.name}")
    return how


def _workloads(kube: Kube, namespace: str) -> list[tuple[Kind, Any]]:
    found: list[tuple[Kind, Any]] = []
    for kind, method in _LISTS.items():
        listed = call(
            kube,
            getattr(kube.apps, method),
            namespace,
            verb="list",
            resource=f"{kind}s",
            namespace=namespace,
        )
        found += [(kind, obj) for obj in listed.items]
    return found


def _validated_names(names: list[str]) -> list[str]:
    if not names:
        raise PermanentError("no Secret named: nothing to rotate")
    if len(set(names)) != len(names):
        raise PermanentError("a Secret is named twice")
    for name in names:
        try:
            _NAME.validate_python(name)
        except ValidationError:
            raise PermanentError(f"{name!r} is not a Kubernetes object name") from None
    return names


def _restart_missed(obj: Any, users_restart_at: str | None) -> bool:
    """A user of an already rotated Secret still needs its restart: its `restartedAt` is
    older than the one the rotation planned for its users (the run died between the two)."""
    if users_restart_at is None:
        return False
    last = template_annotations(obj).get(RESTARTED_AT)
    try:
        planned = datetime.fromisoformat(users_restart_at)
        return last is None or datetime.fromisoformat(last) < planned
    except ValueError:
        return True


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="plan-rotation-{incident}")
def plan_rotation(
    incident: str,
    names: list[str],
    namespace: str | None = None,
    kube: KubernetesSettings | None = None,
) -> RotationPlan:
    """Pin each named Secret, list its keys (names) and its users, pick the restarts (read)."""
    settings = kube or KubernetesSettings()
    ns = platform_namespace(namespace, settings)
    slug = incident_slug(incident)
    _validated_names(names)
    planned: list[SecretRotationPlan] = []
    restarts: dict[tuple[Kind, str], PlannedRestart] = {}
    restarted_at = rfc3339_now()
    with kube_session(settings) as k:
        workloads = _workloads(k, ns)
        for name in names:
            secret = _read_secret(k, name, ns)
            labels = meta(secret).labels or {}
            annotations = meta(secret).annotations or {}
            if BACKUP_OF in labels:
                raise SafetyViolation(f"secret {ns}/{name} is a backup: refused")
            if secret.type not in ROTATABLE_TYPES:
                raise SafetyViolation(
                    f"secret {ns}/{name} is of type {secret.type}: random values would break"
                    f" it, only {', '.join(ROTATABLE_TYPES)} are rotated"
                )
            keys = sorted((secret.data or {}).keys())
            if not keys:
                raise PermanentError(f"secret {ns}/{name} has no keys: nothing to rotate")
            done = annotations.get(ROTATED_FOR) == slug
            users: list[SecretUser] = []
            for kind, obj in workloads:
                how = _template_uses(obj.spec.template.spec, name)
                if not how:
                    continue
                users.append(SecretUser(kind=kind, name=meta(obj).name, how=how))
                if done and not _restart_missed(obj, annotations.get(USERS_RESTART_AT)):
                    continue
                key = (kind, str(meta(obj).name))
                if key not in restarts:
                    value, _ = plan_restart_value(kind, obj, restarted_at)
                    restarts[key] = PlannedRestart(
                        kind=kind, name=key[1], restarted_at=value, secrets=[]
                    )
                restarts[key].secrets.append(name)
            planned.append(
                SecretRotationPlan(
                    name=name,
                    resource_version=str(meta(secret).resource_version),
                    type=str(secret.type),
                    key_names=keys,
                    already_rotated=done,
                    backup_name=backup_name(name, slug),
                    users=users,
                )
            )
    return RotationPlan(
        incident=incident,
        slug=slug,
        namespace=ns,
        secrets=planned,
        restarted_at=restarted_at,
        restarts=sorted(restarts.values(), key=lambda r: (r.kind, r.name)),
    )


def _backup(
    kube: Kube, secret: Any, plan: RotationPlan, item: SecretRotationPlan, dry: bool
) -> None:
    """Create the backup Secret; one already there is accepted only if ours and identical."""
    ns = plan.namespace
    body = k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(
            name=item.backup_name,
            namespace=ns,
            labels={MANAGED_BY: OURS, INCIDENT_LABEL: plan.slug, BACKUP_OF: item.name[:63]},
        ),
        type=secret.type,
        data=dict(secret.data or {}),
    )
    try:
        kube.core.create_namespaced_secret(
            ns, body, dry_run="All" if dry else None, _request_timeout=kube.timeout
        )
        return
    except _NETWORK as exc:
        raise _secret_error(exc, "create", item.backup_name, ns) from None
    except ApiException as exc:
        if exc.status != 409:
            raise _secret_error(exc, "create", item.backup_name, ns) from None
    try:
        existing = kube.core.read_namespaced_secret(
            item.backup_name, ns, _request_timeout=kube.timeout
        )
    except _NETWORK as exc:
        raise _secret_error(exc, "get", item.backup_name, ns) from None
    except ApiException as exc:
        raise SafetyViolation(
            f"backup secret {ns}/{item.backup_name} already exists and cannot be checked"
            f" (HTTP {exc.status}); secret {item.name} not rotated"
        ) from None
    labels = meta(existing).labels or {}
    if labels.get(BACKUP_OF) != item.name[:63] or (existing.data or {}) != (secret.data or {}):
        raise SafetyViolation(
            f"backup secret {ns}/{item.backup_name} already exists and does not hold the"
            f" current values of {item.name}; secret {item.name} not rotated"
        )


def _outcome(item: SecretRotationPlan, outcome: Outcome) -> RotatedSecret:
    return RotatedSecret(
        name=item.name, outcome=outcome, backup_name=item.backup_name, key_names=item.key_names
    )


def _rotate_one(
    kube: Kube, plan: RotationPlan, item: SecretRotationPlan, dry: bool
) -> RotatedSecret:
    ns = plan.namespace
    secret = _read_secret(kube, item.name, ns)
    annotations = dict(meta(secret).annotations or {})
    if annotations.get(ROTATED_FOR) == plan.slug:
        return _outcome(item, "already rotated")
    if meta(secret).resource_version != item.resource_version:
        raise SafetyViolation(
            f"secret {ns}/{item.name} changed since the plan (resourceVersion"
            f" {item.resource_version} -> {meta(secret).resource_version}); nothing written,"
            " plan again"
        )
    _backup(kube, secret, plan, item, dry)
    annotations[ROTATED_FOR] = plan.slug
    annotations[ROTATED_AT] = rfc3339_now()
    annotations[USERS_RESTART_AT] = plan.restarted_at
    secret.metadata.annotations = annotations
    secret.data = {
        key: base64.b64encode(secrets.token_urlsafe(32).encode()).decode() for key in item.key_names
    }
    try:
        kube.core.replace_namespaced_secret(
            item.name, ns, secret, dry_run="All" if dry else None, _request_timeout=kube.timeout
        )
    except _NETWORK as exc:
        raise _secret_error(exc, "update", item.name, ns) from None
    except ApiException as exc:
        if exc.status == 409:
            raise SafetyViolation(
                f"secret {ns}/{item.name} changed while rotating it (409 Conflict): backup"
                f" {item.backup_name} written, {item.name} not; plan again"
            ) from None
        raise _secret_error(exc, "update", item.name, ns) from None
    finally:
        secret.data = None  # drop the new values as soon as they are sent
    return _outcome(item, "dry run" if dry else "rotated")


@task(
    **RETRY_IDEMPOTENT_WRITE,
    cache_policy=NO_CACHE,
    task_run_name="apply-rotation-{plan.slug}",
)
def apply_rotation(
    plan: RotationPlan, kube: KubernetesSettings | None = None, dry_run: bool = False
) -> RotationResult:
    """Back up, rotate and annotate each planned Secret, then restart exactly its users."""
    settings = kube or KubernetesSettings()
    platform_namespace(plan.namespace, settings)
    log = run_logger()
    done: list[RotatedSecret] = []
    restarts: list[RestartDone] = []
    with kube_session(settings) as k:
        for item in plan.secrets:
            if item.already_rotated:
                done.append(_outcome(item, "already rotated"))
                continue
            result = _rotate_one(k, plan, item, dry_run)
            log.warning(
                "secret %s/%s: %s (%d key(s), backup %s)",
                plan.namespace,
                item.name,
                result.outcome,
                len(item.key_names),
                item.backup_name,
            )
            done.append(result)
        for r in plan.restarts:
            w = apply_restart_value(k, r.kind, r.name, plan.namespace, r.restarted_at, dry_run)
            log.info(w.message)
            restarts.append(
                RestartDone(
                    kind=r.kind,
                    name=r.name,
                    restarted_at=r.restarted_at,
                    patched=w.patched,
                    message=w.message,
                )
            )
    return RotationResult(
        incident=plan.incident,
        namespace=plan.namespace,
        secrets=done,
        restarts=restarts,
        dry_run=dry_run,
    )
