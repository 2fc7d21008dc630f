"""A real TLS endpoint on a loopback port chosen in advance, whose certificate can be renewed.

The port is picked before Prometheus starts (its blackbox target is static) and nothing
listens on it until the drill's fault: the endpoint "appears". Renewal swaps the server's
`SSLContext` between handshakes, without closing the listener: the probe never sees the
port down, so the alert can only resolve because of the new certificate.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading


class TlsEndpoint:
    """Accepts TLS on 127.0.0.1:`port`; each connection: handshake, then closed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.handshakes = 0
        self._context: ssl.SSLContext | None = None
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self, context: ssl.SSLContext) -> None:
        """Listen from now on, presenting `context`'s certificate chain."""
        self._context = context
        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        listener.settimeout(0.2)  # so that `stop` ends the accept loop promptly
        self._listener = listener
        self._thread = threading.Thread(target=self._serve, daemon=True, name="drill-tls")
        self._thread.start()

    def renew(self, context: ssl.SSLContext) -> None:
        """Present `context`'s chain from the next handshake on (the port stays open)."""
        self._context = context

    def _serve(self) -> None:
        listener = self._listener
        while listener is not None and listener.fileno() != -1:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by stop()
                return
            threading.Thread(target=self._handshake, args=(conn,), daemon=True).start()

    def _handshake(self, conn: socket.socket) -> None:
        context = self._context
        assert context is not None
        conn.settimeout(5)
        # A failed handshake (a port scan, a client giving up) is the client's business.
        with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True) as tls:
            self.handshakes += 1
            with contextlib.suppress(OSError):
                tls.recv(1)  # the client hangs up first, as after any probe
        conn.close()

    def stop(self) -> None:
        """Stop listening (idempotent); the port refuses connections again."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
