"""Network latency as the runbooks see it: TCP connect time to each dependency.

Read-only: it opens a TCP connection and closes it at once, nothing is sent. Targets are
named by host and port only, never by a URL (which may carry credentials).
"""

from __future__ import annotations

import socket
import time

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from tasks.errors import PermanentError
from tasks.retry import RETRY_READ


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
