"""The backend's payments logic: charge and retry with idempotency keys, list, seed, bulk.

Each charge attempt is two short transactions around one gateway call: the first claims the
key, reads and marks the payment; the second records the outcome. No transaction spans the
HTTP call, so a slow gateway never holds a database connection or a row lock.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg
import redis
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg.rows import DictRow

from sandbox.payments import idempotency
from sandbox.payments.gateway_client import GatewayAnswer, GatewayClient
from sandbox.payments.model import (
    PAYMENT_COLUMNS,
    PaymentCreate,
    SeedRequest,
    new_payment_id,
    payment_json,
)
from sandbox.payments.queue import FailedQueue
from sandbox.payments.schema import TRUNCATE
from sandbox.pool import Pool, PoolExhaustedError
from sandbox.settings import SandboxSettings

Kind = Literal["charge", "retry"]
#: Payments retried at once by the server-side bulk command.
BULK_WORKERS = 4
#: Expired idempotency keys are purged at most this often, seconds.
PURGE_EVERY_S = 60.0


@dataclass(frozen=True)
class Answer:
    """An HTTP answer of the payments API: status, exact body, headers."""

    status: int
    body: str
    headers: dict[str, str] = field(default_factory=dict)
    #: For the access log line (why a request did not succeed); never a secret.
    log_error: str | None = None
    result: str | None = None


def _dump(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"))


def _answer(status: int, body: dict[str, Any], log_error: str | None = None) -> Answer:
    return Answer(status, _dump(body), log_error=log_error, result=body.get("result"))


class _QueueGauges(Collector):
    """`akig_payments_failed` and its oldest age, read from the view at scrape time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("akig_payments_failed", "Failed payments (failed_transactions).")
        yield GaugeMetricFamily(
            "akig_payments_failed_oldest_age_seconds", "Age of the oldest failed payment."
        )

    def collect(self) -> Iterator[Metric]:
        try:
            with self.pool.connection(wait_s=0.5) as conn:
                row = conn.execute(
                    "SELECT count(*) AS n, COALESCE(EXTRACT(EPOCH FROM now() - min(failed_at)),"
                    " 0)::float8 AS age FROM failed_transactions"
                ).fetchone()
        except (PoolExhaustedError, psycopg.Error):
            return  # no schema or no database: absent, never a made-up zero
        assert row is not None
        yield GaugeMetricFamily(
            "akig_payments_failed", "Failed payments (failed_transactions).", value=row["n"]
        )
        yield GaugeMetricFamily(
            "akig_payments_failed_oldest_age_seconds",
            "Age of the oldest failed payment.",
            value=max(0.0, row["age"]),
        )


class PaymentService:
    """One backend's payments: its pool, Redis queue, gateway client and metrics."""

    def __init__(
        self,
        settings: SandboxSettings,
        pool: Pool,
        client: redis.Redis,
        registry: CollectorRegistry,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.queue = FailedQueue(client, settings.key_prefix)
        key = settings.gateway_key.get_secret_value() if settings.gateway_key else None
        self.gateway = GatewayClient(settings.gateway_url, key, settings.gateway_timeout_s)
        self.attempts = Counter(
            "akig_payment_attempts_total",
            "Charge attempts at the gateway by kind (charge, retry) and result.",
            ["kind", "result"],
            registry=registry,
        )
        for kind in ("charge", "retry"):  # every series exists from the start (rate() works)
            for result in ("succeeded", "declined", "unknown", "rate_limited"):
                self.attempts.labels(kind, result)
        registry.register(_QueueGauges(pool))
        self._purged_at = 0.0
        self._purge_lock = threading.Lock()

    def close(self) -> None:
        """Close the gateway connections."""
        self.gateway.close()

    # -- charging ------------------------------------------------------------------------
    def retry(self, payment_id: str, key: str, body: str) -> Answer:
        """`POST /api/payments/{id}/retry` with `Idempotency-Key: key` (Stripe semantics)."""
        path = f"/api/payments/{payment_id}/retry"
        return self._attempt("retry", key, idempotency.request_hash("POST", path, body), payment_id)

    def create(self, req: PaymentCreate, key: str) -> Answer:
        """`POST /api/payments`: create a payment and charge it, same key semantics."""
        body = idempotency.canonical_body(req.model_dump())
        req_hash = idempotency.request_hash("POST", "/api/payments", body)
        return self._attempt("charge", key, req_hash, None, req)

    def _attempt(
        self,
        kind: Kind,
        key: str,
        req_hash: str,
        payment_id: str | None,
        create: PaymentCreate | None = None,
    ) -> Answer:
        if not self.gateway.configured:
            return _answer(503, {"error": "gateway_not_configured"}, "no gateway configured")
        self._maybe_purge()
        settings = self.settings
        # Pipeline mode: statements whose results are not needed yet share a round trip.
        with self.pool.connection() as conn, conn.pipeline(), conn.transaction():
            candidate = new_payment_id() if create is not None else payment_id
            claim = idempotency.claim(
                conn,
                key,
                req_hash,
                candidate,
                settings.idempotency_lock_s,
                settings.idempotency_key_ttl_s,
            )
            if claim.kind == "replay":
                assert claim.status is not None and claim.body is not None
                return Answer(claim.status, claim.body, {"Idempotent-Replayed": "true"})
            if claim.kind == "reused":
                return _answer(422, {"error": "idempotency_key_reused"}, "idempotency key reused")
            if claim.kind == "in_flight":
                return _answer(
                    409, {"error": "idempotency_key_in_flight"}, "idempotency key in flight"
                )
            payment_id = claim.payment_id
            assert payment_id is not None
            if create is not None and payment_id == candidate:
                conn.execute(
                    "INSERT INTO payments (id, customer, amount, currency, status)"
                    " VALUES (%s, %s, %s, %s, 'pending')",
                    (payment_id, create.customer, create.amount, create.currency),
                )
            # The common case in one statement: mark the payment as being charged by this key.
            row = conn.execute(
                "UPDATE payments SET charging_key = %(key)s, charging_since = now()"
                " WHERE id = %(id)s AND status <> 'succeeded' AND (charging_key IS NULL"
                " OR charging_key = %(key)s"
                " OR charging_since <= now() - make_interval(secs => %(lock)s))"
                " RETURNING customer, amount, currency",
                {"key": key, "id": payment_id, "lock": settings.idempotency_lock_s},
            ).fetchone()
            if row is None:
                return self._not_chargeable(conn, key, payment_id)
        charged = self.gateway.charge(
            idempotency.gateway_key(payment_id, key),
            payment_id,
            row["amount"],
            row["currency"],
            row["customer"],
        )
        self.attempts.labels(kind, "succeeded" if charged.kind == "charged" else charged.kind).inc()
        return self._record(kind, key, payment_id, row, charged)

    def _not_chargeable(
        self, conn: psycopg.Connection[DictRow], key: str, payment_id: str
    ) -> Answer:
        """Why a payment could not be marked: unknown, succeeded, or another key charging it."""
        payment = self._payment(conn, payment_id)
        if payment is None:
            answer = _answer(
                404, {"result": "not_found", "error": "payment_not_found"}, "payment not found"
            )
        elif payment["status"] == "succeeded":
            answer = _answer(409, {"result": "not_failed", "payment": payment})
        else:
            # Another key is charging this payment right now: wait for its outcome.
            idempotency.unlock(conn, key)
            return _answer(
                409,
                {"error": "idempotency_key_in_flight", "detail": "payment_in_flight"},
                "payment charged by another key",
            )
        idempotency.store(conn, key, answer.status, answer.body)
        return answer

    def _record(
        self, kind: Kind, key: str, payment_id: str, row: DictRow, charged: GatewayAnswer
    ) -> Answer:
        """The outcome transaction, then the queue."""
        with self.pool.connection() as conn, conn.pipeline(), conn.transaction():
            if charged.kind == "charged":
                conn.execute(
                    "INSERT INTO charges (payment_id, gateway_charge_id, amount, currency,"
                    " idempotency_key) VALUES (%s, %s, %s, %s, %s)"
                    " ON CONFLICT (gateway_charge_id) DO NOTHING",
                    (payment_id, charged.charge_id, row["amount"], row["currency"], key),
                )
                payment = self._update(
                    conn,
                    "status = 'succeeded', attempts = attempts + 1, last_error = NULL",
                    payment_id,
                )
                answer = _answer(
                    201 if kind == "charge" else 200,
                    {"result": "succeeded", "payment": payment, "charge": charged.charge_id},
                )
                idempotency.store(conn, key, answer.status, answer.body)
            elif charged.kind == "declined":
                error = charged.error or "card_declined"
                payment = self._update(
                    conn, _FAILED + ", attempts = attempts + 1", payment_id, error
                )
                answer = _answer(
                    402,
                    {"result": "declined", "payment": payment, "error": error},
                    f"payment declined: {error}",
                )
                idempotency.store(conn, key, answer.status, answer.body)
            else:
                # Not stored: the key is unlocked, and the same key resumes with the same
                # gateway key (which replays a charge the gateway may have made).
                if charged.kind == "rate_limited":
                    error = "gateway_rate_limited"
                    answer = Answer(
                        429,
                        _dump(
                            {
                                "result": "rate_limited",
                                "error": error,
                                "retry_after_s": charged.retry_after_s,
                            }
                        ),
                        {"Retry-After": str(charged.retry_after_s)},
                        log_error="gateway rate limited",
                        result="rate_limited",
                    )
                else:
                    error = f"gateway_outcome_unknown: {charged.error}"
                    answer = _answer(
                        charged.status,
                        {
                            "result": "unknown",
                            "error": "gateway_outcome_unknown",
                            "retry_with_same_key": True,
                        },
                        error,
                    )
                self._update(conn, _FAILED, payment_id, error, unless_succeeded=True)
                idempotency.unlock(conn, key)
        # After the commit: the view is the truth, the stream follows it.
        with contextlib.suppress(redis.RedisError):
            if charged.kind == "charged":
                self.queue.dequeue(payment_id)
            else:
                self.queue.enqueue(payment_id, error)
        return answer

    def _update(
        self,
        conn: psycopg.Connection[DictRow],
        assignments: str,
        payment_id: str,
        error: str | None = None,
        *,
        unless_succeeded: bool = False,
    ) -> dict[str, Any] | None:
        """Update the payment (and end its charging mark); returns it as the API shows it."""
        guard = " AND status <> 'succeeded'" if unless_succeeded else ""
        row = conn.execute(
            f"UPDATE payments p SET {assignments}, updated_at = now(), charging_key = NULL,"  # noqa: S608 - constant fragments
            f" charging_since = NULL WHERE p.id = %(id)s{guard} RETURNING {PAYMENT_COLUMNS}",
            {"id": payment_id, "error": error},
        ).fetchone()
        return payment_json(row) if row is not None else None

    @staticmethod
    def _payment(conn: psycopg.Connection[DictRow], payment_id: str) -> dict[str, Any] | None:
        row = conn.execute(
            f"SELECT {PAYMENT_COLUMNS} FROM payments p WHERE p.id = %s",  # noqa: S608 - constant fragments
            (payment_id,),
        ).fetchone()
        return payment_json(row) if row is not None else None

    def _maybe_purge(self) -> None:
        """Drop expired keys now and then (expired ones are also ignored on lookup)."""
        now = time.monotonic()
        if now - self._purged_at < PURGE_EVERY_S or not self._purge_lock.acquire(blocking=False):
            return
        try:
            self._purged_at = now
            with self.pool.connection() as conn:
                idempotency.purge_expired(conn, self.settings.idempotency_key_ttl_s)
        finally:
            self._purge_lock.release()

    # -- reads ---------------------------------------------------------------------------
    def page(self, status: str | None, limit: int, after: str | None) -> dict[str, Any]:
        """A page of payments ordered by id; `next` is the id to pass as `after`."""
        where, params = [], []
        if status is not None:
            where.append("p.status = %s")
            params.append(status)
        if after is not None:
            where.append("p.id > %s")
            params.append(after)
        clause = " WHERE " + " AND ".join(where) if where else ""
        rows = self.pool.fetch(
            f"SELECT {PAYMENT_COLUMNS} FROM payments p{clause} ORDER BY p.id LIMIT %s",  # noqa: S608 - constant fragments
            (*params, limit + 1),
        )
        more = len(rows) > limit
        rows = rows[:limit]
        return {
            "payments": [payment_json(r) for r in rows],
            "next": rows[-1]["id"] if more else None,
        }

    def by_ids(self, ids: Sequence[str]) -> dict[str, Any]:
        """Exactly these payments (those that exist), ordered by id."""
        rows = self.pool.fetch(
            f"SELECT {PAYMENT_COLUMNS} FROM payments p WHERE p.id = ANY(%s) ORDER BY p.id",  # noqa: S608 - constant fragments
            (list(ids),),
        )
        return {"payments": [payment_json(r) for r in rows], "next": None}

    def get(self, payment_id: str) -> dict[str, Any] | None:
        """One payment, or None."""
        rows = self.pool.fetch(
            f"SELECT {PAYMENT_COLUMNS} FROM payments p WHERE p.id = %s",  # noqa: S608 - constant fragments
            (payment_id,),
        )
        return payment_json(rows[0]) if rows else None

    # -- bulk ----------------------------------------------------------------------------
    def retry_all_failed(self) -> dict[str, int]:
        """Retry every failed payment once, keys `bulk:<id>:<attempts>`; counts by result."""
        snapshot = self.pool.fetch(
            "SELECT id, attempts FROM payments WHERE status = 'failed' ORDER BY id"
        )
        tally: Tally[str] = Tally()

        def one(row: dict[str, Any]) -> str:
            answer = self.retry(row["id"], f"bulk:{row['id']}:{row['attempts']}", "{}")
            return answer.result or ("in_flight" if answer.status == 409 else "error")

        with ThreadPoolExecutor(BULK_WORKERS, thread_name_prefix="bulk-retry") as pool:
            tally.update(pool.map(one, snapshot))
        counts = {k: tally.get(k, 0) for k in ("succeeded", "declined", "unknown", "rate_limited")}
        counts.update({k: v for k, v in tally.items() if k not in counts})
        return counts

    # -- admin ---------------------------------------------------------------------------
    def seed(self, req: SeedRequest) -> list[str]:
        """Insert `count` failed payments (one statement) and queue them (one pipeline)."""
        ids = sorted(new_payment_id() for _ in range(req.count))
        rng = random.Random()
        customers = [
            ("cus_decline_" if rng.random() < req.declined_share else "cus_") + pid[-10:].lower()
            for pid in ids
        ]
        error = "gateway_error: seeded failure"
        with self.pool.connection() as conn:
            conn.execute(
                "INSERT INTO payments (id, customer, amount, currency, status, attempts,"
                " last_error, failed_at) SELECT t.id, t.customer, %s, %s, 'failed', 1, %s, now()"
                " FROM unnest(%s::text[], %s::text[]) AS t(id, customer)",
                (req.amount, req.currency, error, ids, customers),
            )
        self.queue.enqueue_many((pid, error) for pid in ids)
        return ids

    def truncate(self) -> None:
        """Empty the payment tables, the gateway ledger and the failed queue."""
        with self.pool.connection() as conn:
            conn.execute(TRUNCATE)
        self.queue.clear()


_FAILED = (
    "status = 'failed', last_error = %(error)s,"
    " failed_at = CASE WHEN status = 'failed' AND failed_at IS NOT NULL THEN failed_at"
    " ELSE now() END"
)
