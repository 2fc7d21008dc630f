"""Certificates: the models, parsing, description, chain checks and the severity mapping.

Severity of one certificate (`evaluate`), worst reason wins; thresholds come from
`TlsSettings` (`RUNBOOKS_TLS_*`) or the flow parameters:

    critical  expired, not yet valid, < `emergency_hours` (24 h) left, revoked, or an
              endpoint whose certificate does not cover the host name: clients fail now
              (page, < 15 min)
    high      <= `high_days` (7) left, or the presented chain is out of order, broken or
              incomplete
    medium    <= `medium_days` (14) left, RSA key < 2048 bits, SHA-1/MD5 signature
    low       <= max(`warn_days`) (30) left, or < `lifetime_fraction_warn` (1/3) of the
              lifetime left: cert-manager renews at 2/3, so it should have renewed by now;
              revocation status unknown (a responder or CRL that could not be reached)
    ok        none of the above

`crossed_days` names the smallest alert threshold of `warn_days` (30/14/7/3/1) crossed,
so an alert can say "the 7-day threshold". Pure logic: no I/O in this module.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtensionOID, SignatureAlgorithmOID
from pydantic import BaseModel, Field
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from service_identity.exceptions import CertificateError, VerificationError
from service_identity.hazmat import (
    DNS_ID,
    DNSPattern,
    IPAddress_ID,
    IPAddressPattern,
    verify_service_identity,
)

from tasks.errors import PermanentError
from tasks.settings import TlsSettings


class Severity(StrEnum):
    """The on-call runbook's escalation levels (critical < 15 min, high < 1 h, medium < 4 h,
    low < 1 d)."""

    OK = "ok"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {
    Severity.OK: 0,
    Severity.LOW: 1,
    Severity.MEDIUM: 2,
    Severity.HIGH: 3,
    Severity.CRITICAL: 4,
}


def worst(severities: Iterable[Severity]) -> Severity:
    """The most severe of `severities` (`ok` when empty)."""
    return max(severities, key=lambda s: s.rank, default=Severity.OK)


class Thresholds(BaseModel):
    """When a certificate becomes worth an alert, and how loud (see the module docstring)."""

    warn_days: list[int] = Field(
        default_factory=lambda: [30, 14, 7, 3, 1],
        description="Alert thresholds in days; crossing any one fails the check.",
    )
    emergency_hours: float = Field(24.0, gt=0, description="Below this, or expired: critical.")
    high_days: float = Field(7.0, gt=0, description="At most this many days left: high.")
    medium_days: float = Field(14.0, gt=0, description="At most this many days left: medium.")
    lifetime_fraction_warn: float = Field(
        1 / 3, ge=0, le=1, description="Below this fraction of lifetime left: at least low."
    )

    @classmethod
    def from_settings(cls, settings: TlsSettings | None = None) -> Thresholds:
        s = settings or TlsSettings()
        return cls(
            warn_days=s.warn_days,
            emergency_hours=s.emergency_hours,
            high_days=s.high_days,
            medium_days=s.medium_days,
            lifetime_fraction_warn=s.lifetime_fraction_warn,
        )


class CertificateInfo(BaseModel):
    """One certificate as found in one source; position 0 is the leaf."""

    source: str = Field(description="File path, host:port or namespace/secret.")
    kind: Literal["file", "endpoint", "secret"]
    position: int = Field(0, description="Index in the file / presented chain; 0 = leaf.")
    subject: str
    issuer: str
    serial: str = Field(description="Serial number, hex.")
    fingerprint_sha256: str
    san_dns: list[str] = Field(default_factory=list)
    san_ips: list[str] = Field(default_factory=list)
    not_before: datetime
    not_after: datetime
    checked_at: datetime
    days_left: float = Field(description="Days until not_after at checked_at (negative: expired).")
    lifetime_fraction_left: float = Field(description="0..1 of not_before..not_after left.")
    key_type: str
    key_size: int | None
    signature_algorithm: str
    self_signed: bool
    is_ca: bool
    hostname: str | None = Field(None, description="Host name checked (endpoints only).")
    hostname_match: bool | None = Field(None, description="None where not applicable.")
    chain_problems: list[str] = Field(default_factory=list)
    revocation: Literal["good", "revoked", "unknown", "none", "off"] | None = Field(
        None, description="None: not checked (files, Secrets); see tasks/tls/revocation.py."
    )
    revocation_detail: str = ""

    @property
    def sans(self) -> list[str]:
        return [f"DNS:{n}" for n in self.san_dns] + [f"IP:{ip}" for ip in self.san_ips]


class Finding(BaseModel):
    """The verdict on one certificate."""

    source: str
    kind: Literal["file", "endpoint", "secret"]
    position: int
    subject: str
    serial: str
    not_after: datetime
    days_left: float
    severity: Severity
    crossed_days: int | None = Field(None, description="Smallest warn_days threshold crossed.")
    reasons: list[str] = Field(default_factory=list)


class SourceScan(BaseModel):
    """What one source presented: its certificates, and how the probe went."""

    source: str
    kind: Literal["file", "endpoint", "secret"]
    certificates: list[CertificateInfo]
    tls_version: str | None = None
    chain_observed: bool = Field(True, description="False: only the leaf could be seen.")
    chain_in_order: bool | None = Field(None, description="Each one issued by the next.")
    chain_complete: bool | None = Field(
        None, description="Endpoints: every issuer up to a CA certificate was presented."
    )
    ocsp_stapled: bool | None = Field(None, description="The server stapled an OCSP answer.")
    note: str = ""
    resource_version: str | None = Field(None, description="Kubernetes Secret version read.")
    elapsed_s: float = 0.0


_SIG_NAMES = {
    value: name
    for name, value in vars(SignatureAlgorithmOID).items()
    if isinstance(value, x509.ObjectIdentifier)
}
_WEAK_SIG_MARKERS = ("SHA1", "MD5")


def _key_type(cert: x509.Certificate) -> tuple[str, int | None]:
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return "unknown", None
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA", key.key_size
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}", key.curve.key_size
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519", 256
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448", 456
    if isinstance(key, dsa.DSAPublicKey):
        return "DSA", key.key_size
    return type(key).__name__, None


def _sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    try:
        ext = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    except x509.ExtensionNotFound:
        return [], []
    san = ext.value
    assert isinstance(san, x509.SubjectAlternativeName)
    dns = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return dns, ips


def is_ca_cert(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value
    except x509.ExtensionNotFound:
        return False
    return bool(getattr(bc, "ca", False))


def issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """True when `parent`'s key signed `child` and the names line up."""
    if child.issuer != parent.subject:
        return False
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def lifetime_fraction_left(not_before: datetime, not_after: datetime, now: datetime) -> float:
    """Share of the validity period still ahead of `now`, clamped to 0..1."""
    total = (not_after - not_before).total_seconds()
    if total <= 0:
        return 0.0
    left = (not_after - now).total_seconds()
    return min(1.0, max(0.0, left / total))


def _identity(hostname: str) -> DNS_ID | IPAddress_ID | None:
    """The service_identity ID for `hostname` (an IP address, bracketed or not, or a DNS
    name; a trailing dot is the same name), or None when it is neither."""
    name = hostname.strip().strip("[]").rstrip(".")
    try:
        return IPAddress_ID(str(ipaddress.ip_address(name)))
    except ValueError:
        pass
    try:
        return DNS_ID(name)
    except (ValueError, TypeError, UnicodeError):
        return None


def hostname_matches(hostname: str, san_dns: Sequence[str], san_ips: Sequence[str]) -> bool:
    """RFC 6125 matching by `service_identity` against the SANs only (no CN fallback, as
    browsers and `ssl` do): exact names, or a `*` that is the whole left-most label and
    stands for exactly one label, never for a public suffix like `*.com`; IP addresses
    only against IP SANs."""
    patterns: list[DNSPattern | IPAddressPattern] = []
    for name in san_dns:
        # A pattern service_identity refuses (`*.com`, an IP written as a DNS name) can
        # match nothing; the other SANs still count.
        with contextlib.suppress(CertificateError, ValueError, UnicodeError):
            patterns.append(DNSPattern.from_bytes(name.rstrip(".").encode("idna")))
    for ip in san_ips:
        with contextlib.suppress(ValueError):
            patterns.append(IPAddressPattern(ipaddress.ip_address(ip)))
    return _verify(patterns, hostname)


def certificate_matches(cert: x509.Certificate, hostname: str) -> bool:
    """Whether `cert` is valid for `hostname` (DNS name or IP address), by
    `service_identity.cryptography` (`verify_certificate_hostname` / `_ip_address`)."""
    name = hostname.strip().strip("[]").rstrip(".")
    try:
        if isinstance(_identity(name), IPAddress_ID):
            verify_certificate_ip_address(cert, name)
        else:
            verify_certificate_hostname(cert, name)
    except (VerificationError, CertificateError, ValueError, TypeError, UnicodeError):
        # A mismatch, a certificate without SANs or a name that is no host name: the
        # certificate does not cover it.
        return False
    return True


def _verify(patterns: Sequence[DNSPattern | IPAddressPattern], hostname: str) -> bool:
    identity = _identity(hostname)
    if identity is None or not patterns:
        return False
    try:
        verify_service_identity(list(patterns), [identity], [])
    except (VerificationError, CertificateError):
        return False
    return True


def chain_problems(certs: Sequence[x509.Certificate]) -> list[list[str]]:
    """Problems per position of a presented chain: each one must be issued by the next."""
    problems: list[list[str]] = [[] for _ in certs]
    for i in range(len(certs) - 1):
        if issued_by(certs[i], certs[i + 1]):
            continue
        elsewhere = [
            k for k in range(len(certs)) if k not in (i, i + 1) and issued_by(certs[i], certs[k])
        ]
        where = (
            f"its issuer is at position #{elsewhere[0]}: chain out of order"
            if elsewhere
            else "chain broken or out of order"
        )
        problems[i].append(
            f"#{i} is not issued by #{i + 1} ({certs[i + 1].subject.rfc4514_string()}); {where}"
        )
    return problems


def chain_incomplete(certs: Sequence[x509.Certificate]) -> tuple[int, str] | None:
    """(position, why) when a presented chain is incomplete, or None when it is complete.

    Without a trust store the test is: a certificate that is neither a CA nor self-signed
    (the leaf) needs its issuer in the chain; a CA certificate may end the chain, since
    its issuer is the root clients hold. A leaf signed directly by a root and sent alone
    therefore counts as incomplete (rare; docs/tls.md)."""
    for i, cert in enumerate(certs):
        if is_ca_cert(cert) or cert.issuer == cert.subject:
            continue
        if not any(issued_by(cert, other) for k, other in enumerate(certs) if k != i):
            return i, (
                f"chain incomplete: the issuer of #{i} ({cert.issuer.rfc4514_string()}) "
                "was not presented"
            )
    return None


def describe(
    cert: x509.Certificate,
    *,
    source: str,
    kind: Literal["file", "endpoint", "secret"],
    position: int = 0,
    now: datetime | None = None,
    hostname: str | None = None,
    problems: list[str] | None = None,
) -> CertificateInfo:
    """Everything the runbook reports about one certificate (no secrets in a cert)."""
    now = now or datetime.now(UTC)
    not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    dns, ips = _sans(cert)
    key_type, key_size = _key_type(cert)
    self_signed = cert.issuer == cert.subject and issued_by(cert, cert)
    return CertificateInfo(
        source=source,
        kind=kind,
        position=position,
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=format(cert.serial_number, "x"),
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
        san_dns=dns,
        san_ips=ips,
        not_before=not_before,
        not_after=not_after,
        checked_at=now,
        days_left=(not_after - now).total_seconds() / 86400,
        lifetime_fraction_left=lifetime_fraction_left(not_before, not_after, now),
        key_type=key_type,
        key_size=key_size,
        signature_algorithm=_SIG_NAMES.get(
            cert.signature_algorithm_oid, cert.signature_algorithm_oid.dotted_string
        ),
        self_signed=self_signed,
        is_ca=is_ca_cert(cert),
        hostname=hostname if position == 0 else None,
        hostname_match=(
            certificate_matches(cert, hostname) if hostname is not None and position == 0 else None
        ),
        chain_problems=problems or [],
    )


def severity_for_days(days_left: float, th: Thresholds) -> Severity:
    """The time-left part of the mapping (see the module docstring)."""
    if days_left * 24 < th.emergency_hours:
        return Severity.CRITICAL
    if days_left <= th.high_days:
        return Severity.HIGH
    if days_left <= th.medium_days:
        return Severity.MEDIUM
    if th.warn_days and days_left <= max(th.warn_days):
        return Severity.LOW
    return Severity.OK


def crossed_threshold(days_left: float, warn_days: Sequence[int]) -> int | None:
    """The smallest alert threshold (in days) that `days_left` has reached, if any."""
    crossed = [d for d in warn_days if days_left <= d]
    return min(crossed) if crossed else None


def evaluate(info: CertificateInfo, th: Thresholds) -> Finding:
    """Map one certificate to a severity with the reasons, worst first."""
    graded: list[tuple[Severity, str]] = []
    left = human_days(info.days_left)
    if info.checked_at < info.not_before:
        graded.append((Severity.CRITICAL, f"not valid before {info.not_before:%Y-%m-%d %H:%M}Z"))
    if info.days_left <= 0:
        graded.append((Severity.CRITICAL, f"EXPIRED {human_days(-info.days_left)} ago"))
    else:
        by_days = severity_for_days(info.days_left, th)
        if by_days is not Severity.OK:
            graded.append((by_days, f"{left} left"))
        if info.lifetime_fraction_left < th.lifetime_fraction_warn:
            graded.append(
                (
                    Severity.LOW,
                    f"{info.lifetime_fraction_left:.0%} of lifetime left "
                    f"(< {th.lifetime_fraction_warn:.0%}: renewal overdue)",
                )
            )
    if info.hostname_match is False:
        graded.append((Severity.CRITICAL, f"does not cover host name {info.hostname!r}"))
    graded += [(Severity.HIGH, p) for p in info.chain_problems]
    if info.revocation == "revoked":
        graded.append((Severity.CRITICAL, f"REVOKED: {info.revocation_detail}"))
    elif info.revocation == "unknown":
        # Never "good" for want of an answer, but no page either: a warning.
        graded.append((Severity.LOW, f"revocation status unknown: {info.revocation_detail}"))
    if info.key_type == "RSA" and info.key_size is not None and info.key_size < 2048:
        graded.append((Severity.MEDIUM, f"weak RSA key ({info.key_size} bits)"))
    if any(m in info.signature_algorithm.upper() for m in _WEAK_SIG_MARKERS):
        graded.append((Severity.MEDIUM, f"weak signature ({info.signature_algorithm})"))
    graded.sort(key=lambda g: -g[0].rank)
    return Finding(
        source=info.source,
        kind=info.kind,
        position=info.position,
        subject=info.subject,
        serial=info.serial,
        not_after=info.not_after,
        days_left=info.days_left,
        severity=worst(s for s, _ in graded),
        crossed_days=crossed_threshold(info.days_left, th.warn_days),
        reasons=[r for _, r in graded],
    )


def human_days(days: float) -> str:
    if days < 2:
        return f"{days * 24:.1f} h"
    return f"{days:.1f} days"


_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\s*(?P<body>.*?)\s*-----END CERTIFICATE-----", re.DOTALL
)


def parse_certificates(data: bytes, origin: str) -> list[x509.Certificate]:
    """Certificates from PEM text (one or many blocks) or a single DER certificate.

    Raises `PermanentError` naming `origin`; the message never quotes the content, since
    a file may also hold a private key.
    """
    blocks = list(_PEM_CERT.finditer(data))
    if not blocks:
        if data[:1] == b"\x30":
            try:
                return [x509.load_der_x509_certificate(data)]
            except ValueError:
                raise PermanentError(f"{origin}: not a PEM or DER certificate") from None
        hint = " (it holds a private key but no certificate)" if b"PRIVATE KEY" in data else ""
        raise PermanentError(
            f"{origin}: no PEM certificate found; expected '-----BEGIN CERTIFICATE-----'{hint}"
        )
    certs = []
    for n, block in enumerate(blocks, start=1):
        try:
            der = base64.b64decode(block.group("body"), validate=False)
            certs.append(x509.load_der_x509_certificate(der))
        except (ValueError, binascii.Error) as exc:
            reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise PermanentError(
                f"{origin}: certificate block #{n} of {len(blocks)} is not a valid "
                f"certificate ({reason})"
            ) from None
    return certs


def describe_bundle(
    certs: Sequence[x509.Certificate],
    *,
    source: str,
    kind: Literal["file", "endpoint", "secret"],
    now: datetime | None = None,
    hostname: str | None = None,
) -> list[CertificateInfo]:
    """Describe a leaf-first bundle, with chain checks; a CA bundle (first cert a CA) is
    a list of independent trust anchors and gets no chain checks."""
    now = now or datetime.now(UTC)
    is_chain = bool(certs) and not is_ca_cert(certs[0])
    problems = chain_problems(certs) if is_chain else [[] for _ in certs]
    # What a server presents must be complete; a file or Secret may hold the leaf alone.
    incomplete = chain_incomplete(certs) if kind == "endpoint" else None
    if incomplete:
        problems[incomplete[0]].append(incomplete[1])
    return [
        describe(c, source=source, kind=kind, position=i, now=now, hostname=hostname, problems=p)
        for i, (c, p) in enumerate(zip(certs, problems, strict=True))
    ]
