"""Run a backend instance with uvicorn in a background thread (tests, benches, demos)."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

import uvicorn

from sandbox.app import Backend


def free_port() -> int:
    """A loopback TCP port free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BackendServer:
    """A started uvicorn serving `backend` on 127.0.0.1:`port`; `stop()` ends it."""

    def __init__(self, backend: Backend, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.backend = backend
        self.host = host
        self.port = port or free_port()
        config = uvicorn.Config(
            backend.asgi,
            host=host,
            port=self.port,
            log_level="warning",
            access_log=False,  # the backend writes its own access lines
            lifespan="off",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, name="sandbox-backend", daemon=True
        )

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:43123."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> BackendServer:
        """Start serving; returns once the socket accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"sandbox backend did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop serving and release the backend's resources."""
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self.backend.close()

    def __enter__(self) -> BackendServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
