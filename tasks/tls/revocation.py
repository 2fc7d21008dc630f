"""Revocation: is a presented certificate revoked? OCSP (stapled, then online) and CRL.

Sources, each switchable off in `TlsSettings` (`RUNBOOKS_TLS_OCSP_STAPLING`, `_OCSP`,
`_CRL`) for air-gapped platforms:

    ocsp-stapled  the answer the server sent in its handshake (pyOpenSSL `request_ocsp`)
    ocsp          a request built with `cryptography.x509.ocsp`, POSTed with httpx to the
                  responder named in the certificate's AIA extension
    crl           the CRL from the certificate's distribution point, kept until its
                  nextUpdate

Every answer is checked before it counts: OCSP signed by the issuer itself or by a
responder certificate the issuer signed for OCSP signing, about this very certificate
(issuer name and key hashes, serial), thisUpdate not in the future and nextUpdate not
past; a CRL signed by the issuer, named after it, not past its nextUpdate. An answer that
fails a check, or a source that cannot be reached, gives "unknown", never "good".

Sources are asked in that order and the first definite answer (good or revoked) ends it:
a valid staple spares the online request, the CRL is the fallback of OCSP. The verdict:
revoked → `revoked`; good → `good`; only sources that could not answer → `unknown`; no
source in the certificate → `none`; its sources all switched off → `off`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID
from pydantic import BaseModel, Field

from tasks.settings import TlsSettings
from tasks.tls.certs import is_ca_cert, issued_by

Status = Literal["good", "revoked", "unknown", "none", "off"]

#: Clocks differ; an answer a little "from the future" is still fine.
_SKEW = timedelta(minutes=5)
#: OCSP answers are small, CRLs can be large but not unbounded.
_MAX_OCSP_BYTES = 64 * 1024
_MAX_CRL_BYTES = 32 * 1024 * 1024


class RevocationConfig(BaseModel):
    """Which revocation sources to ask, and how long to wait for each."""

    ocsp: bool = True
    crl: bool = True
    stapling: bool = True
    timeout_s: float = Field(3.0, gt=0)
    max_age_h: float = Field(168.0, gt=0, description="OCSP answer without nextUpdate.")

    @property
    def any(self) -> bool:
        return self.ocsp or self.crl or self.stapling

    @classmethod
    def from_settings(cls, settings: TlsSettings | None = None) -> RevocationConfig:
        s = settings or TlsSettings()
        return cls(
            ocsp=s.ocsp,
            crl=s.crl,
            stapling=s.ocsp_stapling,
            timeout_s=s.revocation_timeout_s,
            max_age_h=s.revocation_max_age_h,
        )

    @classmethod
    def off(cls) -> RevocationConfig:
        return cls(ocsp=False, crl=False, stapling=False)


class SourceAnswer(BaseModel):
    """What one source said about one certificate."""

    source: Literal["ocsp-stapled", "ocsp", "crl"]
    status: Literal["good", "revoked", "unknown"]
    detail: str


class Revocation(BaseModel):
    """The verdict on one certificate, with what each source said."""

    status: Status
    detail: str = ""
    answers: list[SourceAnswer] = Field(default_factory=list)


# ------------------------------------------------------------------------ helpers


def ocsp_urls(cert: x509.Certificate) -> list[str]:
    """The OCSP responder URLs (http/https) of the certificate's AIA extension."""
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess)
    except x509.ExtensionNotFound:
        return []
    return [
        d.access_location.value
        for d in aia.value
        if d.access_method == AuthorityInformationAccessOID.OCSP
        and isinstance(d.access_location, x509.UniformResourceIdentifier)
        and d.access_location.value.lower().startswith(("http://", "https://"))
    ]


def crl_urls(cert: x509.Certificate) -> list[str]:
    """The http/https URLs of the certificate's CRL distribution points (not LDAP)."""
    try:
        cdp = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    except x509.ExtensionNotFound:
        return []
    urls = []
    for point in cdp.value:
        for name in point.full_name or []:
            if isinstance(name, x509.UniformResourceIdentifier) and name.value.lower().startswith(
                ("http://", "https://")
            ):
                urls.append(name.value)
    return urls


def find_issuer(
    cert: x509.Certificate, chain: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    """The certificate of `chain` that signed `cert`, wherever it sits."""
    return next((c for c in chain if c is not cert and issued_by(cert, c)), None)


def _verify_signature(
    key: object, signature: bytes, data: bytes, algorithm: hashes.HashAlgorithm | None
) -> None:
    """Raise InvalidSignature unless `key` signed `data` (RSA PKCS#1 v1.5, ECDSA, EdDSA)."""
    if isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
        key.verify(signature, data, padding.PKCS1v15(), algorithm)
    elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
        key.verify(signature, data, ec.ECDSA(algorithm))
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        key.verify(signature, data)
    else:
        raise InvalidSignature(f"unsupported signer key {type(key).__name__}")


def _key_hash(cert: x509.Certificate) -> bytes:
    """SHA-1 of the certificate's subjectPublicKey bits (the OCSP ResponderID byKey)."""
    return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest


def _cert_id(
    cert: x509.Certificate, issuer: x509.Certificate, algorithm: hashes.HashAlgorithm
) -> tuple[bytes, bytes]:
    """(issuer name hash, issuer key hash) of the OCSP CertID for `cert` under `algorithm`;
    computed by cryptography's own request builder, so it matches what a responder sees."""
    request = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, algorithm).build()
    return request.issuer_name_hash, request.issuer_key_hash


def _ocsp_signer(response: ocsp.OCSPResponse, issuer: x509.Certificate) -> x509.Certificate | None:
    """Who may sign this answer: the issuer itself, or a certificate in the answer that the
    issuer signed with the OCSP-signing extended key usage (RFC 6960 §4.2.2.2)."""

    def named(c: x509.Certificate) -> bool:
        if response.responder_name is not None:
            return response.responder_name == c.subject
        return response.responder_key_hash == _key_hash(c)

    if named(issuer):
        return issuer
    for candidate in response.certificates:
        if not named(candidate) or not issued_by(candidate, issuer):
            continue
        try:
            eku = candidate.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        except x509.ExtensionNotFound:
            continue
        if ExtendedKeyUsageOID.OCSP_SIGNING in eku.value:
            now = datetime.now(UTC)
            if candidate.not_valid_before_utc <= now <= candidate.not_valid_after_utc:
                return candidate
    return None


def check_ocsp_response(
    der: bytes,
    cert: x509.Certificate,
    issuer: x509.Certificate,
    *,
    source: Literal["ocsp-stapled", "ocsp"],
    now: datetime | None = None,
    max_age: timedelta = timedelta(days=7),
) -> SourceAnswer:
    """The status an OCSP answer gives `cert`, once its signer, signature, subject and
    freshness are checked; any failed check gives "unknown"."""
    now = now or datetime.now(UTC)

    def unknown(why: str) -> SourceAnswer:
        return SourceAnswer(source=source, status="unknown", detail=why)

    try:
        response = ocsp.load_der_ocsp_response(der)
    except ValueError:
        return unknown("the answer is not a DER OCSP response")
    if response.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        return unknown(f"the responder answered {response.response_status.name}")
    signer = _ocsp_signer(response, issuer)
    if signer is None:
        return unknown("signed by neither the issuer nor a responder the issuer authorised")
    try:
        _verify_signature(
            signer.public_key(),
            response.signature,
            response.tbs_response_bytes,
            response.signature_hash_algorithm,
        )
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        return unknown("bad signature on the answer")
    for single in response.responses:
        if single.serial_number != cert.serial_number:
            continue
        try:
            ids = _cert_id(cert, issuer, single.hash_algorithm)
        except (ValueError, UnsupportedAlgorithm):
            continue
        if ids != (single.issuer_name_hash, single.issuer_key_hash):
            continue
        this_update, next_update = single.this_update_utc, single.next_update_utc
        if this_update > now + _SKEW:
            return unknown(f"the answer is dated in the future ({this_update:%Y-%m-%d %H:%M}Z)")
        if next_update is not None and next_update < now - _SKEW:
            return unknown(f"stale answer: nextUpdate {next_update:%Y-%m-%d %H:%M}Z has passed")
        if next_update is None and now - this_update > max_age:
            return unknown(f"stale answer: thisUpdate {this_update:%Y-%m-%d %H:%M}Z, no nextUpdate")
        status = single.certificate_status
        if status is ocsp.OCSPCertStatus.GOOD:
            until = f"{next_update:%Y-%m-%d %H:%M}Z" if next_update else "no nextUpdate"
            return SourceAnswer(source=source, status="good", detail=f"good (until {until})")
        if status is ocsp.OCSPCertStatus.REVOKED:
            when = single.revocation_time_utc
            reason = single.revocation_reason
            at = f" {when:%Y-%m-%d %H:%M}Z" if when else ""
            why = f" ({reason.name})" if reason else ""
            return SourceAnswer(source=source, status="revoked", detail=f"revoked{at}{why}")
        return unknown("the responder does not know this certificate")
    return unknown("the answer is not about this certificate")


# ---------------------------------------------------------------------- the network

_http_lock = threading.Lock()
_http_clients: dict[float, httpx.Client] = {}


def _http(timeout_s: float) -> httpx.Client:
    """One shared client per timeout: building one costs an SSL context (~10 ms), and a
    scan asks hundreds of times. httpx clients are thread-safe."""
    with _http_lock:
        client = _http_clients.get(timeout_s)
        if client is None:
            client = httpx.Client(
                timeout=httpx.Timeout(timeout_s),
                follow_redirects=True,
                max_redirects=3,
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
                headers={"User-Agent": "incident-runbooks cert-expiry"},
                trust_env=False,
            )
            _http_clients[timeout_s] = client
        return client


def _get_bytes(response: httpx.Response, limit: int) -> bytes:
    response.raise_for_status()
    body = response.content
    if len(body) > limit:
        raise ValueError(f"answer larger than {limit} bytes")
    return body


def _unreachable(exc: Exception) -> str:
    """An error as a short phrase: the type and the status, never a header or body."""
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.ConnectError):
        return "connection failed"
    return type(exc).__name__


def ask_ocsp(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    config: RevocationConfig,
    now: datetime | None = None,
) -> SourceAnswer | None:
    """POST an OCSP request to each AIA responder until one gives a checked answer; None
    when the certificate names no responder."""
    urls = ocsp_urls(cert)
    if not urls:
        return None
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(cert, issuer, hashes.SHA1())  # noqa: S303 - the CertID hash every responder knows (RFC 5019)
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    failures = []
    for url in urls:
        try:
            response = _http(config.timeout_s).post(
                url, content=request, headers={"Content-Type": "application/ocsp-request"}
            )
            der = _get_bytes(response, _MAX_OCSP_BYTES)
        except (httpx.HTTPError, ValueError) as exc:
            failures.append(f"{url}: unreachable ({_unreachable(exc)})")
            continue
        answer = check_ocsp_response(
            der,
            cert,
            issuer,
            source="ocsp",
            now=now,
            max_age=timedelta(hours=config.max_age_h),
        )
        if answer.status != "unknown":
            return answer
        failures.append(f"{url}: {answer.detail}")
    return SourceAnswer(source="ocsp", status="unknown", detail="; ".join(failures))


@dataclass
class _CachedCrl:
    crl: x509.CertificateRevocationList
    until: datetime


_crl_cache: dict[str, _CachedCrl] = {}
_crl_locks: dict[str, threading.Lock] = {}
_crl_cache_lock = threading.Lock()


def clear_crl_cache() -> None:
    """Forget every cached CRL (tests; a CRL re-issued before its nextUpdate)."""
    with _crl_cache_lock:
        _crl_cache.clear()


def _fetch_crl(url: str, config: RevocationConfig, now: datetime) -> x509.CertificateRevocationList:
    """The CRL at `url`, from the cache while its nextUpdate has not passed. One download
    per URL at a time: a scan of many endpoints under one CA fetches it once."""
    with _crl_cache_lock:
        lock = _crl_locks.setdefault(url, threading.Lock())
    with lock:
        cached = _crl_cache.get(url)
        if cached is not None and now < cached.until:
            return cached.crl
        body = _get_bytes(_http(config.timeout_s).get(url), _MAX_CRL_BYTES)
        try:
            crl = x509.load_der_x509_crl(body)
        except ValueError:
            crl = x509.load_pem_x509_crl(body)
        next_update = crl.next_update_utc
        if next_update is not None and next_update > now:
            with _crl_cache_lock:
                _crl_cache[url] = _CachedCrl(crl, next_update)
        return crl


def ask_crl(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    config: RevocationConfig,
    now: datetime | None = None,
) -> SourceAnswer | None:
    """Look `cert` up in the CRL of each distribution point until one checked CRL answers;
    None when the certificate names no (http) distribution point."""
    urls = crl_urls(cert)
    if not urls:
        return None
    now = now or datetime.now(UTC)
    failures = []
    for url in urls:
        try:
            crl = _fetch_crl(url, config, now)
        except (httpx.HTTPError, ValueError) as exc:
            failures.append(f"{url}: unreachable or unreadable ({_unreachable(exc)})")
            continue
        if crl.issuer != issuer.subject:
            failures.append(f"{url}: CRL issued by {crl.issuer.rfc4514_string()}, not the issuer")
            continue
        try:
            valid = crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
        except (TypeError, ValueError, UnsupportedAlgorithm):
            valid = False
        if not valid:
            failures.append(f"{url}: bad CRL signature")
            continue
        next_update = crl.next_update_utc
        if crl.last_update_utc > now + _SKEW:
            failures.append(f"{url}: CRL dated in the future")
            continue
        if next_update is not None and next_update < now - _SKEW:
            failures.append(f"{url}: stale CRL (nextUpdate {next_update:%Y-%m-%d %H:%M}Z)")
            continue
        entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        if entry is None:
            until = f"{next_update:%Y-%m-%d %H:%M}Z" if next_update else "no nextUpdate"
            return SourceAnswer(source="crl", status="good", detail=f"not listed (until {until})")
        reason = ""
        try:
            ext = entry.extensions.get_extension_for_class(x509.CRLReason)
            reason = f" ({ext.value.reason.name})"
        except x509.ExtensionNotFound:
            pass
        when = entry.revocation_date_utc
        return SourceAnswer(
            source="crl", status="revoked", detail=f"revoked {when:%Y-%m-%d %H:%M}Z{reason}"
        )
    return SourceAnswer(source="crl", status="unknown", detail="; ".join(failures))


# ------------------------------------------------------------------------ verdicts


def combine(answers: Sequence[SourceAnswer], *, has_sources: bool) -> Revocation:
    """One verdict from the sources' answers (module docstring)."""
    listed = list(answers)

    def text(picked: Sequence[SourceAnswer]) -> str:
        return "; ".join(f"{a.source}: {a.detail}" for a in picked)

    statuses: tuple[Status, ...] = ("revoked", "good", "unknown")
    for status in statuses:
        picked = [a for a in listed if a.status == status]
        if picked:
            return Revocation(status=status, detail=text(picked), answers=listed)
    if not has_sources:
        return Revocation(status="none", detail="no OCSP responder or CRL in the certificate")
    return Revocation(status="unknown", detail="no source answered", answers=listed)


def check_certificate(
    cert: x509.Certificate,
    chain: Sequence[x509.Certificate],
    config: RevocationConfig,
    *,
    stapled: bytes | None = None,
    now: datetime | None = None,
) -> Revocation:
    """The revocation verdict on `cert`, whose issuer must be in `chain`; a valid stapled
    answer spares the online OCSP request."""
    if not config.any:
        return Revocation(status="off", detail="revocation checks switched off")
    now = now or datetime.now(UTC)
    if cert.issuer == cert.subject:
        return Revocation(status="none", detail="self-signed: nothing can revoke it")
    has_sources = bool(
        (config.stapling and stapled)
        or (config.ocsp and ocsp_urls(cert))
        or (config.crl and crl_urls(cert))
    )
    if not has_sources:
        if not (ocsp_urls(cert) or crl_urls(cert) or stapled):
            return Revocation(status="none", detail="no OCSP responder or CRL in the certificate")
        return Revocation(status="off", detail="the certificate's sources are switched off")
    issuer = find_issuer(cert, chain)
    if issuer is None and is_ca_cert(cert):
        # An intermediate signed by a root the server (rightly) does not send: no key to
        # check answers with. Not a warning: that is every well-configured server.
        return Revocation(status="none", detail="its issuer (a root) was not presented")
    if issuer is None:
        return Revocation(
            status="unknown",
            detail="the issuer was not presented: no answer about this certificate can be checked",
        )
    answers: list[SourceAnswer] = []
    if config.stapling and stapled:
        answers.append(
            check_ocsp_response(
                stapled,
                cert,
                issuer,
                source="ocsp-stapled",
                now=now,
                max_age=timedelta(hours=config.max_age_h),
            )
        )
    stapled_ok = any(a.status != "unknown" for a in answers)
    if config.ocsp and not stapled_ok:
        online = ask_ocsp(cert, issuer, config, now)
        if online is not None:
            answers.append(online)
    # A definite OCSP answer is enough; the CRL is the fallback (and costs a download).
    if config.crl and not any(a.status != "unknown" for a in answers):
        listed = ask_crl(cert, issuer, config, now)
        if listed is not None:
            answers.append(listed)
    return combine(answers, has_sources=True)
