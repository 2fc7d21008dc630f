"""The backend's payments routes: `/api/payments*` (payments token) and `/admin/payments*`."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi import Body, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.params import Depends as DependsParam
from fastapi.responses import JSONResponse, Response

from sandbox.payments import idempotency
from sandbox.payments.model import BulkRetry, PaymentCreate, SeedRequest
from sandbox.payments.service import Answer, PaymentService

MAX_IDS = 500
MAX_PAGE = 1000


def _respond(request: Request, answer: Answer) -> Response:
    if answer.log_error:
        request.state.error = answer.log_error
    return Response(
        answer.body,
        status_code=answer.status,
        headers=answer.headers,
        media_type="application/json",
    )


def _key_or_400(request: Request, key: str | None) -> str | JSONResponse:
    problem = idempotency.key_problem(key)
    if problem is None:
        assert key is not None
        return key
    request.state.error = problem
    return JSONResponse({"error": problem}, status_code=400)


def add_payment_routes(
    app: FastAPI, service: PaymentService, admin: Sequence[DependsParam]
) -> None:
    """Add the routes over `service` to the app; `admin` guards the /admin ones.

    On the app itself, not an included APIRouter: the access log and the request metrics name
    the route template, which they find among the app's own routes."""
    settings = service.settings

    def token(authorization: Annotated[str | None, Header()] = None) -> None:
        expected = settings.payments_token
        if expected is None or not expected.get_secret_value():
            raise HTTPException(403, "payments API disabled (no payments token set)")
        given = (authorization or "").removeprefix("Bearer ").encode()
        if not authorization or not hmac.compare_digest(
            given, expected.get_secret_value().encode()
        ):
            raise HTTPException(401, "bad payments token")

    guarded = [Depends(token)]

    @app.post("/api/payments", dependencies=guarded)
    def create_payment(
        request: Request,
        req: PaymentCreate,
        idempotency_key: Annotated[str | None, Header()] = None,
    ) -> Response:
        key = _key_or_400(request, idempotency_key)
        if isinstance(key, Response):
            return key
        return _respond(request, service.create(req, key))

    @app.get("/api/payments", dependencies=guarded)
    def list_payments(
        status: Literal["failed", "succeeded", "pending"] | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 500,
        after: str | None = None,
        ids: str | None = None,
    ) -> dict[str, Any]:
        if ids is not None:
            wanted = [i for i in ids.split(",") if i]
            if len(wanted) > MAX_IDS:
                raise HTTPException(400, f"at most {MAX_IDS} ids")
            return service.by_ids(wanted)
        return service.page(status, limit, after)

    @app.post("/api/payments/retry", dependencies=guarded)
    def retry_all(req: BulkRetry) -> dict[str, int]:
        return service.retry_all_failed()

    @app.get("/api/payments/{payment_id}", dependencies=guarded)
    def get_payment(payment_id: str) -> dict[str, Any]:
        payment = service.get(payment_id)
        if payment is None:
            raise HTTPException(404, "no such payment")
        return payment

    @app.post("/api/payments/{payment_id}/retry", dependencies=guarded)
    def retry_payment(
        request: Request,
        payment_id: str,
        body: Annotated[dict[str, Any] | None, Body()] = None,
        idempotency_key: Annotated[str | None, Header()] = None,
    ) -> Response:
        key = _key_or_400(request, idempotency_key)
        if isinstance(key, Response):
            return key
        return _respond(request, service.retry(payment_id, key, idempotency.canonical_body(body)))

    @app.post("/admin/payments/seed", dependencies=list(admin))
    def seed(req: SeedRequest) -> dict[str, Any]:
        return {"ids": service.seed(req)}

    @app.delete("/admin/payments", dependencies=list(admin))
    def truncate() -> dict[str, Any]:
        service.truncate()
        return {"truncated": True}
