"""A typed client for the payments API and the gateway's read API (the sandbox contract).

Every call takes an `httpx.Client` built by `tasks.clients` (token in a header only).
Nothing here logs or echoes a token: errors name the route and the status, never a header.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Literal

import httpx
from pydantic import BaseModel, Field

from tasks.errors import PermanentError, TransientError

PaymentStatus = Literal["failed", "succeeded", "pending"]

#: What one retry call came to. Definite (the key may be closed): succeeded, declined,
#: not_failed (already succeeded), not_found. Not definite (the same key must be re-used):
#: unknown (gateway 5xx / timeout, our own timeout), rate_limited (429), in_flight (409),
#: rejected (400 / 422: the request itself is wrong, a defect to report, key kept).
AnswerKind = Literal[
    "succeeded",
    "declined",
    "not_failed",
    "not_found",
    "unknown",
    "rate_limited",
    "in_flight",
    "rejected",
]
DEFINITE: frozenset[str] = frozenset({"succeeded", "declined", "not_failed", "not_found"})

#: Ids per `GET /api/payments?ids=` and refs per `GET /v1/charges` (the contract's limits).
IDS_PER_CALL = 500
REFS_PER_CALL = 100


class PaymentsAuthError(PermanentError):
    """The payments API (or gateway) refused the token: missing, wrong, or not configured."""


class Payment(BaseModel):
    """One payment as the backend reports it."""

    id: str
    customer: str
    amount: int = Field(gt=0, description="Minor units.")
    currency: str
    status: PaymentStatus
    attempts: int = 0
    last_error: str | None = None
    failed_at: datetime | None = None
    updated_at: datetime | None = None
    charges: list[str] = Field(default_factory=list)


class RetryAnswer(BaseModel):
    """What `POST /api/payments/{id}/retry` answered (or why there is no answer)."""

    kind: AnswerKind
    status_code: int | None = None
    payment: Payment | None = None
    charge: str | None = None
    retry_after_s: float | None = None
    replayed: bool = False
    error: str = ""

    @property
    def definite(self) -> bool:
        """The API decided: the key may be closed and never sent again."""
        return self.kind in DEFINITE


class GatewayCharge(BaseModel):
    """One charge in the gateway's ledger."""

    id: str
    payment_ref: str
    amount: int
    currency: str
    idempotency_key: str | None = None


class GatewayStatus(BaseModel):
    """The gateway's public status page."""

    status: str
    elapsed_ms: float


def _auth_failed(resp: httpx.Response, what: str) -> None:
    if resp.status_code in (401, 403):
        raise PaymentsAuthError(
            f"{what} refused the token (HTTP {resp.status_code}): set RUNBOOKS_PAYMENTS_TOKEN"
            " (or its token_secret_block) to the API's token; nothing was retried"
        )


def _get(client: httpx.Client, path: str, params: object, what: str) -> httpx.Response:
    """A read: connection errors and 5xx are transient, 401/403 an auth error."""
    try:
        resp = client.get(path, params=params)  # type: ignore[arg-type]
    except httpx.HTTPError as exc:
        raise TransientError(f"{what} unreachable ({type(exc).__name__})") from None
    _auth_failed(resp, what)
    if resp.status_code >= 500 or resp.status_code == 429:
        raise TransientError(f"{what} answered HTTP {resp.status_code}")
    if resp.status_code >= 400:
        raise PermanentError(f"{what} answered HTTP {resp.status_code}")
    return resp


def check_token(client: httpx.Client) -> None:
    """A cheap authenticated read: raises `PaymentsAuthError` before anything is planned."""
    _get(client, "/api/payments", {"status": "failed", "limit": 1}, "the payments API")


def list_failed(client: httpx.Client, limit: int) -> list[Payment]:
    """Up to `limit` failed payments, oldest id first, page by page."""
    out: list[Payment] = []
    after: str | None = None
    while len(out) < limit:
        params: dict[str, str | int] = {"status": "failed", "limit": min(500, limit - len(out))}
        if after:
            params["after"] = after
        body = _get(client, "/api/payments", params, "the payments API").json()
        out += [Payment.model_validate(p) for p in body["payments"]]
        after = body.get("next")
        if not after or not body["payments"]:
            break
    return out[:limit]


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def get_payments(client: httpx.Client, ids: Sequence[str]) -> list[Payment]:
    """Exactly these payments (those the backend knows), in chunks of 500 ids."""
    out: list[Payment] = []
    for part in _chunks(list(ids), IDS_PER_CALL):
        body = _get(client, "/api/payments", {"ids": ",".join(part)}, "the payments API").json()
        out += [Payment.model_validate(p) for p in body["payments"]]
    return out


def _retry_after(resp: httpx.Response) -> float:
    try:
        return max(0.0, float(resp.headers.get("Retry-After", "1")))
    except ValueError:
        return 1.0


def retry_one(client: httpx.Client, payment_id: str, key: str) -> RetryAnswer:
    """`POST /api/payments/{id}/retry` with `key`; never raises for an outcome, only for auth.

    A timeout or a dropped connection is `unknown`: the backend may have charged, so the
    caller must send the SAME key again, never a new one.
    """
    try:
        resp = client.post(
            f"/api/payments/{payment_id}/retry", json={}, headers={"Idempotency-Key": key}
        )
    except httpx.HTTPError as exc:
        return RetryAnswer(kind="unknown", error=f"no answer ({type(exc).__name__})")
    code = resp.status_code
    _auth_failed(resp, "the payments API")
    try:
        body = resp.json()
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    payment = Payment.model_validate(body["payment"]) if body.get("payment") else None
    replayed = resp.headers.get("Idempotent-Replayed", "").lower() == "true"
    common = {"status_code": code, "payment": payment, "replayed": replayed}
    error = str(body.get("error", ""))[:200]
    if code == 200:
        return RetryAnswer(kind="succeeded", charge=body.get("charge"), **common)
    if code == 402:
        return RetryAnswer(kind="declined", error=error or "declined", **common)
    if code == 404:
        return RetryAnswer(kind="not_found", error="unknown payment", **common)
    if code == 409 and body.get("result") == "not_failed":
        return RetryAnswer(kind="not_failed", **common)
    if code == 409:
        return RetryAnswer(kind="in_flight", error=error or "in flight", **common)
    if code == 429:
        return RetryAnswer(kind="rate_limited", retry_after_s=_retry_after(resp), **common)
    if code >= 500:
        return RetryAnswer(kind="unknown", error=error or f"HTTP {code}", **common)
    return RetryAnswer(kind="rejected", error=error or f"HTTP {code}", **common)


def gateway_status(client: httpx.Client) -> GatewayStatus:
    """The gateway's `/status` (public), timed."""
    resp = _get(client, "/status", None, "the payment gateway")
    return GatewayStatus(
        status=str(resp.json().get("status", "unknown")),
        elapsed_ms=resp.elapsed.total_seconds() * 1000,
    )


def gateway_charges(client: httpx.Client, refs: Sequence[str]) -> dict[str, list[GatewayCharge]]:
    """The gateway's charges for each payment ref (an empty list: none), 100 refs per call."""
    out: dict[str, list[GatewayCharge]] = {ref: [] for ref in refs}
    for part in _chunks(list(refs), REFS_PER_CALL):
        params = [("payment_ref", ref) for ref in part]
        body = _get(client, "/v1/charges", params, "the payment gateway").json()
        for raw in body.get("data", []):
            charge = GatewayCharge.model_validate(raw)
            out.setdefault(charge.payment_ref, []).append(charge)
    return out
