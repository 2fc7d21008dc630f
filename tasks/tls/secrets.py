"""Kubernetes TLS Secrets: read their certificates; back one up and replace its pair.

Clients come from `tasks.clients.kube_api_client` (the one builder). Reads carry the read
retry policy; the replace has none: a write whose outcome is unknown is re-planned by a
human, never repeated.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import SecretStr, StringConstraints

from tasks.clients import kube_api_client, kube_request_timeout
from tasks.errors import PermanentError, SafetyViolation, TransientError
from tasks.retry import RETRY_READ
from tasks.settings import KubernetesSettings
from tasks.tls.certs import CertificateInfo, SourceScan, describe_bundle, parse_certificates
from tasks.tls.replacement import (
    NewPair,
    ReplacementCheck,
    SecretReplacement,
    changed_since_approval,
    load_pair_from_files,
    pair_fingerprints,
    validate_replacement,
)

TLS_SECRET_TYPE = "kubernetes.io/tls"  # noqa: S105 - a type name, not a secret

# Kubernetes' own name rules (DNS-1123), checked in the parameter models before anything
# runs: a name that cannot exist is refused up front, and names are safe in commands.
Namespace = Annotated[
    str, StringConstraints(max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
]
KubeName = Annotated[
    str,
    StringConstraints(
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
    ),
]


@contextmanager
def _core_v1(settings: KubernetesSettings | None) -> Iterator[Any]:
    """A CoreV1Api on the shared client builder, closed afterwards."""
    with kube_api_client(settings) as api_client:
        yield k8s.CoreV1Api(api_client)


def _kube_error(exc: Exception, what: str) -> TransientError | PermanentError:
    if isinstance(exc, ApiException):
        status = int(exc.status or 0)
        if status == 429 or status >= 500:
            return TransientError(f"{what}: Kubernetes API answered {status} {exc.reason}")
        return PermanentError(f"{what}: Kubernetes API answered {status} {exc.reason}")
    return TransientError(f"{what}: Kubernetes API unreachable ({type(exc).__name__})")


def _read_secret(namespace: str, name: str, settings: KubernetesSettings | None) -> Any:
    what = f"secret {namespace}/{name}"
    try:
        with _core_v1(settings) as core:
            secret = core.read_namespaced_secret(
                name, namespace, _request_timeout=kube_request_timeout(settings)
            )
    except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise _kube_error(exc, what) from None
    if secret.type != TLS_SECRET_TYPE:
        raise PermanentError(f"{what} is of type {secret.type!r}, not {TLS_SECRET_TYPE}")
    data = secret.data or {}
    if "tls.crt" not in data:
        raise PermanentError(f"{what} has no tls.crt")
    return secret


def _decode(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise PermanentError(f"{what}: not valid base64") from None


def read_secret_certificates(
    namespace: str,
    name: str,
    settings: KubernetesSettings | None = None,
    now: datetime | None = None,
) -> SourceScan:
    """Read `tls.crt` of a `kubernetes.io/tls` Secret and describe it (tls.key untouched)."""
    started = time.monotonic()
    secret = _read_secret(namespace, name, settings)
    source = f"{namespace}/{name}"
    pem = _decode(secret.data["tls.crt"], f"secret {source} tls.crt")
    certs = parse_certificates(pem, f"secret {source} tls.crt")
    return SourceScan(
        source=source,
        kind="secret",
        certificates=describe_bundle(certs, source=source, kind="secret", now=now),
        resource_version=secret.metadata.resource_version,
        elapsed_s=time.monotonic() - started,
    )


def load_pair_from_secret(
    namespace: str, name: str, settings: KubernetesSettings | None = None
) -> NewPair:
    """Read a new pair staged as a TLS Secret (`kubectl create secret tls NAME-new ...`)."""
    secret = _read_secret(namespace, name, settings)
    what = f"secret {namespace}/{name}"
    if "tls.key" not in secret.data:
        raise PermanentError(f"{what} has no tls.key")
    return NewPair(
        cert_pem=_decode(secret.data["tls.crt"], f"{what} tls.crt").decode("ascii", "replace"),
        key_pem=SecretStr(
            _decode(secret.data["tls.key"], f"{what} tls.key").decode("ascii", "replace")
        ),
    )


def backup_secret_name(name: str, now: datetime) -> str:
    """The name of the copy taken before `name` is replaced: `<name>-backup-<UTC stamp>`."""
    return f"{name}-backup-{now:%Y%m%d%H%M%S}"[:253]


def write_tls_secret(
    namespace: str,
    name: str,
    pair: NewPair,
    expected_resource_version: str,
    settings: KubernetesSettings | None = None,
    now: datetime | None = None,
    backup_name: str | None = None,
    approved_fingerprints: list[str] | None = None,
) -> SecretReplacement:
    """Back up the current Secret, then replace its tls.crt/tls.key with `pair`.

    The replace carries the resourceVersion read when the plan was made: if anything
    (cert-manager, a human) changed the Secret since, the API answers 409 and nothing is
    written. Re-validates the pair against the Secret as it is now. With
    `approved_fingerprints` (the SHA-256 of each certificate of the pair an approver saw),
    a pair that is not that one is refused before anything is written.
    """
    now = now or datetime.now(UTC)
    what = f"secret {namespace}/{name}"
    if approved_fingerprints is not None:
        changed = changed_since_approval(approved_fingerprints, pair_fingerprints(pair))
        if changed:
            raise SafetyViolation(f"{what}: {changed}; nothing written")
    secret = _read_secret(namespace, name, settings)
    if secret.metadata.resource_version != expected_resource_version:
        raise SafetyViolation(
            f"{what} changed since the plan (resourceVersion {expected_resource_version} → "
            f"{secret.metadata.resource_version}); nothing written, plan again"
        )
    old = parse_certificates(_decode(secret.data["tls.crt"], what), what)
    old_infos = describe_bundle(old, source=f"{namespace}/{name}", kind="secret", now=now)
    check = validate_replacement(pair, old_infos, now=now)
    if not check.ok:
        raise SafetyViolation(f"{what}: new pair refused: " + "; ".join(check.problems))
    # The caller names the backup before the write, so its audit holds the undo even
    # when this call fails half-way.
    backup_name = backup_name or backup_secret_name(name, now)
    updated = _backup_and_replace(secret, pair, backup_name, what, settings)
    return SecretReplacement(
        namespace=namespace,
        name=name,
        old_serial=old_infos[0].serial,
        old_not_after=old_infos[0].not_after,
        old_fingerprint_sha256=old_infos[0].fingerprint_sha256,
        new_serial=check.new[0].serial,
        new_not_after=check.new[0].not_after,
        new_fingerprint_sha256=check.new[0].fingerprint_sha256,
        backup_secret=backup_name,
        resource_version=updated.metadata.resource_version,
    )


def _backup_and_replace(
    secret: Any,
    pair: NewPair,
    backup_name: str,
    what: str,
    settings: KubernetesSettings | None,
) -> Any:
    """Create the backup Secret, then replace `secret` (its resourceVersion pins the write)."""
    namespace, name = secret.metadata.namespace, secret.metadata.name
    timeout = kube_request_timeout(settings)
    backup = k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(
            name=backup_name,
            namespace=namespace,
            # No cert-manager annotations: the backup must not be adopted or renewed.
            labels={"runbooks/backup-of": name[:63], "runbooks/runbook": "cert-replace"},
        ),
        type=TLS_SECRET_TYPE,
        data=dict(secret.data),
    )
    new_data = dict(secret.data)
    new_data["tls.crt"] = base64.b64encode(pair.cert_pem.encode()).decode()
    new_data["tls.key"] = base64.b64encode(pair.key_pem.get_secret_value().encode()).decode()
    secret.data = new_data
    backed_up = False
    try:
        with _core_v1(settings) as api:
            api.create_namespaced_secret(namespace, backup, _request_timeout=timeout)
            backed_up = True
            return api.replace_namespaced_secret(name, namespace, secret, _request_timeout=timeout)
    except ApiException as exc:
        if exc.status == 409 and not backed_up:
            raise SafetyViolation(
                f"backup secret {namespace}/{backup_name} already exists; nothing written"
            ) from None
        if exc.status == 409:
            raise SafetyViolation(
                f"{what} changed while replacing it (409 Conflict): backup "
                f"{backup_name} written, {what} not; plan again"
            ) from None
        raise _kube_error(exc, what) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise _kube_error(exc, what) from None


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="read-tls-secret-{namespace}/{name}")
def read_tls_secret(
    namespace: str, name: str, settings: KubernetesSettings | None = None
) -> SourceScan:
    """Read and describe the certificates of a Kubernetes TLS Secret."""
    scan = read_secret_certificates(namespace, name, settings)
    get_run_logger().info(
        "secret %s/%s: %d certificate(s)", namespace, name, len(scan.certificates)
    )
    return scan


@task(cache_policy=NO_CACHE, task_run_name="check-replacement-{namespace}/{name}")
def check_tls_replacement(
    namespace: str,
    name: str,
    old: list[CertificateInfo],
    new_secret: str | None = None,
    new_cert_file: Path | None = None,
    new_key_file: Path | None = None,
    extra_hosts: list[str] | None = None,
    settings: KubernetesSettings | None = None,
) -> ReplacementCheck:
    """Load the new pair and check it may replace the Secret's current one."""
    pair = load_new_pair(namespace, new_secret, new_cert_file, new_key_file, settings)
    return validate_replacement(pair, old, extra_hosts=extra_hosts or [])


def load_new_pair(
    namespace: str,
    new_secret: str | None,
    new_cert_file: Path | None,
    new_key_file: Path | None,
    settings: KubernetesSettings | None = None,
) -> NewPair:
    """The new pair from a staged Secret or from files; exactly one source."""
    if new_secret and not (new_cert_file or new_key_file):
        return load_pair_from_secret(namespace, new_secret, settings)
    if new_cert_file and new_key_file and not new_secret:
        return load_pair_from_files(Path(new_cert_file), Path(new_key_file))
    raise PermanentError(
        "give the new pair either as a staged TLS Secret or as cert + key files, not both"
    )


@task(cache_policy=NO_CACHE, task_run_name="replace-tls-secret-{namespace}/{name}")
def replace_tls_secret(
    namespace: str,
    name: str,
    expected_resource_version: str,
    new_secret: str | None = None,
    new_cert_file: Path | None = None,
    new_key_file: Path | None = None,
    settings: KubernetesSettings | None = None,
    backup_name: str | None = None,
    approved_fingerprints: list[str] | None = None,
) -> SecretReplacement:
    """Back up and replace a Kubernetes TLS Secret with a validated new pair, only the one
    approved (no retries: a half-known write is re-planned, not repeated)."""
    # Read here, once more, and written as read: the pair compared is the pair installed.
    pair = load_new_pair(namespace, new_secret, new_cert_file, new_key_file, settings)
    done = write_tls_secret(
        namespace,
        name,
        pair,
        expected_resource_version,
        settings,
        backup_name=backup_name,
        approved_fingerprints=approved_fingerprints,
    )
    get_run_logger().warning(
        "secret %s/%s replaced: serial %s → %s (backup %s)",
        namespace,
        name,
        done.old_serial,
        done.new_serial,
        done.backup_secret,
    )
    return done
