"""The `make run` stack for a drill: `python -m deployments.cli run` on free loopback ports.

The same command `make run` executes (Prefect server on SQLite, every runbook of the real
catalog served, the receiver with its warm pool), configured through the environment only:
a temporary PREFECT_HOME, the drill's routing file, the drill's `RUNBOOKS_*` settings.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from drills.procs import free_port, spawn, stop, wait_http

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Stack:
    """Where the running stack answers."""

    api_url: str
    receiver_url: str
    token: str
    home: Path

    @property
    def journal(self) -> Path:
        """The receiver's journal (`deployments.cli receiver` puts it under the home)."""
        return self.home / "receiver-journal.sqlite3"


def new_token() -> str:
    """The receiver's bearer token for one drill (Alertmanager gets it in a 0600 file)."""
    return secrets.token_urlsafe(24)


def _wait_deployment(api_url: str, name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    body = {"deployments": {"name": {"any_": [name]}}}
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            r = httpx.post(f"{api_url}/deployments/filter", json=body, timeout=5)
            if r.status_code == 200 and r.json():
                return
        time.sleep(0.5)
    raise RuntimeError(f"deployment {name!r} not served after {timeout_s:.0f} s")


@contextlib.contextmanager
def running_stack(
    home: Path,
    *,
    routing: Path,
    env: Mapping[str, str],
    deployments: tuple[str, ...],
    pool_size: int = 1,
    timeout_s: float = 180.0,
) -> Iterator[Stack]:
    """Start the stack; wait for the API, the receiver's warm pool and `deployments`."""
    home.mkdir(parents=True, exist_ok=True)
    prefect_port, receiver_port = free_port(), free_port()
    token = new_token()
    child = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RUNBOOKS_"))}
    child.update(
        {
            "RUNBOOKS_STACK_HOME": str(home),
            "RUNBOOKS_STACK_PREFECT_PORT": str(prefect_port),
            "RUNBOOKS_STACK_STARTUP_TIMEOUT_S": str(timeout_s),
            "RUNBOOKS_RECEIVER_PORT": str(receiver_port),
            "RUNBOOKS_RECEIVER_TOKEN": token,
            "RUNBOOKS_RECEIVER_POOL_SIZE": str(pool_size),
            "RUNBOOKS_RECEIVER_ROUTING_FILE": str(routing),
            "PYTHONUNBUFFERED": "1",
            **env,
        }
    )
    proc = spawn(
        "make run stack",
        [sys.executable, "-m", "deployments.cli", "run"],
        home / "stack.log",
        env=child,
        cwd=ROOT,
    )
    stack = Stack(
        f"http://127.0.0.1:{prefect_port}/api", f"http://127.0.0.1:{receiver_port}", token, home
    )
    try:
        wait_http(proc, f"{stack.api_url}/health", timeout_s)
        wait_http(
            proc,
            f"{stack.receiver_url}/healthz",
            timeout_s,
            lambda r: r.status_code == 200 and r.json()["warm_idle"] >= pool_size,
        )
        for name in deployments:
            _wait_deployment(stack.api_url, name, timeout_s)
        yield stack
    finally:
        stop(proc, timeout_s=60)  # the CLI stops its parts in order on SIGTERM
