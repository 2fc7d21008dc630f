"""TLS certificates: read them from PEM files, live endpoints and Kubernetes TLS Secrets.

Severity of one certificate (`evaluate`), worst reason wins; thresholds come from
`TlsSettings` (`RUNBOOKS_TLS_*`) or the flow parameters:

    critical  expired, not yet valid, < `emergency_hours` (24 h) left, or an endpoint whose
              certificate does not cover the host name: clients fail now (page, < 15 min)
    high      <= `high_days` (7) left, or the presented chain is out of order / broken
    medium    <= `medium_days` (14) left, RSA key < 2048 bits, SHA-1/MD5 signature
    low       <= max(`warn_days`) (30) left, or < `lifetime_fraction_warn` (1/3) of the
              lifetime left: cert-manager renews at 2/3, so it should have renewed by now
    ok        none of the above

`crossed_days` names the smallest alert threshold of `warn_days` (30/14/7/3/1) crossed,
so an alert can say "the 7-day threshold".

Live endpoints: Python 3.11 only exposes the leaf (`getpeercert(binary_form=True)`);
`get_unverified_chain()` is public from 3.13 on. So the probe drives the handshake itself
through the public `MemoryBIO` API with TLS capped at 1.2, where the server's Certificate
message travels in clear, and reads the chain the server sent from the bytes it received.
The parsed leaf must equal the one `ssl` reports, or the chain is not trusted. A TLS
1.3-only server gets a second handshake and reports the leaf only, saying so.

Concurrency: `probe_many` / the `probe_tls_endpoints` task probe a batch on a thread pool
(each probe mostly waits on the network), one attempt each, returning failures as
outcomes; the flow then re-probes only the transient failures with `probe_tls_endpoint`,
which carries the retry policy. See docs/tls.md.

Private keys are read only to validate a replacement pair; they never reach a log, an
exception message, a return value or an artifact.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import urllib3
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtensionOID, SignatureAlgorithmOID
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field, SecretStr

from tasks.clients import kube_api_client, kube_request_timeout
from tasks.errors import PermanentError, SafetyViolation, TransientError
from tasks.retry import RETRY_READ
from tasks.settings import KubernetesSettings, TlsSettings

# ---------------------------------------------------------------------------- models


class Severity(StrEnum):
    """The seed's escalation levels (critical < 15 min, high < 1 h, medium < 4 h, low < 1 d)."""

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
    note: str = ""
    resource_version: str | None = Field(None, description="Kubernetes Secret version read.")
    elapsed_s: float = 0.0


class Endpoint(BaseModel):
    """A live TLS endpoint: where to connect, and which name to ask for (SNI) and check."""

    host: str
    port: int = Field(443, ge=1, le=65535)
    server_name: str | None = Field(None, description="SNI + hostname check; default host.")

    @property
    def name(self) -> str:
        return self.server_name or self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        prefix = f"{self.server_name}@" if self.server_name else ""
        return f"{prefix}{host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """`host`, `host:port`, `[v6]:port`, or `sni-name@host:port` (connect to host, ask
        for and check sni-name)."""
        spec = text.strip()
        server_name: str | None = None
        if "@" in spec:
            server_name, spec = spec.split("@", 1)
        m = re.fullmatch(
            r"\[(?P<v6>[0-9A-Fa-f:.]+)\](?::(?P<p6>\d+))?|(?P<h>[^:\[\]\s]+)(?::(?P<p>\d+))?", spec
        )
        if not m or (server_name is not None and not server_name):
            raise PermanentError(f"endpoint {text!r} is not host:port or name@host:port")
        host = m.group("v6") or m.group("h")
        port = int(m.group("p6") or m.group("p") or 443)
        if not 1 <= port <= 65535:
            raise PermanentError(f"endpoint {text!r}: port {port} out of range")
        return cls(host=host, port=port, server_name=server_name)


# ------------------------------------------------------------------- certificate logic

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


def _is_ca(cert: x509.Certificate) -> bool:
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


def hostname_matches(hostname: str, san_dns: Sequence[str], san_ips: Sequence[str]) -> bool:
    """RFC 6125 matching against the SANs only (no CN fallback, as browsers and `ssl` do):
    exact names, or a `*` that is the whole left-most label and stands for exactly one
    label, never for a public suffix like `*.com`; IP addresses only against IP SANs."""
    try:
        ip = ipaddress.ip_address(hostname.strip("[]"))
    except ValueError:
        ip = None
    if ip is not None:
        return any(_same_ip(ip, candidate) for candidate in san_ips)
    host = hostname.rstrip(".").lower()
    if not host:
        return False
    for pattern in san_dns:
        p = pattern.rstrip(".").lower()
        if p == host and "*" not in p:
            return True
        if p.startswith("*.") and "*" not in p[2:] and p[2:].count(".") >= 1:
            first, _, rest = host.partition(".")
            if first and rest == p[2:]:
                return True
    return False


def _same_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, candidate: str) -> bool:
    try:
        return ipaddress.ip_address(candidate) == ip
    except ValueError:
        return False


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
        is_ca=_is_ca(cert),
        hostname=hostname if position == 0 else None,
        hostname_match=(
            hostname_matches(hostname, dns, ips) if hostname is not None and position == 0 else None
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
    left = _human(info.days_left)
    if info.checked_at < info.not_before:
        graded.append((Severity.CRITICAL, f"not valid before {info.not_before:%Y-%m-%d %H:%M}Z"))
    if info.days_left <= 0:
        graded.append((Severity.CRITICAL, f"EXPIRED {_human(-info.days_left)} ago"))
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


def _human(days: float) -> str:
    if days < 2:
        return f"{days * 24:.1f} h"
    return f"{days:.1f} days"


# ------------------------------------------------------------------------- PEM parsing

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
    is_chain = bool(certs) and not _is_ca(certs[0])
    problems = chain_problems(certs) if is_chain else [[] for _ in certs]
    return [
        describe(c, source=source, kind=kind, position=i, now=now, hostname=hostname, problems=p)
        for i, (c, p) in enumerate(zip(certs, problems, strict=True))
    ]


_CERT_SUFFIXES = {".pem", ".crt", ".cer", ".cert", ".der"}


def expand_cert_paths(paths: Iterable[Path]) -> list[Path]:
    """Files as given; directories become their certificate files (not recursive),
    symlinks to the same file counted once. Missing paths stay, to be reported."""
    seen: set[Path] = set()
    out: list[Path] = []
    for path in paths:
        candidates = (
            sorted(p for p in path.iterdir() if p.suffix.lower() in _CERT_SUFFIXES and p.is_file())
            if path.is_dir()
            else [path]
        )
        for c in candidates:
            key = c.resolve() if c.exists() else c
            if key not in seen:
                seen.add(key)
                out.append(c)
    return out


def read_pem_file(path: Path, now: datetime | None = None) -> SourceScan:
    """Read and describe the certificates in one PEM/DER file."""
    started = time.monotonic()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PermanentError(f"{path}: file not found") from None
    except OSError as exc:
        raise PermanentError(
            f"{path}: cannot read ({exc.strerror or type(exc).__name__})"
        ) from None
    certs = parse_certificates(data, str(path))
    return SourceScan(
        source=str(path),
        kind="file",
        certificates=describe_bundle(certs, source=str(path), kind="file", now=now),
        elapsed_s=time.monotonic() - started,
    )


# ---------------------------------------------------------------------- live endpoints

_MAX_HANDSHAKE_BYTES = 1 << 20


def _certificate_message(received: bytes) -> list[bytes] | None:
    """The DER certificates of the first TLS 1.2 Certificate handshake message in
    `received` (server-to-client bytes), or None when there is none in clear text."""
    handshake = bytearray()
    i = 0
    while i + 5 <= len(received):
        content_type, length = received[i], int.from_bytes(received[i + 3 : i + 5], "big")
        if i + 5 + length > len(received):
            break
        if content_type == 20:  # ChangeCipherSpec: all that follows is encrypted
            break
        if content_type == 22:
            handshake += received[i + 5 : i + 5 + length]
        i += 5 + length
    j = 0
    while j + 4 <= len(handshake):
        msg_type, msg_len = handshake[j], int.from_bytes(handshake[j + 1 : j + 4], "big")
        body = bytes(handshake[j + 4 : j + 4 + msg_len])
        j += 4 + msg_len
        if msg_type != 11:  # Certificate
            continue
        if len(body) < 3:
            return None
        end = 3 + int.from_bytes(body[:3], "big")
        k, certs = 3, []
        while k + 3 <= min(end, len(body)):
            cert_len = int.from_bytes(body[k : k + 3], "big")
            certs.append(body[k + 3 : k + 3 + cert_len])
            k += 3 + cert_len
        return certs
    return None


def _handshake(
    endpoint: Endpoint, deadline: float, *, tls12_only: bool
) -> tuple[list[bytes], str | None, bool]:
    """One handshake (no verification: we want to see what is served, even if broken).

    Returns (DER certificates leaf first, TLS version, whether that is the whole chain).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls12_only:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=endpoint.name)
    received = bytearray()

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    with socket.create_connection((endpoint.host, endpoint.port), timeout=remaining()) as sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pending = outgoing.read()
                if pending:
                    sock.settimeout(remaining())
                    sock.sendall(pending)
                sock.settimeout(remaining())
                data = sock.recv(65536)
                if not data:
                    raise ConnectionResetError("connection closed during the handshake") from None
                if len(received) < _MAX_HANDSHAKE_BYTES:
                    received += data
                incoming.write(data)
        leaf = tls.getpeercert(binary_form=True)
        version = tls.version()
        # Say goodbye politely; the server's answer is not worth waiting for.
        with contextlib.suppress(ssl.SSLError):
            tls.unwrap()
        pending = outgoing.read()
        if pending:
            with contextlib.suppress(OSError):
                sock.sendall(pending)
    if not leaf:
        raise ssl.SSLError("the server presented no certificate")
    chain = _certificate_message(bytes(received)) if version != "TLSv1.3" else None
    if chain and chain[0] == leaf:
        return chain, version, True
    return [leaf], version, False


def fetch_endpoint(
    endpoint: Endpoint | str, timeout_s: float = 5.0, now: datetime | None = None
) -> SourceScan:
    """Connect (SNI = server name), read the presented chain and describe it.

    Raises `TransientError` on timeout / refused / reset (a later try may work) and
    `PermanentError` when the peer does not speak TLS we can read or the name is unknown.
    """
    ep = Endpoint.parse(endpoint) if isinstance(endpoint, str) else endpoint
    started = time.monotonic()
    deadline = started + timeout_s
    note = ""
    try:
        try:
            ders, version, whole = _handshake(ep, deadline, tls12_only=True)
        except (ssl.SSLError, ConnectionResetError):
            # Likely a TLS 1.3-only server refusing a 1.2 hello (an alert, or just a
            # hang-up): the chain is then encrypted, see the module docstring.
            ders, version, whole = _handshake(ep, deadline, tls12_only=False)
            note = "TLS 1.3 only: leaf seen, chain not observable with Python 3.11"
    except TimeoutError:
        raise TransientError(
            f"{ep}: no TLS answer within {timeout_s:g} s (connect + handshake)"
        ) from None
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:  # the resolver itself is struggling: try again
            raise TransientError(f"{ep}: cannot resolve {ep.host!r} ({exc.strerror})") from None
        raise PermanentError(f"{ep}: cannot resolve {ep.host!r} ({exc.strerror})") from None
    except ssl.SSLError as exc:
        raise PermanentError(f"{ep}: TLS handshake failed ({exc.reason or exc})") from None
    except OSError as exc:
        raise TransientError(
            f"{ep}: connection failed ({exc.strerror or type(exc).__name__})"
        ) from None
    if not whole and not note:
        note = "only the leaf could be read from the handshake"
    certs = [x509.load_der_x509_certificate(d) for d in ders]
    infos = describe_bundle(certs, source=str(ep), kind="endpoint", now=now, hostname=ep.name)
    return SourceScan(
        source=str(ep),
        kind="endpoint",
        certificates=infos,
        tls_version=version,
        chain_observed=whole,
        note=note,
        elapsed_s=time.monotonic() - started,
    )


class ProbeOutcome(BaseModel):
    """One endpoint's result in a batch probe: a scan, or the error that stopped it."""

    endpoint: str
    scan: SourceScan | None = None
    error: str | None = None
    transient: bool = Field(False, description="True: timeout / refused; worth another try.")


def probe_many(
    endpoints: Sequence[str], timeout_s: float = 5.0, max_workers: int = 64
) -> list[ProbeOutcome]:
    """Probe `endpoints` concurrently (threads: each probe mostly waits on the network),
    one attempt each; errors come back as outcomes so one endpoint never hides another."""

    def one(endpoint: str) -> ProbeOutcome:
        try:
            return ProbeOutcome(endpoint=endpoint, scan=fetch_endpoint(endpoint, timeout_s))
        except TransientError as exc:
            return ProbeOutcome(endpoint=endpoint, error=str(exc), transient=True)
        except PermanentError as exc:
            return ProbeOutcome(endpoint=endpoint, error=str(exc))

    if not endpoints:
        return []
    with ThreadPoolExecutor(max_workers=min(max_workers, len(endpoints))) as pool:
        return list(pool.map(one, endpoints))


# ------------------------------------------------------------------ Kubernetes Secrets

TLS_SECRET_TYPE = "kubernetes.io/tls"  # noqa: S105 - a type name, not a secret


def _core_v1(settings: KubernetesSettings | None) -> Any:
    return k8s.CoreV1Api(kube_api_client(settings))


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
        secret = _core_v1(settings).read_namespaced_secret(
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


# --------------------------------------------------------------- replacing a TLS pair


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
    if _is_ca(certs[0]):
        problems.append("the first certificate is a CA; tls.crt must start with the leaf")
    for info in infos:
        problems += [f"chain: {p}" for p in info.chain_problems]
        if info.days_left <= 0:
            problems.append(f"#{info.position} ({info.subject}) has expired")
        if info.checked_at < info.not_before:
            problems.append(f"#{info.position} ({info.subject}) is not valid yet")
    if 0 < leaf.days_left < min_days_left:
        problems.append(f"new leaf has only {_human(leaf.days_left)} left")
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
    """What `replace_tls_secret` did, for the audit artifact (serials and dates only)."""

    namespace: str
    name: str
    old_serial: str | None
    old_not_after: datetime | None
    new_serial: str
    new_not_after: datetime
    backup_secret: str | None
    resource_version: str | None


def write_tls_secret(
    namespace: str,
    name: str,
    pair: NewPair,
    expected_resource_version: str,
    settings: KubernetesSettings | None = None,
    now: datetime | None = None,
) -> SecretReplacement:
    """Back up the current Secret, then replace its tls.crt/tls.key with `pair`.

    The replace carries the resourceVersion read when the plan was made: if anything
    (cert-manager, a human) changed the Secret since, the API answers 409 and nothing is
    written. Re-validates the pair against the Secret as it is now.
    """
    now = now or datetime.now(UTC)
    what = f"secret {namespace}/{name}"
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
    api = _core_v1(settings)
    timeout = kube_request_timeout(settings)
    backup_name = f"{name}-backup-{now:%Y%m%d%H%M%S}"[:253]
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
    try:
        api.create_namespaced_secret(namespace, backup, _request_timeout=timeout)
        updated = api.replace_namespaced_secret(name, namespace, secret, _request_timeout=timeout)
    except ApiException as exc:
        if exc.status == 409:
            raise SafetyViolation(
                f"{what} changed while replacing it (409 Conflict); nothing more written"
            ) from None
        raise _kube_error(exc, what) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise _kube_error(exc, what) from None
    return SecretReplacement(
        namespace=namespace,
        name=name,
        old_serial=old_infos[0].serial,
        old_not_after=old_infos[0].not_after,
        new_serial=check.new[0].serial,
        new_not_after=check.new[0].not_after,
        backup_secret=backup_name,
        resource_version=updated.metadata.resource_version,
    )


# ---------------------------------------------------------------------------- tasks


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="read-cert-file-{path}")
def read_cert_file(path: Path) -> SourceScan:
    """Read the certificates in one PEM/DER file."""
    scan = read_pem_file(Path(path))
    get_run_logger().info("%s: %d certificate(s)", path, len(scan.certificates))
    return scan


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="probe-tls-{endpoint}")
def probe_tls_endpoint(endpoint: str, timeout_s: float | None = None) -> SourceScan:
    """Fetch and describe the certificate chain a live endpoint presents."""
    timeout = timeout_s if timeout_s is not None else TlsSettings().connect_timeout_s
    scan = fetch_endpoint(endpoint, timeout_s=timeout)
    get_run_logger().info(
        "%s: %s, %d certificate(s) presented", endpoint, scan.tls_version, len(scan.certificates)
    )
    return scan


# No retries here: transient failures come back as outcomes and the flow re-probes just
# those with `probe_tls_endpoint`, which carries the retry policy (attempts add, never nest).
@task(cache_policy=NO_CACHE, task_run_name="probe-tls-batch-{label}")
def probe_tls_endpoints(
    endpoints: list[str], timeout_s: float | None = None, label: str = ""
) -> list[ProbeOutcome]:
    """Probe many endpoints concurrently, one attempt each; failures come back as outcomes."""
    settings = TlsSettings()
    timeout = timeout_s if timeout_s is not None else settings.connect_timeout_s
    outcomes = probe_many(endpoints, timeout, settings.max_workers)
    failed = sum(1 for o in outcomes if o.error)
    get_run_logger().info("%d endpoint(s) probed, %d failed", len(outcomes), failed)
    return outcomes


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
) -> SecretReplacement:
    """Back up and replace a Kubernetes TLS Secret with a validated new pair (no retries:
    a half-known write is re-planned, not repeated)."""
    pair = load_new_pair(namespace, new_secret, new_cert_file, new_key_file, settings)
    done = write_tls_secret(namespace, name, pair, expected_resource_version, settings)
    get_run_logger().warning(
        "secret %s/%s replaced: serial %s → %s (backup %s)",
        namespace,
        name,
        done.old_serial,
        done.new_serial,
        done.backup_secret,
    )
    return done
