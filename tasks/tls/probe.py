"""Live TLS endpoints: read the certificate chain a server presents, without a request.

pyOpenSSL drives the handshake (any version, TLS 1.3 included) through memory BIOs over
a plain socket, so connect, handshake and goodbye share one deadline; the presented
chain comes from `Connection.get_peer_cert_chain()`, in the order the server sent it,
and the OCSP answer a server staples is kept for the revocation check
(`tasks/tls/revocation.py`). Host names are matched by `service_identity` (`certs.py`).

Concurrency: `probe_many` / the `probe_tls_endpoints` task probe a batch on a thread pool
(each probe mostly waits on the network), one attempt each, returning failures as
outcomes; the flow then re-probes only the transient failures with `probe_tls_endpoint`,
which carries the retry policy. See docs/tls.md.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import re
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from cryptography import x509
from OpenSSL import SSL
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from tasks.errors import PermanentError, TransientError
from tasks.retry import RETRY_READ
from tasks.settings import TlsSettings
from tasks.tls.certs import SourceScan, chain_incomplete, chain_problems, describe_bundle
from tasks.tls.revocation import RevocationConfig, check_certificate


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


class _Seen:
    """What the handshake left behind besides the chain: the stapled OCSP answer."""

    def __init__(self) -> None:
        self.staple: bytes | None = None


def _on_staple(conn: SSL.Connection, staple: bytes, _: object) -> bool:
    """OCSP-stapling callback: keep the answer for the revocation check; never abort the
    handshake here (a bad or revoked staple is judged later and reported)."""
    seen = conn.get_app_data()
    if isinstance(seen, _Seen) and staple:
        seen.staple = bytes(staple)
    return True


@functools.cache
def _context(stapling: bool) -> SSL.Context:
    """One client context per stapling choice, shared by every probe (OpenSSL contexts
    are thread-safe once set up). No verification on purpose: the runbook must see what
    is served, broken or not, over any TLS version and with any key (security level 0)."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_verify(SSL.VERIFY_NONE)
    ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    if stapling:
        ctx.set_ocsp_client_callback(_on_staple)
    return ctx


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def _handshake(
    endpoint: Endpoint, deadline: float, *, stapling: bool
) -> tuple[list[x509.Certificate], str, bytes | None]:
    """One handshake through pyOpenSSL memory BIOs over a plain socket (so every wait is
    bounded by `deadline`). Returns (the presented chain as sent, TLS version, staple)."""
    seen = _Seen()
    conn = SSL.Connection(_context(stapling), None)
    conn.set_app_data(seen)
    conn.set_connect_state()
    if not _is_ip(endpoint.name):  # RFC 6066: no IP addresses in SNI
        conn.set_tlsext_host_name(endpoint.name.encode("idna"))
    if stapling:
        conn.request_ocsp()

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    def flush(sock: socket.socket) -> None:
        while True:
            try:
                pending = conn.bio_read(65536)
            except SSL.WantReadError:
                return
            sock.settimeout(remaining())
            sock.sendall(pending)

    with socket.create_connection((endpoint.host, endpoint.port), timeout=remaining()) as sock:
        while True:
            try:
                conn.do_handshake()
                break
            except SSL.WantReadError:
                flush(sock)
                sock.settimeout(remaining())
                data = sock.recv(65536)
                if not data:
                    raise ConnectionResetError("connection closed during the handshake") from None
                conn.bio_write(data)
        chain = conn.get_peer_cert_chain(as_cryptography=True) or []
        version = conn.get_protocol_version_name()
        # Say goodbye politely; the server's answer is not worth waiting for.
        with contextlib.suppress(SSL.Error, OSError, TimeoutError):
            conn.shutdown()
            flush(sock)
    if not chain:
        raise SSL.Error("the server presented no certificate")
    return list(chain), version, seen.staple


def fetch_endpoint(
    endpoint: Endpoint | str,
    timeout_s: float = 5.0,
    now: datetime | None = None,
    revocation: RevocationConfig | None = None,
) -> SourceScan:
    """Connect (SNI = server name), read the presented chain, describe it and check the
    revocation of each certificate whose issuer was presented (`revocation`, default from
    settings; `RevocationConfig.off()` for none).

    Raises `TransientError` on timeout / refused / reset (a later try may work) and
    `PermanentError` when the peer does not speak TLS we can read or the name is unknown.
    A revocation source that cannot be reached never raises: its verdict is "unknown".
    """
    ep = Endpoint.parse(endpoint) if isinstance(endpoint, str) else endpoint
    config = revocation if revocation is not None else RevocationConfig.from_settings()
    started = time.monotonic()
    deadline = started + timeout_s
    try:
        certs, version, staple = _handshake(ep, deadline, stapling=config.stapling)
    except TimeoutError:
        raise TransientError(
            f"{ep}: no TLS answer within {timeout_s:g} s (connect + handshake)"
        ) from None
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_AGAIN:  # the resolver itself is struggling: try again
            raise TransientError(f"{ep}: cannot resolve {ep.host!r} ({exc.strerror})") from None
        raise PermanentError(f"{ep}: cannot resolve {ep.host!r} ({exc.strerror})") from None
    except UnicodeError:
        raise PermanentError(f"{ep}: {ep.name!r} is not a host name that SNI can carry") from None
    except SSL.SysCallError as exc:
        # The peer hung up mid-handshake (errno) or the socket failed: worth another try.
        raise TransientError(f"{ep}: connection failed during the TLS handshake ({exc})") from None
    except SSL.Error as exc:
        raise PermanentError(f"{ep}: TLS handshake failed ({_ssl_reason(exc)})") from None
    except OSError as exc:
        raise TransientError(
            f"{ep}: connection failed ({exc.strerror or type(exc).__name__})"
        ) from None
    infos = describe_bundle(certs, source=str(ep), kind="endpoint", now=now, hostname=ep.name)
    # Every certificate gets a verdict, "off" included: the report says what was not asked.
    verdicts = [
        check_certificate(cert, certs, config, stapled=staple if i == 0 else None, now=now)
        for i, cert in enumerate(certs)
    ]
    infos = [
        info.model_copy(update={"revocation": v.status, "revocation_detail": v.detail})
        for info, v in zip(infos, verdicts, strict=True)
    ]
    in_order = not any(p for p in chain_problems(certs))
    return SourceScan(
        source=str(ep),
        kind="endpoint",
        certificates=infos,
        tls_version=version,
        chain_observed=True,
        chain_in_order=in_order,
        chain_complete=chain_incomplete(certs) is None,
        ocsp_stapled=staple is not None if config.stapling else None,
        note="",
        elapsed_s=time.monotonic() - started,
    )


def _ssl_reason(exc: SSL.Error) -> str:
    """OpenSSL's reason strings (`wrong version number`), not the whole error tuple."""
    details = exc.args[0] if exc.args else None
    if isinstance(details, list):
        reasons = [str(d[2]) for d in details if isinstance(d, tuple) and len(d) == 3]
        if reasons:
            return "; ".join(reasons)
    return str(exc) or type(exc).__name__


class ProbeOutcome(BaseModel):
    """One endpoint's result in a batch probe: a scan, or the error that stopped it."""

    endpoint: str
    scan: SourceScan | None = None
    error: str | None = None
    transient: bool = Field(False, description="True: timeout / refused; worth another try.")


def probe_many(
    endpoints: Sequence[str],
    timeout_s: float = 5.0,
    max_workers: int = 64,
    revocation: RevocationConfig | None = None,
) -> list[ProbeOutcome]:
    """Probe `endpoints` concurrently (threads: each probe mostly waits on the network),
    one attempt each; errors come back as outcomes so one endpoint never hides another."""

    def one(endpoint: str) -> ProbeOutcome:
        try:
            scan = fetch_endpoint(endpoint, timeout_s, revocation=config)
            return ProbeOutcome(endpoint=endpoint, scan=scan)
        except TransientError as exc:
            return ProbeOutcome(endpoint=endpoint, error=str(exc), transient=True)
        except PermanentError as exc:
            return ProbeOutcome(endpoint=endpoint, error=str(exc))

    if not endpoints:
        return []
    config = revocation if revocation is not None else RevocationConfig.from_settings()
    with ThreadPoolExecutor(max_workers=min(max_workers, len(endpoints))) as pool:
        return list(pool.map(one, endpoints))


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
