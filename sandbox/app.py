"""The stand-in `akig-backend`: FastAPI over PostgreSQL with a Redis cache in front.

Everything is per instance (pool, Redis client, metrics registry, faults, release), so a
test can run several backends in one process. `create_backend()` returns the instance;
its `asgi` attribute is what uvicorn serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, cast
from urllib.parse import parse_qs

import anyio
import psycopg
import redis
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field
from starlette.middleware.gzip import GZipMiddleware
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandbox.faults import FaultPatch, Faults, FaultState
from sandbox.payments.router import add_payment_routes
from sandbox.payments.service import PaymentService
from sandbox.pool import Pool, PoolExhaustedError
from sandbox.release import BUGGY_RELEASES, ReleaseSource, release_source
from sandbox.security import add_security_routes
from sandbox.settings import SandboxSettings

#: Buckets of `http_request_duration_seconds`: fine below 1 s, where the p95 alert sits.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
UNMATCHED = "<unmatched>"
#: Every sandbox user's password (a test double: logins only need to succeed or fail).
LOGIN_PASSWORD = "sandbox-password"  # noqa: S105 - a test double's demo password


class LoginRequest(BaseModel):
    """`POST /api/login`: who logs in with which password."""

    user_id: int = Field(ge=1)
    password: str = Field(max_length=200)


class AccessLog:
    """One line per request, in the on-call runbook's shape, in `log_file` when set and on stdout
    when `stdout` is (by default only when there is no file)."""

    def __init__(self, log_file: Path | None, stdout: bool | None = None) -> None:
        self._lock = threading.Lock()
        self._file = log_file.open("a", encoding="utf-8") if log_file else None
        # In-process (tests, `make demo`) the terminal is the test runner's or the demo's:
        # thousands of lines there drown what matters. The file keeps them all.
        self._stdout = self._file is None if stdout is None else stdout

    def write(self, line: str) -> None:
        """Write one line."""
        with self._lock:
            if self._stdout:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
            if self._file is not None:
                self._file.write(line + "\n")
                self._file.flush()

    def close(self) -> None:
        """Close the log file."""
        if self._file is not None:
            self._file.close()


class Metrics:
    """This instance's Prometheus registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests by route template and status code.",
            ["route", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "http_request_duration_seconds",
            "HTTP request duration by route template.",
            ["route"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.cache = Counter(
            "akig_cache_requests_total",
            "Cache reads by result (hit, miss, error).",
            ["result"],
            registry=self.registry,
        )
        self.release = Gauge(
            "akig_release_info", "The running release.", ["release"], registry=self.registry
        )


class FillRequest(BaseModel):
    """Fill Redis with filler keys until `used_memory` reaches `fraction` of `maxmemory`."""

    fraction: float = Field(0.9, gt=0, le=0.99)
    value_kb: int = Field(64, ge=1, le=1024)


def route_template(routes: list[BaseRoute], scope: Scope) -> str:
    """The template of the route `scope` matches (`/api/users/{user_id}`), never the raw path."""
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return str(getattr(route, "path", UNMATCHED))
    return UNMATCHED


def request_user(routes: list[BaseRoute], scope: Scope) -> str | None:
    """The user a request is for: the matched route's `{user_id}`, else `?user_id=`."""
    for route in routes:
        match, child = route.matches(scope)
        if match == Match.FULL:
            found = (child.get("path_params") or {}).get("user_id")
            if found is not None:
                return str(found)
            break
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    values = query.get("user_id")
    return values[0] if values else None


def _delay_ms(faults: FaultState, route: str, user: str | None) -> float:
    """The injected delay of one /api request: everywhere, for its route, for its user."""
    extra = faults.route_latency_ms.get(route, 0.0)
    if user is not None:
        extra += faults.user_latency_ms.get(user, 0.0)
    return faults.latency_ms + extra


class Backend:
    """One backend instance: its app, pool, Redis client, metrics, faults, release, payments."""

    def __init__(self, settings: SandboxSettings, release: ReleaseSource | None = None) -> None:
        self.settings = settings
        self.pool = Pool(settings.database_dsn, settings.db_pool_size, settings.db_pool_wait_s)
        self.redis = redis.Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=1.0,
            socket_timeout=2.0,
            decode_responses=True,
        )
        self.metrics = Metrics()
        self.faults = Faults(gzip=settings.gzip)
        self.release = release or release_source(settings)
        self.log = AccessLog(settings.log_file, settings.log_stdout)
        self.payments = PaymentService(settings, self.pool, self.redis, self.metrics.registry)
        self.app = self._build_app()
        self.asgi: ASGIApp = _Instrument(self, _SwitchableGZip(self.app, self.faults))

    # -- state ---------------------------------------------------------------------------
    def error_rate_pct(self) -> float:
        """The share of /api requests that fail now: the fault or the release's bug."""
        return max(self.faults.state.error_rate_pct, BUGGY_RELEASES.get(self.release.current(), 0))

    def close(self) -> None:
        """Stop the release poller, close connections and the log file."""
        self.release.close()
        self.payments.close()
        self.pool.close()
        self.redis.close()
        self.log.close()

    # -- cache ---------------------------------------------------------------------------
    def cached(self, key: str, load: Callable[[], Any]) -> Any:
        """Read through the Redis cache; a Redis failure falls back to the database."""
        key = self.settings.key_prefix + key
        ttl = self.settings.cache_ttl_s
        if self.faults.state.cache_miss:
            # A key per request: Redis counts a real miss, and the writes churn memory.
            key, ttl = f"{key}:{uuid.uuid4().hex}", 30
        try:
            raw = self.redis.get(key)
        except redis.RedisError:
            self.metrics.cache.labels("error").inc()
            return load()
        if raw is not None:
            self.metrics.cache.labels("hit").inc()
            return json.loads(str(raw))
        self.metrics.cache.labels("miss").inc()
        value = load()
        # A full or absent cache must not fail the read.
        with contextlib.suppress(redis.RedisError):
            self.redis.set(key, json.dumps(value), ex=ttl)
        return value

    # -- redis fill ----------------------------------------------------------------------
    def fill_redis(self, req: FillRequest) -> dict[str, Any]:
        """Write filler keys until used_memory >= fraction * maxmemory (or Redis refuses)."""
        maxmemory = int(
            cast(dict[str, Any], self.redis.config_get("maxmemory")).get("maxmemory", 0)
        )
        if maxmemory <= 0:
            raise HTTPException(409, "Redis has no maxmemory: refusing to fill it without bound")
        target = req.fraction * maxmemory
        value = "x" * (req.value_kb * 1024)
        written, refused = 0, None
        used = self._used_memory()
        start = int(cast(str | None, self.redis.get(self._fill_counter())) or 0)
        while used < target and written < 100_000:
            batch = max(1, min(64, int((target - used) // len(value)) + 1))
            pipe = self.redis.pipeline(transaction=False)
            for i in range(batch):
                pipe.set(f"{self.settings.key_prefix}fill:{start + written + i}", value)
            try:
                pipe.execute()
            except redis.ResponseError as exc:  # OOM under noeviction: as full as it gets
                refused = str(exc)[:200]
                break
            written += batch
            used = self._used_memory()
        self.redis.set(self._fill_counter(), start + written)
        return {"written": written, "used_memory": used, "maxmemory": maxmemory, "oom": refused}

    def _used_memory(self) -> int:
        return int(cast(dict[str, Any], self.redis.info("memory"))["used_memory"])

    def _fill_counter(self) -> str:
        return f"{self.settings.key_prefix}fillmeta:next"

    def clean_redis_fill(self) -> int:
        """UNLINK every filler key; returns how many."""
        removed = 0
        pattern = f"{self.settings.key_prefix}fill:*"
        batch: list[str] = []
        for key in self.redis.scan_iter(match=pattern, count=1000):
            batch.append(str(key))
            if len(batch) >= 500:
                removed += cast(int, self.redis.unlink(*batch))
                batch = []
        if batch:
            removed += cast(int, self.redis.unlink(*batch))
        self.redis.delete(self._fill_counter())
        return removed

    def poison_cache(self, users: int = 100) -> int:
        """Write undecodable entries for users 1..`users` and the product lists: each read of
        them fails (500) until the entries expire or the cache is cleared (scenario C)."""
        pipe = self.redis.pipeline(transaction=False)
        keys = [f"user:{i}" for i in range(1, users + 1)]
        keys += [f"products:{n}" for n in (5, 10, 20, 50, 100)]
        for key in keys:
            pipe.set(self.settings.key_prefix + key, "\x00corrupt{", ex=self.settings.cache_ttl_s)
        pipe.execute()
        return len(keys)

    # -- audit ---------------------------------------------------------------------------
    def audit(
        self,
        user_id: int | None,
        route: str,
        method: str,
        status: int,
        ip: str | None,
        ms: float,
        action: str | None = None,
    ) -> None:
        """Insert one audit_logs row; a busy or absent database drops it (never blocks long)."""
        try:
            with self.pool.connection(wait_s=0.2) as conn:
                conn.execute(
                    "INSERT INTO audit_logs (user_id, action, route, status, ip, response_time,"
                    " release) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (
                        user_id,
                        action or f"{method} {route}",
                        route,
                        status,
                        ip,
                        ms,
                        self.release.current(),
                    ),
                )
        except (PoolExhaustedError, psycopg.Error):
            pass

    # -- app -----------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        app = FastAPI(title="akig-backend (sandbox)", docs_url=None, redoc_url=None)
        backend = self

        def db_error(request: Request, exc: Exception) -> JSONResponse:
            request.state.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            status = 503 if isinstance(exc, PoolExhaustedError) else 500
            return JSONResponse({"detail": "database error"}, status_code=status)

        def crash(request: Request, exc: Exception) -> JSONResponse:
            # Any other bug: a 500 whose log line says what broke (Starlette re-raises after).
            request.state.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            return JSONResponse({"detail": "internal server error"}, status_code=500)

        app.add_exception_handler(psycopg.Error, db_error)
        app.add_exception_handler(PoolExhaustedError, db_error)
        app.add_exception_handler(Exception, crash)

        @app.get("/api/health")
        def health() -> JSONResponse:
            checks: dict[str, dict[str, Any]] = {}
            t0 = time.perf_counter()
            try:
                backend.pool.fetch("SELECT 1 AS ok")
                checks["database"] = {"ok": True}
            except (PoolExhaustedError, psycopg.Error) as exc:
                checks["database"] = {"ok": False, "error": type(exc).__name__}
            checks["database"]["ms"] = round((time.perf_counter() - t0) * 1000, 1)
            t0 = time.perf_counter()
            try:
                backend.redis.ping()
                checks["redis"] = {"ok": True}
            except redis.RedisError as exc:
                checks["redis"] = {"ok": False, "error": type(exc).__name__}
            checks["redis"]["ms"] = round((time.perf_counter() - t0) * 1000, 1)
            ok = all(c["ok"] for c in checks.values())
            body = {
                "status": "ok" if ok else "degraded",
                "release": backend.release.current(),
                "checks": checks,
            }
            return JSONResponse(body, status_code=200 if ok else 503)

        @app.get("/api/users/{user_id}")
        def get_user(user_id: int, request: Request) -> Any:
            request.state.user_id = user_id

            def load() -> dict[str, Any] | None:
                rows = backend.pool.fetch(
                    "SELECT id, email, name, created_at::text AS created_at FROM users"
                    " WHERE id = %s",
                    (user_id,),
                )
                return rows[0] if rows else None

            user = backend.cached(f"user:{user_id}", load)
            if user is None:
                raise HTTPException(404, "no such user")
            return user

        @app.post("/api/login")
        def login(req: LoginRequest, request: Request) -> JSONResponse:
            # The audit row a security assessment reads: action `login`, 200 or 401, and the
            # client address a proxy forwards (X-Forwarded-For), as a backend behind one logs.
            request.state.user_id = req.user_id
            request.state.action = "login"
            forwarded = request.headers.get("x-forwarded-for", "").split(",")[0].strip()
            with contextlib.suppress(ValueError):
                request.state.ip = str(ipaddress.ip_address(forwarded))
            if not hmac.compare_digest(req.password.encode(), LOGIN_PASSWORD.encode()):
                return JSONResponse({"detail": "invalid credentials"}, status_code=401)
            return JSONResponse({"user_id": req.user_id, "token": uuid.uuid4().hex})

        @app.get("/api/orders")
        def list_orders(request: Request, user_id: Annotated[int, Query(ge=1)]) -> dict[str, Any]:
            request.state.user_id = user_id
            n_plus_one = backend.faults.state.n_plus_one

            def load() -> list[dict[str, Any]]:
                if not n_plus_one:
                    return backend.pool.fetch(
                        "SELECT o.id, o.product_id, o.quantity, o.status,"
                        " o.created_at::text AS created_at, p.name AS product, p.price_cents"
                        " FROM orders o JOIN products p ON p.id = o.product_id"
                        " WHERE o.user_id = %s ORDER BY o.id",
                        (user_id,),
                    )
                orders = backend.pool.fetch(
                    "SELECT id, product_id, quantity, status, created_at::text AS created_at"
                    " FROM orders WHERE user_id = %s ORDER BY id",
                    (user_id,),
                )
                for order in orders:  # the N+1: one query per order
                    product = backend.pool.fetch(
                        "SELECT name, price_cents FROM products WHERE id = %s",
                        (order["product_id"],),
                    )[0]
                    order.update(product=product["name"], price_cents=product["price_cents"])
                return orders

            return {"user_id": user_id, "orders": backend.cached(f"orders:user:{user_id}", load)}

        @app.get("/api/products")
        def list_products(limit: Annotated[int, Query(ge=1, le=200)] = 50) -> dict[str, Any]:
            def load() -> list[dict[str, Any]]:
                return backend.pool.fetch(
                    "SELECT id, sku, name, price_cents FROM products ORDER BY id LIMIT %s",
                    (limit,),
                )

            return {"products": backend.cached(f"products:{limit}", load)}

        @app.get("/metrics")
        def metrics() -> Response:
            backend.metrics.release.clear()
            backend.metrics.release.labels(backend.release.current()).set(1)
            return Response(
                generate_latest(backend.metrics.registry), media_type=CONTENT_TYPE_LATEST
            )

        def admin(authorization: Annotated[str | None, Header()] = None) -> None:
            token = backend.settings.admin_token
            if token is None or not token.get_secret_value():
                raise HTTPException(403, "admin endpoints are disabled (no admin token set)")
            given = (authorization or "").removeprefix("Bearer ").encode()
            if not authorization or not hmac.compare_digest(
                given, token.get_secret_value().encode()
            ):
                raise HTTPException(401, "bad admin token")

        guarded = [Depends(admin)]

        @app.get("/admin/faults", dependencies=guarded)
        def get_faults() -> dict[str, Any]:
            return backend._fault_view(backend.faults.state)

        @app.put("/admin/faults", dependencies=guarded)
        def put_faults(patch: FaultPatch) -> dict[str, Any]:
            return backend._fault_view(backend.faults.apply(patch))

        @app.post("/admin/redis-fill", dependencies=guarded)
        def redis_fill(req: FillRequest) -> dict[str, Any]:
            return backend.fill_redis(req)

        @app.post("/admin/cache-poison", dependencies=guarded)
        def cache_poison(users: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
            return {"poisoned": backend.poison_cache(users)}

        @app.delete("/admin/redis-fill", dependencies=guarded)
        def redis_unfill() -> dict[str, Any]:
            return {"removed": backend.clean_redis_fill()}

        @app.post("/admin/reset", dependencies=guarded)
        def reset() -> dict[str, Any]:
            removed = backend.clean_redis_fill()
            return {**backend._fault_view(backend.faults.reset()), "fill_removed": removed}

        add_payment_routes(app, backend.payments, guarded)
        add_security_routes(app, backend.pool, guarded)
        return app

    def _fault_view(self, state: FaultState) -> dict[str, Any]:
        return {
            **state.model_dump(),
            "release": self.release.current(),
            "effective_error_rate_pct": self.error_rate_pct(),
        }


def _is_faultable(path: str) -> bool:
    """Faults hit the /api endpoints; /api/health stays honest about its dependencies."""
    return path.startswith("/api/") and path != "/api/health"


class _SwitchableGZip:
    """GZip responses only while the `gzip` switch is on (the 'compression off' fault)."""

    def __init__(self, app: ASGIApp, faults: Faults) -> None:
        self.app = app
        self.gzip = GZipMiddleware(app, minimum_size=500)
        self.faults = faults

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.faults.state.gzip:
            await self.gzip(scope, receive, send)
        else:
            await self.app(scope, receive, send)


class _Instrument:
    """Outermost layer: injected faults, metrics, the access log line and the audit row."""

    def __init__(self, backend: Backend, app: ASGIApp) -> None:
        self.backend = backend
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        backend = self.backend
        start = time.perf_counter()
        route = route_template(backend.app.router.routes, scope)
        path: str = scope["path"]
        client = scope.get("client")
        ip: str | None = client[0] if client else None
        status = 500
        started = False
        elapsed: float | None = None
        error: str | None = None

        def record() -> None:
            # Metrics and the log line before the last body byte leaves: whoever reads the
            # response next (a test, a scrape) finds them.
            nonlocal elapsed
            if elapsed is not None:
                return
            elapsed = time.perf_counter() - start
            why = error or (scope.get("state") or {}).get("error")
            backend.metrics.requests.labels(route, str(status)).inc()
            backend.metrics.duration.labels(route).observe(elapsed)
            backend.log.write(
                _log_line(
                    scope["method"],
                    path,
                    route,
                    status,
                    elapsed,
                    backend.release.current(),
                    ip,
                    why,
                )
            )

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = int(message["status"]), True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                record()
            await send(message)

        try:
            faults = backend.faults.state
            delay_ms = _delay_ms(faults, route, request_user(backend.app.router.routes, scope))
            if path.startswith("/api/") and delay_ms:
                await asyncio.sleep(delay_ms / 1000)
            pct = backend.error_rate_pct()
            if _is_faultable(path) and pct and random.random() * 100 < pct:
                release = backend.release.current()
                error = (
                    f"release {release} bug: unhandled exception"
                    if release in BUGGY_RELEASES
                    else "injected fault: error_rate_pct"
                )
                await JSONResponse({"detail": "internal server error"}, status_code=500)(
                    scope, receive, send_wrapper
                )
            else:
                await self.app(scope, receive, send_wrapper)
        except Exception as exc:  # noqa: BLE001 - the one place that turns a crash into a 500
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            if not started:
                await JSONResponse({"detail": "internal server error"}, status_code=500)(
                    scope, receive, send_wrapper
                )
        record()  # a response cut short still gets its line
        if _is_faultable(path):
            state = scope.get("state") or {}
            await anyio.to_thread.run_sync(
                backend.audit,
                state.get("user_id"),
                route,
                scope["method"],
                status,
                state.get("ip", ip),
                (elapsed or 0.0) * 1000,
                state.get("action"),
            )


def _log_line(
    method: str,
    path: str,
    route: str,
    status: int,
    elapsed: float,
    release: str,
    ip: str | None,
    error: str | None,
) -> str:
    """`<ts> level=<lvl> method=GET path=/api/x route=/api/x status=200 duration=1.2ms ...`."""
    level = "error" if status >= 500 else "warn" if status >= 400 else "info"
    ts = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    safe_path = path.replace(" ", "%20").replace('"', "%22")
    line = (
        f"{ts} level={level} method={method} path={safe_path} route={route} status={status}"
        f" duration={elapsed * 1000:.1f}ms release={release} ip={ip or '-'}"
    )
    if error:
        line += ' error="' + error.replace('"', "'").replace("\n", " ") + '"'
    return line


def create_backend(settings: SandboxSettings | None = None) -> Backend:
    """A backend instance from settings (default: the `SANDBOX_*` environment)."""
    return Backend(settings or SandboxSettings())
