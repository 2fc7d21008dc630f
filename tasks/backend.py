"""The backend's HTTP face: health, a latency sample, and whether responses are compressed.

All three only read (GET). A transport failure (refused, timeout) is a `TransientError`;
an HTTP error status is a finding, returned in the result, not raised.
"""

from __future__ import annotations

import ipaddress
import json
import math
import socket
import ssl
import threading
import time
from typing import Any

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from tasks.clients import backend_http
from tasks.errors import PermanentError, TransientError
from tasks.retry import RETRY_READ
from tasks.settings import BackendSettings

#: How much of a non-JSON body a result keeps (bodies can be huge, or HTML error pages).
BODY_PREVIEW = 300


class Timings(BaseModel):
    """Where the time of one request went, in milliseconds from its start, each figure
    including the ones before it, as `curl -w` reports them (None: not measured: an IP
    literal needs no lookup, plain HTTP no TLS, a kept-alive connection no connect)."""

    dns_ms: float | None = Field(None, description="Name resolved (curl's time_namelookup).")
    connect_ms: float | None = None
    tls_ms: float | None = Field(None, description="TLS handshake done (time_appconnect).")
    first_byte_ms: float | None = Field(None, description="Until the response headers.")
    total_ms: float


class HealthResult(BaseModel):
    """GET of the health endpoint."""

    url: str
    status_code: int
    ok: bool = Field(description="2xx.")
    status: str | None = Field(None, description="The body's own `status` field, if any.")
    failing_checks: list[str] = Field(
        default_factory=list, description="Names of `checks` entries whose `ok` is false."
    )
    summary: str = Field(description="Short, single-line view of the body.")
    timings: Timings


class LatencySample(BaseModel):
    """`count` sequential GETs of one path: percentiles in milliseconds."""

    url: str
    count: int
    errors: int = Field(description="Transport failures (no response).")
    status_counts: dict[str, int] = Field(default_factory=dict)
    min_ms: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    mean_ms: float | None = None


class CompressionResult(BaseModel):
    """Whether the backend compresses a response when the client accepts gzip."""

    url: str
    status_code: int
    content_encoding: str | None
    compressed: bool
    wire_bytes: int = Field(description="Bytes received (compressed size when compressed).")
    body_bytes: int = Field(description="Bytes after decoding.")
    vary: str | None = None


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (`q` in 0..100) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _summary(response: httpx.Response) -> tuple[str | None, list[str], str]:
    """(status field, failing check names, one-line summary) of a health body."""
    try:
        body: Any = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        text = " ".join(response.text.split())
        return None, [], text[:BODY_PREVIEW]
    if not isinstance(body, dict):
        return None, [], json.dumps(body)[:BODY_PREVIEW]
    status = body.get("status")
    checks = body.get("checks")
    failing: list[str] = []
    parts = [f"status={status}"] if status is not None else []
    if isinstance(checks, dict):
        for name, check in checks.items():
            ok = check.get("ok") if isinstance(check, dict) else check
            if ok is False or (isinstance(ok, str) and ok.lower() not in {"ok", "up", "true"}):
                failing.append(str(name))
            parts.append(f"{name}={'ok' if str(name) not in failing else 'FAIL'}")
    for key in ("release", "version"):
        if key in body:
            parts.append(f"{key}={body[key]}")
    summary = " ".join(parts) if parts else json.dumps(body)
    return (str(status) if status is not None else None), failing, summary[:BODY_PREVIEW]


def _timed_get(
    http: httpx.Client,
    path: str,
    *,
    start: float | None = None,
    dns_ms: float | None = None,
    **kwargs: Any,
) -> tuple[httpx.Response, Timings]:
    """GET with httpcore's trace: when the connection, TLS and headers were done."""
    marks: dict[str, float] = {}

    def trace(event: str, info: dict[str, Any]) -> None:
        marks.setdefault(event, time.perf_counter())

    start = time.perf_counter() if start is None else start
    extensions = {"trace": trace, **kwargs.pop("extensions", {})}
    response = http.get(path, extensions=extensions, **kwargs)
    response.read()
    end = time.perf_counter()

    def since(event: str) -> float | None:
        at = marks.get(event)
        return round((at - start) * 1000, 2) if at is not None else None

    timings = Timings(
        dns_ms=dns_ms,
        connect_ms=since("connection.connect_tcp.complete"),
        tls_ms=since("connection.start_tls.complete"),
        first_byte_ms=since("http11.receive_response_headers.complete"),
        total_ms=round((end - start) * 1000, 2),
    )
    return response, timings


def _resolve(host: str, port: int, timeout_s: float) -> str:
    """The first address `host` resolves to (the system resolver), within `timeout_s`.

    getaddrinfo has no timeout of its own: it runs in a daemon thread and is abandoned
    when late, so a dead resolver costs this call `timeout_s` and nothing more."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    found: list[str] = []
    failed: list[BaseException] = []

    def lookup() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            found.append(str(infos[0][4][0]))
        except (OSError, IndexError) as exc:
            failed.append(exc)

    worker = threading.Thread(target=lookup, name=f"resolve-{host}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if found:
        return found[0]
    if failed:
        raise httpx.ConnectError(f"{host}: name not resolved ({type(failed[0]).__name__})")
    raise httpx.ConnectTimeout(f"{host}: name not resolved within {timeout_s:g} s")


def timed_url(
    url: str, *, timeout_s: float, verify: ssl.SSLContext | bool = True
) -> tuple[httpx.Response, Timings]:
    """One GET of `url` split into DNS, connect, TLS, first byte and total, as a user's
    request goes: the name resolved first (timed), then a fresh connection to that address
    with the name kept for `Host` and TLS (SNI and certificate check). Each phase counts
    against `timeout_s`; a transport failure raises `httpx.TransportError`."""
    parts = httpx.URL(url)
    host = parts.host
    port = parts.port or (443 if parts.scheme == "https" else 80)
    start = time.perf_counter()
    address = _resolve(host, port, timeout_s)
    dns_ms = None if address == host else round((time.perf_counter() - start) * 1000, 2)
    left = max(0.05, timeout_s - (time.perf_counter() - start))
    # The address in the URL, the name in Host and SNI: the request a browser makes.
    direct = parts.copy_with(host=address)
    headers = {"Host": parts.netloc.decode("ascii")}
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    with httpx.Client(timeout=httpx.Timeout(left), verify=verify) as http:
        return _timed_get(
            http, str(direct), start=start, dns_ms=dns_ms, headers=headers, extensions=extensions
        )


def _transport_error(url: str, exc: httpx.TransportError) -> TransientError:
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "unreachable"
    return TransientError(f"backend {url} {kind}: {type(exc).__name__}")


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="backend-health")
def backend_health(settings: BackendSettings | None = None) -> HealthResult:
    """GET the health endpoint: status code, the body's verdict per check, and timings."""
    settings = settings or BackendSettings()
    url = settings.url.rstrip("/") + settings.health_path
    try:
        with backend_http(settings) as http:
            response, timings = _timed_get(http, settings.health_path)
    except httpx.TransportError as exc:
        raise _transport_error(url, exc) from None
    status, failing, summary = _summary(response)
    return HealthResult(
        url=url,
        status_code=response.status_code,
        ok=response.is_success,
        status=status,
        failing_checks=failing,
        summary=summary,
        timings=timings,
    )


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="backend-latency-{path}")
def latency_sample(
    path: str = "/api/health", count: int = 20, settings: BackendSettings | None = None
) -> LatencySample:
    """GET `path` `count` times in a row (one kept-alive connection): p50/p95/p99 in ms."""
    if not 1 <= count <= 1000:
        raise PermanentError(f"count must be between 1 and 1000, not {count}")
    if not path.startswith("/"):
        raise PermanentError(f"path must start with '/': {path!r}")
    settings = settings or BackendSettings()
    url = settings.url.rstrip("/") + path
    durations: list[float] = []
    statuses: dict[str, int] = {}
    errors = 0
    last_error: httpx.TransportError | None = None
    with backend_http(settings) as http:
        for _ in range(count):
            try:
                response, timings = _timed_get(http, path)
            except httpx.TransportError as exc:
                errors += 1
                last_error = exc
                continue
            durations.append(timings.total_ms)
            key = str(response.status_code)
            statuses[key] = statuses.get(key, 0) + 1
    if errors == count and last_error is not None:
        raise _transport_error(url, last_error)
    return LatencySample(
        url=url,
        count=count,
        errors=errors,
        status_counts=statuses,
        min_ms=min(durations, default=None),
        p50_ms=percentile(durations, 50),
        p95_ms=percentile(durations, 95),
        p99_ms=percentile(durations, 99),
        max_ms=max(durations, default=None),
        mean_ms=round(sum(durations) / len(durations), 2) if durations else None,
    )


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="backend-compression-{path}")
def compression_check(
    path: str = "/api/products", settings: BackendSettings | None = None
) -> CompressionResult:
    """GET `path` with `Accept-Encoding: gzip` and report the `Content-Encoding` served."""
    if not path.startswith("/"):
        raise PermanentError(f"path must start with '/': {path!r}")
    settings = settings or BackendSettings()
    url = settings.url.rstrip("/") + path
    try:
        with backend_http(settings) as http:
            response = http.get(path, headers={"Accept-Encoding": "gzip"})
            body = response.read()
    except httpx.TransportError as exc:
        raise _transport_error(url, exc) from None
    encoding = response.headers.get("content-encoding")
    return CompressionResult(
        url=url,
        status_code=response.status_code,
        content_encoding=encoding,
        compressed=bool(encoding) and encoding.lower() != "identity",
        wire_bytes=response.num_bytes_downloaded,
        body_bytes=len(body),
        vary=response.headers.get("vary"),
    )
