"""The payments drill's verdict, read from the sandbox database: charged once, none forgotten.

Three views must agree for every payment: the backend's payment row (status, last error),
the backend's `charges` and the gateway's own ledger `gateway_charges` (one row per real
charge). A payment ends `succeeded` with exactly one gateway charge, or `failed` with a
reason and none; no `payment_ref` has two charges; no charge is known to one side only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import psycopg

from drills.payments_traffic import KEY_PREFIX


@dataclass(frozen=True)
class PaymentView:
    """One payment as the three views have it."""

    id: str
    status: str
    last_error: str | None
    amount: int
    gateway_charges: int
    backend_charges: int
    #: Charged under one of the drill checkout's own keys (not by the runbook's retry).
    by_checkout: bool = False


@dataclass
class Verdict:
    """What the ledgers say about the payments the drill asked about."""

    payments: list[PaymentView]
    doubles: dict[str, int] = field(default_factory=dict)
    gateway_only: list[str] = field(default_factory=list)
    backend_only: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def by_status(self) -> dict[str, int]:
        """Payments per status."""
        counts: dict[str, int] = {}
        for p in self.payments:
            counts[p.status] = counts.get(p.status, 0) + 1
        return counts

    def amount(self, status: str) -> int:
        """Minor units of the payments in `status`."""
        return sum(p.amount for p in self.payments if p.status == status)

    @property
    def by_retry(self) -> int:
        """Payments that succeeded under a key not the checkout's: the runbook's retries."""
        return sum(1 for p in self.payments if p.status == "succeeded" and not p.by_checkout)

    @property
    def most_charges(self) -> int:
        """The most gateway charges any payment has (must be 1)."""
        return max((p.gateway_charges for p in self.payments), default=0)

    def problems(self) -> list[str]:
        """Every breach of "charged at most once, accounted for", one line each."""
        out = [f"{ref} charged {n} times at the gateway" for ref, n in sorted(self.doubles.items())]
        out += [f"gateway charge {c} unknown to the backend" for c in self.gateway_only]
        out += [f"backend charge {c} unknown to the gateway" for c in self.backend_only]
        out += [f"{p} is gone from the payments table" for p in self.missing]
        for p in self.payments:
            if p.status == "succeeded" and (p.gateway_charges != 1 or p.backend_charges != 1):
                out.append(
                    f"{p.id} succeeded with {p.gateway_charges} gateway /"
                    f" {p.backend_charges} backend charges"
                )
            elif p.status == "failed" and p.gateway_charges:
                out.append(f"{p.id} failed but charged {p.gateway_charges} time(s)")
            elif p.status == "failed" and not p.last_error:
                out.append(f"{p.id} failed without a reason")
            elif p.status not in ("succeeded", "failed"):
                out.append(f"{p.id} ended {p.status}")
        return out


PAYMENTS = """
SELECT p.id, p.status, p.last_error, p.amount,
       (SELECT count(*) FROM gateway_charges g WHERE g.payment_ref = p.id) AS gateway_charges,
       (SELECT count(*) FROM charges c WHERE c.payment_id = p.id) AS backend_charges,
       EXISTS (SELECT 1 FROM charges c WHERE c.payment_id = p.id
               AND starts_with(c.idempotency_key, %s)) AS by_checkout
FROM payments p WHERE p.id = ANY(%s) ORDER BY p.id
"""
DOUBLES = """
SELECT payment_ref, count(*) FROM gateway_charges GROUP BY payment_ref HAVING count(*) > 1
"""
GATEWAY_ONLY = """
SELECT g.id FROM gateway_charges g
WHERE NOT EXISTS (SELECT 1 FROM charges c WHERE c.gateway_charge_id = g.id) ORDER BY g.id
"""
BACKEND_ONLY = """
SELECT c.gateway_charge_id FROM charges c
WHERE NOT EXISTS (SELECT 1 FROM gateway_charges g WHERE g.id = c.gateway_charge_id)
ORDER BY c.gateway_charge_id
"""


def failed_now(dsn: str) -> list[str]:
    """Ids of the payments failed right now (the failed-transactions queue's rows)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT id FROM payments WHERE status = 'failed' ORDER BY id")
        return [str(r[0]) for r in rows.fetchall()]


def all_payments(dsn: str) -> list[str]:
    """Every payment id in the drill's database (the drill's checkout made them all)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [str(r[0]) for r in conn.execute("SELECT id FROM payments ORDER BY id").fetchall()]


def verdict(dsn: str, ids: Iterable[str]) -> Verdict:
    """The three views of `ids`, and the ledgers' doubles and one-sided charges (all rows)."""
    wanted = sorted(set(ids))
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(PAYMENTS, (KEY_PREFIX, wanted)).fetchall()
        doubles = {str(r[0]): int(r[1]) for r in conn.execute(DOUBLES).fetchall()}
        gateway_only = [str(r[0]) for r in conn.execute(GATEWAY_ONLY).fetchall()]
        backend_only = [str(r[0]) for r in conn.execute(BACKEND_ONLY).fetchall()]
    views = [
        PaymentView(str(r[0]), str(r[1]), r[2], int(r[3]), int(r[4]), int(r[5]), bool(r[6]))
        for r in rows
    ]
    found = {v.id for v in views}
    missing = [i for i in wanted if i not in found]
    return Verdict(views, doubles, gateway_only, backend_only, missing)
