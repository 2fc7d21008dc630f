"""The simulated payment gateway: its own app, ledger (`gateway_charges`) and behaviours.

`POST /v1/charges` is idempotent on its `Idempotency-Key` (the same key replays the same
charge, never a second row). `PUT /admin/behaviour` switches what charge requests meet:
slow, failing, timing out before or after charging, a 5xx after charging, down,
rate-limited; `share` of them (the rest succeed). Every charge takes a base latency.
"""

from __future__ import annotations

import asyncio
import hmac
import random
import threading
from typing import Annotated, Any, Literal

import anyio
import psycopg
from fastapi import Depends, FastAPI, Header, HTTPException, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from sandbox.payments.model import iso, new_charge_id
from sandbox.pool import Pool
from sandbox.server import ThreadedServer
from sandbox.settings import SandboxSettings

Mode = Literal[
    "ok",
    "slow",
    "fails",
    "timeout_before_charge",
    "charge_then_timeout",
    "charge_then_5xx",
    "down",
    "rate_limit",
]
MAX_REFS = 100
#: How far past the caller's timeout the timeout modes sleep, seconds.
PAST_TIMEOUT_S = 0.5


class Behaviour(BaseModel):
    """What charge requests meet now."""

    mode: Mode = "ok"
    share: float = Field(1.0, ge=0, le=1, description="Fraction of charges the mode hits.")
    delay_ms: int = Field(0, ge=0, le=120_000, description="`slow`: added delay; timeouts: min.")
    retry_after_s: int = Field(1, ge=0, le=3600, description="`rate_limit`: Retry-After.")


class ChargeRequest(BaseModel):
    """`POST /v1/charges`."""

    amount: int = Field(gt=0)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    customer: str = Field(min_length=1, max_length=255)
    payment_ref: str = Field(min_length=1, max_length=255)


def _error(status: int, kind: str, code: str, **headers: str) -> JSONResponse:
    return JSONResponse(
        {"error": {"type": kind, "code": code}}, status_code=status, headers=headers
    )


def _charge_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "charge",
        "status": "succeeded",
        "amount": row["amount"],
        "currency": row["currency"],
        "customer": row["customer"],
        "payment_ref": row["payment_ref"],
        "created_at": iso(row["created_at"]),
    }


class Gateway:
    """One gateway instance: its pool on the ledger, its behaviour switch, its app."""

    def __init__(self, settings: SandboxSettings) -> None:
        self.settings = settings
        self.pool = Pool(settings.database_dsn, settings.db_pool_size, settings.db_pool_wait_s)
        self._lock = threading.Lock()
        self._behaviour = Behaviour()
        self.app = self._build_app()
        self.asgi: ASGIApp = _DownSwitch(self, self.app)

    @property
    def behaviour(self) -> Behaviour:
        """A snapshot of the behaviour."""
        with self._lock:
            return self._behaviour.model_copy()

    def set_behaviour(self, behaviour: Behaviour) -> Behaviour:
        """Switch the behaviour; returns it."""
        with self._lock:
            self._behaviour = behaviour.model_copy()
            return self._behaviour.model_copy()

    def status(self) -> str:
        """What the public status page says."""
        b = self.behaviour
        if b.mode == "ok" or b.share == 0:
            return "operational"
        return "major_outage" if b.mode == "down" else "degraded"

    def close(self) -> None:
        """Close the ledger's connections."""
        self.pool.close()

    def charge(self, key: str, req: ChargeRequest) -> dict[str, Any] | None:
        """Record a charge under `key`, or return the one recorded under it already
        (None when that one was for another payment or amount)."""
        with self.pool.connection() as conn:
            row = conn.execute(
                "INSERT INTO gateway_charges (id, idempotency_key, payment_ref, amount, currency,"
                " customer) VALUES (%s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (idempotency_key) DO NOTHING RETURNING *",
                (new_charge_id(), key, req.payment_ref, req.amount, req.currency, req.customer),
            ).fetchone()
            if row is None:
                row = conn.execute(
                    "SELECT * FROM gateway_charges WHERE idempotency_key = %s", (key,)
                ).fetchone()
        assert row is not None
        if (row["payment_ref"], row["amount"], row["currency"]) != (
            req.payment_ref,
            req.amount,
            req.currency,
        ):
            return None
        return _charge_json(row)

    def charges(self, refs: list[str]) -> list[dict[str, Any]]:
        """Every charge for these payment refs, oldest first."""
        rows = self.pool.fetch(
            "SELECT * FROM gateway_charges WHERE payment_ref = ANY(%s) ORDER BY created_at, id",
            (refs,),
        )
        return [_charge_json(r) for r in rows]

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="payment gateway (sandbox)", docs_url=None, redoc_url=None)
        gateway = self
        settings = self.settings

        def db_error(_: Any, exc: Exception) -> JSONResponse:
            return _error(500, "api_error", f"database: {type(exc).__name__}")

        app.add_exception_handler(psycopg.Error, db_error)

        def api_key(authorization: Annotated[str | None, Header()] = None) -> None:
            _check_bearer(settings.gateway_key, authorization, "gateway key")

        def admin(authorization: Annotated[str | None, Header()] = None) -> None:
            _check_bearer(settings.admin_token, authorization, "admin token")

        @app.get("/status")
        def status() -> dict[str, Any]:
            return {"status": gateway.status(), "behaviour": gateway.behaviour.model_dump()}

        @app.post("/v1/charges", dependencies=[Depends(api_key)])
        async def create_charge(
            req: ChargeRequest, idempotency_key: Annotated[str | None, Header()] = None
        ) -> JSONResponse:
            if not idempotency_key:
                return _error(400, "invalid_request_error", "idempotency_key_required")
            b = gateway.behaviour
            mode = b.mode if random.random() < b.share else "ok"
            past_timeout = max(b.delay_ms / 1000, settings.gateway_timeout_s + PAST_TIMEOUT_S)
            await asyncio.sleep(settings.gateway_latency_ms / 1000)
            if mode == "rate_limit":
                return _error(
                    429, "rate_limit_error", "rate_limited", **{"Retry-After": str(b.retry_after_s)}
                )
            if mode == "fails":
                return _error(500, "api_error", "internal_error")
            if mode == "timeout_before_charge":
                await asyncio.sleep(past_timeout)
                return _error(504, "api_error", "timeout")
            if mode == "slow":
                await asyncio.sleep(b.delay_ms / 1000)
            if req.customer.startswith("cus_decline"):
                return _error(402, "card_error", "card_declined")
            charge = await anyio.to_thread.run_sync(gateway.charge, idempotency_key, req)
            if charge is None:
                return _error(400, "idempotency_error", "key_reused_with_other_request")
            if mode == "charge_then_timeout":
                await asyncio.sleep(past_timeout)
            if mode == "charge_then_5xx":
                return _error(500, "api_error", "internal_error")
            return JSONResponse(charge)

        @app.get("/v1/charges", dependencies=[Depends(api_key)])
        def list_charges(
            payment_ref: Annotated[list[str], Query(min_length=1)],
        ) -> dict[str, Any]:
            if len(payment_ref) > MAX_REFS:
                raise HTTPException(400, f"at most {MAX_REFS} payment_ref values")
            return {"data": gateway.charges(payment_ref)}

        @app.get("/admin/behaviour", dependencies=[Depends(admin)])
        def get_behaviour() -> dict[str, Any]:
            return gateway.behaviour.model_dump()

        @app.put("/admin/behaviour", dependencies=[Depends(admin)])
        def put_behaviour(behaviour: Behaviour) -> dict[str, Any]:
            return gateway.set_behaviour(behaviour).model_dump()

        return app


def _check_bearer(expected: Any, authorization: str | None, what: str) -> None:
    """403 when no secret is configured, 401 when the header does not carry it."""
    if expected is None or not expected.get_secret_value():
        raise HTTPException(403, f"disabled (no {what} set)")
    given = (authorization or "").removeprefix("Bearer ").encode()
    if not authorization or not hmac.compare_digest(given, expected.get_secret_value().encode()):
        raise HTTPException(401, f"bad {what}")


class _DownSwitch:
    """`down`: 503 to everything but the status page and the admin switch (to bring it back)."""

    def __init__(self, gateway: Gateway, app: ASGIApp) -> None:
        self.gateway = gateway
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if (
            scope["type"] == "http"
            and path.startswith("/v1/")
            and self.gateway.behaviour.mode == "down"
            and random.random() < self.gateway.behaviour.share
        ):
            await _error(503, "api_error", "service_unavailable")(scope, receive, send)
            return
        await self.app(scope, receive, send)


class GatewayServer(ThreadedServer):
    """A started uvicorn serving `gateway` on 127.0.0.1:`port`; `stop()` ends it."""

    def __init__(self, gateway: Gateway, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.gateway = gateway
        super().__init__(gateway.asgi, gateway.close, port, host, name="sandbox-gateway")


def create_gateway(settings: SandboxSettings | None = None) -> Gateway:
    """A gateway instance from settings (default: the `SANDBOX_*` environment)."""
    return Gateway(settings or SandboxSettings())
