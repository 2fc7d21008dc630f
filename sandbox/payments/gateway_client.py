"""How the backend charges through the gateway: one pooled httpx client, answers classified."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import httpx

#: Connections kept to the gateway: at least the threads that may call it at once.
POOL_CONNECTIONS = 64


@dataclass(frozen=True)
class GatewayAnswer:
    """What a charge attempt came to, from the backend's point of view."""

    kind: Literal["charged", "declined", "rate_limited", "unknown"]
    charge_id: str | None = None
    error: str | None = None
    retry_after_s: int = 1
    #: The backend's status for an unknown outcome: 504 on a timeout, 502 otherwise.
    status: int = 502


class GatewayClient:
    """Charges through the gateway's `POST /v1/charges` over real HTTP."""

    def __init__(self, url: str | None, key: str | None, timeout_s: float) -> None:
        self.configured = bool(url)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(
            base_url=url or "http://gateway.invalid",
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(
                max_connections=POOL_CONNECTIONS, max_keepalive_connections=POOL_CONNECTIONS
            ),
        )

    def charge(
        self, key: str, payment_ref: str, amount: int, currency: str, customer: str
    ) -> GatewayAnswer:
        """One charge attempt; a 5xx, a timeout or a connection error is `unknown`."""
        body = {
            "amount": amount,
            "currency": currency,
            "customer": customer,
            "payment_ref": payment_ref,
        }
        try:
            r = self._http.post("/v1/charges", json=body, headers={"Idempotency-Key": key})
        except httpx.TimeoutException as exc:
            return GatewayAnswer(
                "unknown", error=f"gateway timeout ({type(exc).__name__})", status=504
            )
        except httpx.TransportError as exc:
            return GatewayAnswer("unknown", error=f"gateway unreachable ({type(exc).__name__})")
        if r.status_code == 200:
            return GatewayAnswer("charged", charge_id=str(r.json()["id"]))
        if r.status_code == 402:
            return GatewayAnswer("declined", error=_decline_code(r))
        if r.status_code == 429:
            return GatewayAnswer(
                "rate_limited", error="gateway rate limited", retry_after_s=_retry_after(r)
            )
        # 5xx: it may have charged. Any other status is a misconfiguration: no charge, but
        # nothing definite about the payment either, so the key stays resumable.
        return GatewayAnswer("unknown", error=f"gateway answered {r.status_code}")

    def close(self) -> None:
        """Close the pooled connections."""
        self._http.close()


def _decline_code(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "card_declined"


def _retry_after(r: httpx.Response) -> int:
    try:
        return max(1, int(float(r.headers.get("Retry-After", "1"))))
    except ValueError:
        return 1
