"""Authentication of the alert receiver: bearer token or basic auth, checked first.

Every request but `/healthz` is authenticated (constant-time compare) in an ASGI middleware
before its body is read, and the body is then read counting bytes (413 past the limit).
The route checks the credentials again (`deployments/receiver.py`). Never printed.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Paths that authenticate each request themselves (Slack signs its interactions and cannot
#: send our token); the body limit still applies to them.
SIGNED_PATHS = frozenset({"/slack/interactions"})


class Credentials:
    """Accepted credentials; compared in constant time, never printed."""

    def __init__(self, token: str | None, basic_user: str | None, basic_pw: str | None) -> None:
        if not token and not (basic_user and basic_pw):
            raise ValueError("the receiver needs a bearer token or basic-auth credentials")
        self._token = token.encode() if token else None
        self._basic = f"{basic_user}:{basic_pw}".encode() if basic_user and basic_pw else None

    def __repr__(self) -> str:
        return "Credentials(***)"

    def check(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        given = value.strip().encode()
        if scheme == "bearer" and self._token is not None:
            return hmac.compare_digest(given, self._token)
        if scheme == "basic" and self._basic is not None:
            try:
                decoded = base64.b64decode(given, validate=True)
            except (binascii.Error, ValueError):
                return False
            return hmac.compare_digest(decoded, self._basic)
        return False


def route_path(scope: Scope) -> str:
    """The path inside this app, whether it is served under a `root_path` or mounted.

    Servers and Starlette's `Mount` put the prefix in `root_path`; depending on the version,
    `path` still carries it (ASGI spec) or not. Either way, strip it: authentication must
    not depend on where the app is mounted.
    """
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path or "/"


class AuthFirst:
    """ASGI middleware: every request but `/healthz` is authenticated before anything else.

    Default deny: a request that is not exactly `/healthz` (inside this app) needs
    credentials, 401 otherwise, before its body is read or parsed. The body of an
    authenticated request is then read here, counting bytes, whatever its framing
    (Content-Length, chunked, or a stream with neither): 413 as soon as it exceeds
    `max_body`, so a sender that never ends its body cannot make us buffer it.
    """

    def __init__(self, app: ASGIApp, credentials: Credentials, max_body: int) -> None:
        self.app = app
        self.credentials = credentials
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # no websocket routes: refuse before accepting
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                took = (time.perf_counter() - started) * 1000
                headers = list(message.get("headers", []))
                headers.append((b"server-timing", f"receiver;dur={took:.2f}".encode()))
                message = {**message, "headers": headers}
            await send(message)

        if route_path(scope) == "/healthz":
            await self.app(scope, receive, timed_send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        signed = route_path(scope) in SIGNED_PATHS
        if not signed and not self.credentials.check(
            headers.get("authorization", b"").decode("latin-1")
        ):
            await _unauthorized()(scope, receive, send)
            return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _too_large()(scope, receive, send)
            return
        body = await self._read_body(receive)
        if body is None:  # over the limit: answered without reading the rest
            await _too_large()(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # http.disconnect, when the client goes

        await self.app(scope, replay, timed_send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it exceeds the limit."""
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _unauthorized() -> JSONResponse:
    return JSONResponse(
        {"detail": "unauthorized"},
        status_code=401,
        headers={"WWW-Authenticate": 'Bearer realm="alerts"'},
    )


def _too_large() -> JSONResponse:
    # Connection: close: the rest of the body is never read, so the connection cannot be
    # reused for another request.
    return JSONResponse(
        {"detail": "body too large"}, status_code=413, headers={"Connection": "close"}
    )
