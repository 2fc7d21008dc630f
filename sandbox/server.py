"""Run a backend (or any sandbox app) with uvicorn in a background thread (tests, benches)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

import uvicorn
from starlette.types import ASGIApp

from sandbox.app import Backend


def free_port() -> int:
    """A loopback TCP port free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThreadedServer:
    """A started uvicorn serving `asgi` on 127.0.0.1:`port`; `stop()` ends it, then `close`."""

    def __init__(
        self,
        asgi: ASGIApp,
        close: Callable[[], None],
        port: int | None = None,
        host: str = "127.0.0.1",
        name: str = "sandbox-server",
    ) -> None:
        self.host = host
        self.port = port or free_port()
        self._close = close
        config = uvicorn.Config(
            asgi,
            host=host,
            port=self.port,
            log_level="warning",
            access_log=False,  # the backend writes its own access lines
            lifespan="off",
            # Requests parked in a sleep (a gateway "timeout") must not hold up a stop.
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=name, daemon=True)

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:43123."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> Self:
        """Start serving; returns once the socket accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self._thread.name} did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop serving and release the app's resources."""
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class BackendServer(ThreadedServer):
    """A started uvicorn serving `backend` on 127.0.0.1:`port`; `stop()` ends it."""

    def __init__(self, backend: Backend, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.backend = backend
        super().__init__(backend.asgi, backend.close, port, host, name="sandbox-backend")
