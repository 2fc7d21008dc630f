"""Validating a replacement certificate + key against the certificate it replaces.

Private keys are read only to validate a replacement pair; they never reach a log, an
exception message, a return value or an artifact (`NewPair.key_pem` is a `SecretStr`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from pydantic import BaseModel, SecretStr

from tasks.errors import PermanentError
from tasks.tls.certs import (
    CertificateInfo,
    describe_bundle,
    hostname_matches,
    human_days,
    is_ca_cert,
    parse_certificates,
)


class NewPair(BaseModel):
    """A candidate certificate + key; the key is a `SecretStr` and never printed."""

    cert_pem: str
    key_pem: SecretStr


class ReplacementCheck(BaseModel):
    """Validation of a new pair against the certificate it replaces (no key material)."""

    ok: bool
    problems: list[str]
    new: list[CertificateInfo]
    hosts_required: list[str]


def pair_fingerprints(pair: NewPair) -> list[str]:
    """SHA-256 of each certificate of the pair's tls.crt, leaf first: what an approval
    approves (the key is bound to the leaf, so the chain names the whole pair)."""
    certs = parse_certificates(pair.cert_pem.encode(), "new tls.crt")
    return [c.fingerprint(hashes.SHA256()).hex() for c in certs]


def changed_since_approval(approved: Sequence[str], now: Sequence[str]) -> str | None:
    """Why the pair read now is not the one approved (its fingerprints), or None."""
    if list(approved) == list(now):
        return None
    if not approved or not now or approved[0] != now[0]:
        was = approved[0] if approved else "none"
        is_now = now[0] if now else "none"
        return (
            f"the new pair changed since it was approved: leaf SHA-256 fingerprint {was} → {is_now}"
        )
    return (
        "the new pair changed since it was approved: same leaf (SHA-256 fingerprint "
        f"{now[0]}), another chain ({len(approved)} → {len(now)} certificate(s))"
    )


def load_pair_from_files(cert_file: Path, key_file: Path) -> NewPair:
    """Read a new pair from files on the worker."""
    try:
        cert = cert_file.read_text()
        key = key_file.read_text()
    except OSError as exc:
        raise PermanentError(
            f"cannot read the new pair ({exc.filename}: {exc.strerror or type(exc).__name__})"
        ) from None
    return NewPair(cert_pem=cert, key_pem=SecretStr(key))


def _public_der(key: Any) -> bytes:
    return bytes(
        key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def validate_replacement(
    pair: NewPair,
    old: Sequence[CertificateInfo],
    *,
    extra_hosts: Sequence[str] = (),
    now: datetime | None = None,
    min_days_left: float = 1.0,
) -> ReplacementCheck:
    """Refuse anything that would make the incident worse: the key must match the leaf,
    the chain must be in order and unexpired, the leaf valid now, good for at least
    `min_days_left`, later than the old one, and its SANs must cover every host the old
    certificate covered (plus `extra_hosts`)."""
    now = now or datetime.now(UTC)
    problems: list[str] = []
    try:
        certs = parse_certificates(pair.cert_pem.encode(), "new tls.crt")
    except PermanentError as exc:
        return ReplacementCheck(ok=False, problems=[str(exc)], new=[], hosts_required=[])
    infos = describe_bundle(certs, source="new", kind="secret", now=now)
    leaf = infos[0]
    try:
        key = serialization.load_pem_private_key(pair.key_pem.get_secret_value().encode(), None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        problems.append("new tls.key is not an unencrypted PEM private key")
    else:
        if _public_der(key) != certs[0].public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            problems.append("new tls.key does not match the new certificate's public key")
    if is_ca_cert(certs[0]):
        problems.append("the first certificate is a CA; tls.crt must start with the leaf")
    for info in infos:
        problems += [f"chain: {p}" for p in info.chain_problems]
        if info.days_left <= 0:
            problems.append(f"#{info.position} ({info.subject}) has expired")
        if info.checked_at < info.not_before:
            problems.append(f"#{info.position} ({info.subject}) is not valid yet")
    if 0 < leaf.days_left < min_days_left:
        problems.append(f"new leaf has only {human_days(leaf.days_left)} left")
    old_leaf = next((o for o in old if o.position == 0), None)
    if old_leaf is not None and leaf.not_after <= old_leaf.not_after:
        problems.append(
            f"new leaf expires {leaf.not_after:%Y-%m-%d %H:%M}Z, not later than the current "
            f"one ({old_leaf.not_after:%Y-%m-%d %H:%M}Z)"
        )
    required = list(
        dict.fromkeys([*(old_leaf.san_dns + old_leaf.san_ips if old_leaf else []), *extra_hosts])
    )
    uncovered = [h for h in required if not _covers(leaf, h)]
    if uncovered:
        problems.append(f"new certificate does not cover: {', '.join(uncovered)}")
    return ReplacementCheck(ok=not problems, problems=problems, new=infos, hosts_required=required)


def _covers(leaf: CertificateInfo, host: str) -> bool:
    """Whether `leaf` serves `host`; a wildcard host must be matched by the same wildcard."""
    if host.startswith("*."):
        return host.lower() in (n.lower() for n in leaf.san_dns)
    return hostname_matches(host, leaf.san_dns, leaf.san_ips)


class SecretReplacement(BaseModel):
    """What `replace_tls_secret` did, for the audit artifact (serials, fingerprints and
    dates only)."""

    namespace: str
    name: str
    old_serial: str | None
    old_not_after: datetime | None
    old_fingerprint_sha256: str | None = None
    new_serial: str
    new_not_after: datetime
    new_fingerprint_sha256: str | None = None
    backup_secret: str | None
    resource_version: str | None
