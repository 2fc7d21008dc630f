"""Network latency as the runbooks see it: TCP connect time to each dependency.

Read-only: it opens a TCP connection and closes it at once, nothing is sent. Targets are
named by host and port only, never by a URL (which may carry credentials).
"""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from tasks.clients import pg_target
from tasks.errors import PermanentError
from tasks.redis import redis_target
from tasks.retry import RETRY_READ
from tasks.settings import BackendSettings, PostgresSettings, RedisSettings


class ConnectTime(BaseModel):
    """TCP connect times to one host:port (`attempts` tries, each a fresh connection)."""

    name: str
    host: str
    port: int
    attempts: int
    failures: int
    error: str | None = Field(None, description="The last failure's type, when any failed.")
    min_ms: float | None = None
    median_ms: float | None = None
    max_ms: float | None = None


def connect_time(name: str, host: str, port: int, attempts: int, timeout_s: float) -> ConnectTime:
    """Connect `attempts` times; figures in ms over the successful ones (no task wrapper)."""
    if not 1 <= attempts <= 50:
        raise PermanentError(f"attempts must be between 1 and 50, not {attempts}")
    if not 0 < port < 65536:
        raise PermanentError(f"{name}: not a TCP port: {port}")
    times: list[float] = []
    failures = 0
    error: str | None = None
    for _ in range(attempts):
        start = time.perf_counter()
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                times.append(round((time.perf_counter() - start) * 1000, 3))
        except OSError as exc:
            failures += 1
            error = type(exc).__name__
    ordered = sorted(times)
    return ConnectTime(
        name=name,
        host=host,
        port=port,
        attempts=attempts,
        failures=failures,
        error=error,
        min_ms=ordered[0] if ordered else None,
        median_ms=ordered[len(ordered) // 2] if ordered else None,
        max_ms=ordered[-1] if ordered else None,
    )


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="tcp-connect-times")
def tcp_connect_times(
    targets: dict[str, tuple[str, int]], attempts: int = 5, timeout_s: float = 2.0
) -> list[ConnectTime]:
    """TCP connect time (min/median/max ms) to each named host:port; failures are counted."""
    return [
        connect_time(name, host, port, attempts, timeout_s)
        for name, (host, port) in sorted(targets.items())
    ]


def dependency_addresses() -> dict[str, tuple[str, int]]:
    """host:port of backend, PostgreSQL and Redis, from parsed fields (never a URL).

    A dependency whose address cannot be read is left out; the caller reports it.
    """
    out: dict[str, tuple[str, int]] = {}
    backend = urlsplit(BackendSettings().url)
    if backend.hostname:
        default = 443 if backend.scheme == "https" else 80
        out["backend"] = (backend.hostname, backend.port or default)
    host, _, rest = pg_target(PostgresSettings()).rpartition(":")
    port = rest.split("/", 1)[0]
    if host and port.isdigit() and not host.startswith("/"):
        out["postgres"] = (host.strip("[]"), int(port))
    try:
        host, _, rest = redis_target(RedisSettings()).rpartition(":")
    except Exception:  # noqa: BLE001 - a malformed URL: the Redis rows say so instead
        return out
    port = rest.split("/", 1)[0]
    if host and host != "?" and port.isdigit():
        out["redis"] = (host, int(port))
    return out
