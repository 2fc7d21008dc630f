"""Payment ids, request bodies and the Payment JSON the API answers with."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

#: Columns of a Payment as the API shows it (`p` = payments), charge ids aggregated.
PAYMENT_COLUMNS = (
    "p.id, p.customer, p.amount, p.currency, p.status, p.attempts, p.last_error,"
    " p.failed_at, p.updated_at, COALESCE((SELECT array_agg(c.gateway_charge_id ORDER BY c.id)"
    " FROM charges c WHERE c.payment_id = p.id), '{}') AS charges"
)


def new_payment_id() -> str:
    """`pay_` + a ULID (26 Crockford base32 chars): ids sort roughly by creation time."""
    value = (int(time.time() * 1000) << 80) | secrets.randbits(80)
    chars = [_CROCKFORD[(value >> (5 * i)) & 31] for i in range(25, -1, -1)]
    return "pay_" + "".join(chars)


def new_charge_id() -> str:
    """A gateway charge id, `ch_` + 24 random hex chars."""
    return "ch_" + secrets.token_hex(12)


def iso(value: datetime | None) -> str | None:
    """ISO 8601 in UTC with a `Z`, or None."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def payment_json(row: dict[str, Any]) -> dict[str, Any]:
    """The API's Payment object from a row selected with `PAYMENT_COLUMNS`."""
    return {
        "id": row["id"],
        "customer": row["customer"],
        "amount": row["amount"],
        "currency": row["currency"],
        "status": row["status"],
        "attempts": row["attempts"],
        "last_error": row["last_error"],
        "failed_at": iso(row["failed_at"]),
        "updated_at": iso(row["updated_at"]),
        "charges": list(row["charges"]),
    }


class PaymentCreate(BaseModel):
    """`POST /api/payments`: a new payment, charged at once."""

    customer: str = Field(min_length=1, max_length=255)
    amount: int = Field(gt=0, le=100_000_000, description="Minor units (cents).")
    currency: str = Field(pattern=r"^[A-Z]{3}$")


class BulkRetry(BaseModel):
    """`POST /api/payments/retry`: retry every payment in that status."""

    status: Literal["failed"]


class SeedRequest(BaseModel):
    """`POST /admin/payments/seed`: N failed payments, queued."""

    count: int = Field(ge=1, le=100_000)
    amount: int = Field(1999, gt=0, le=100_000_000)
    currency: str = Field("EUR", pattern=r"^[A-Z]{3}$")
    declined_share: float = Field(
        0.0, ge=0, le=1, description="Share whose customer the gateway declines (`cus_decline`)."
    )
