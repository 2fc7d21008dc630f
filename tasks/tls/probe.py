"""Live TLS endpoints: read the certificate chain a server presents, without a request.

Python 3.11 only exposes the leaf (`getpeercert(binary_form=True)`);
`get_unverified_chain()` is public from 3.13 on. So the probe drives the handshake itself
through the public `MemoryBIO` API with TLS capped at 1.2, where the server's Certificate
message travels in clear, and reads the chain the server sent from the bytes it received.
The parsed leaf must equal the one `ssl` reports, or the chain is not trusted. A TLS
1.3-only server gets a second handshake and reports the leaf only, saying so.

Concurrency: `probe_many` / the `probe_tls_endpoints` task probe a batch on a thread pool
(each probe mostly waits on the network), one attempt each, returning failures as
outcomes; the flow then re-probes only the transient failures with `probe_tls_endpoint`,
which carries the retry policy. See docs/tls.md.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from cryptography import x509
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from tasks.errors import PermanentError, TransientError
from tasks.retry import RETRY_READ
from tasks.settings import TlsSettings
from tasks.tls.certs import SourceScan, describe_bundle


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
