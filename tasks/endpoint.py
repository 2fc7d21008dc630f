"""The platform's health as a user reaches it: one timed GET from outside the cluster.

The URL is the public one through the load balancer / ingress (`RUNBOOKS_OUTAGE_ENDPOINT_URL`)
when set, else the backend's own health URL (`RUNBOOKS_BACKEND_*`), and the result says
which. Read only; a transport failure is a finding (`ok` False), never an exception.
"""

from __future__ import annotations

import ssl
from typing import Literal

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.backend import Timings, timed_url
from tasks.errors import PermanentError
from tasks.settings import BackendSettings, OutageSettings

#: What a result says about where it looked.
Via = Literal["endpoint", "backend"]


class EndpointCheck(BaseModel):
    """One GET of the health URL: answered 2xx/3xx or not, and where the time went."""

    url: str
    via: Via
    ok: bool
    status_code: int | None = None
    detail: str
    timings: Timings | None = None


def health_url(outage: OutageSettings, backend: BackendSettings) -> tuple[str, Via]:
    """The URL a user's request takes (the endpoint), else the backend's health URL."""
    if outage.endpoint_url:
        return outage.endpoint_url, "endpoint"
    return backend.url.rstrip("/") + backend.health_path, "backend"


def endpoint_verify(outage: OutageSettings) -> ssl.SSLContext | bool:
    """How the endpoint's TLS is checked: its CA file when configured, else the system's."""
    if outage.endpoint_ca_file is None:
        return True
    if not outage.endpoint_ca_file.is_file():
        raise PermanentError(f"endpoint CA file {outage.endpoint_ca_file} not found")
    return ssl.create_default_context(cafile=str(outage.endpoint_ca_file))


def shown_url(url: str) -> str:
    """`url` without what may be a credential (user:password@, the query, the fragment)."""
    try:
        parts = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "<unparseable URL>"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.host}{port}{parts.path}"


@task(cache_policy=NO_CACHE, task_run_name="endpoint-health")
def endpoint_health(
    outage: OutageSettings | None = None, backend: BackendSettings | None = None
) -> EndpointCheck:
    """GET the health URL from outside, as a user does: 2xx/3xx is up (no retries: the
    caller polls with its own deadline)."""
    outage = outage or OutageSettings()
    backend = backend or BackendSettings()
    url, via = health_url(outage, backend)
    shown = shown_url(url)
    try:
        response, timings = timed_url(
            url, timeout_s=outage.endpoint_timeout_s, verify=endpoint_verify(outage)
        )
    except httpx.TransportError as exc:
        kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "unreachable"
        return EndpointCheck(url=shown, via=via, ok=False, detail=f"{kind}: {type(exc).__name__}")
    except ssl.SSLError as exc:
        return EndpointCheck(url=shown, via=via, ok=False, detail=f"TLS: {type(exc).__name__}")
    ok = response.status_code < 400
    return EndpointCheck(
        url=shown,
        via=via,
        ok=ok,
        status_code=response.status_code,
        detail=f"HTTP {response.status_code} in {timings.total_ms:.0f} ms",
        timings=timings,
    )
