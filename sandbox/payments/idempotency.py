"""Stripe's idempotency-key semantics over `payment_idempotency_keys`, in PostgreSQL.

A request claims its key inside a transaction: `INSERT ... ON CONFLICT DO NOTHING`, then
`SELECT ... FOR UPDATE` when the key existed. So two concurrent requests with one key are
serialised by the row lock: one owns the key, the other sees it locked (409). A finished
request stores its answer (replayed byte for byte); an outcome the gateway left unknown stores
nothing and unlocks the key, so the same key resumes it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

import psycopg
from psycopg.rows import DictRow

MAX_KEY_LENGTH = 255


def key_problem(key: str | None) -> str | None:
    """Why `key` is not a usable Idempotency-Key (None when it is)."""
    if key is None or key == "":
        return "idempotency_key_required"
    if len(key) > MAX_KEY_LENGTH or not all(" " <= ch <= "~" for ch in key):
        return "idempotency_key_invalid"
    return None


def canonical_body(body: dict[str, Any] | None) -> str:
    """The body as compared between requests: sorted keys, no whitespace, absent = {}."""
    return json.dumps(body or {}, sort_keys=True, separators=(",", ":"))


def request_hash(method: str, path: str, body: str) -> str:
    """What makes two requests "the same request" for one key."""
    return hashlib.sha256(f"{method} {path} {body}".encode()).hexdigest()


def gateway_key(payment_id: str, client_key: str) -> str:
    """The gateway's idempotency key for a client key: the same client key can never charge
    twice, a new client key always may."""
    return "gk_" + hashlib.sha256(f"{payment_id}:{client_key}".encode()).hexdigest()


@dataclass(frozen=True)
class Claim:
    """What claiming a key found."""

    kind: Literal["owned", "replay", "reused", "in_flight"]
    payment_id: str | None = None
    status: int | None = None
    body: str | None = None


def claim(
    conn: psycopg.Connection[DictRow],
    key: str,
    req_hash: str,
    payment_id: str | None,
    lock_s: float,
    ttl_s: int,
) -> Claim:
    """Lock `key` for this request (call inside a transaction)."""
    inserted = conn.execute(
        "INSERT INTO payment_idempotency_keys (key, request_hash, payment_id, locked_at)"
        " VALUES (%s, %s, %s, now()) ON CONFLICT (key) DO NOTHING RETURNING key",
        (key, req_hash, payment_id),
    ).fetchone()
    if inserted is not None:
        return Claim("owned", payment_id)
    row = conn.execute(
        "SELECT request_hash, payment_id, response_status, response_body,"
        " locked_at > now() - make_interval(secs => %s) AS locked,"
        " created_at < now() - make_interval(secs => %s) AS expired"
        " FROM payment_idempotency_keys WHERE key = %s FOR UPDATE",
        (lock_s, ttl_s, key),
    ).fetchone()
    if row is None:  # deleted (truncated, purged) between the two statements: start afresh
        return claim(conn, key, req_hash, payment_id, lock_s, ttl_s)
    if row["expired"]:
        conn.execute(
            "UPDATE payment_idempotency_keys SET request_hash = %s, payment_id = %s,"
            " locked_at = now(), response_status = NULL, response_body = NULL,"
            " created_at = now() WHERE key = %s",
            (req_hash, payment_id, key),
        )
        return Claim("owned", payment_id)
    if row["request_hash"] != req_hash:
        return Claim("reused")
    if row["response_status"] is not None:
        return Claim("replay", row["payment_id"], row["response_status"], row["response_body"])
    if row["locked"]:
        return Claim("in_flight")
    # Unlocked (an unknown outcome) or abandoned (its request died): resume it.
    conn.execute("UPDATE payment_idempotency_keys SET locked_at = now() WHERE key = %s", (key,))
    return Claim("owned", row["payment_id"])


def store(conn: psycopg.Connection[DictRow], key: str, status: int, body: str) -> None:
    """Record the definite answer for `key` and unlock it."""
    conn.execute(
        "UPDATE payment_idempotency_keys SET response_status = %s, response_body = %s,"
        " locked_at = NULL WHERE key = %s",
        (status, body, key),
    )


def unlock(conn: psycopg.Connection[DictRow], key: str, payment_id: str | None = None) -> None:
    """Unlock `key` without an answer: the same key may resume the request."""
    conn.execute(
        "UPDATE payment_idempotency_keys SET locked_at = NULL,"
        " payment_id = COALESCE(%s, payment_id) WHERE key = %s",
        (payment_id, key),
    )


def purge_expired(conn: psycopg.Connection[DictRow], ttl_s: int) -> int:
    """Delete keys older than the TTL; returns how many."""
    cur = conn.execute(
        "DELETE FROM payment_idempotency_keys WHERE created_at < now() - make_interval(secs => %s)",
        (ttl_s,),
    )
    return cur.rowcount
