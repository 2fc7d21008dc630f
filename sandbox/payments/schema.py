"""The payments tables, the gateway's ledger and the `failed_transactions` view."""

from __future__ import annotations

import sys

import psycopg

#: Serialises concurrent schema creation (a backend and a gateway starting together).
_SCHEMA_LOCK = 7_022_022

SCHEMA = """
CREATE TABLE IF NOT EXISTS payments (
    id              text PRIMARY KEY CHECK (id ~ '^pay_[0-9A-Z]{26}$'),
    customer        text NOT NULL,
    amount          bigint NOT NULL CHECK (amount > 0),
    currency        text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    status          text NOT NULL CHECK (status IN ('pending', 'failed', 'succeeded')),
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text,
    failed_at       timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- The idempotency key whose gateway call is in flight: a second key waits (409).
    charging_key    text,
    charging_since  timestamptz
);
CREATE INDEX IF NOT EXISTS payments_failed ON payments (id) WHERE status = 'failed';
CREATE TABLE IF NOT EXISTS payment_idempotency_keys (
    key              text PRIMARY KEY,
    request_hash     text NOT NULL,
    payment_id       text,
    locked_at        timestamptz,
    response_status  integer,
    -- The exact bytes of the first answer: a replay is byte-identical.
    response_body    text,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS payment_idempotency_keys_created_at
    ON payment_idempotency_keys (created_at);
CREATE TABLE IF NOT EXISTS charges (
    id                 bigserial PRIMARY KEY,
    payment_id         text NOT NULL REFERENCES payments (id) ON DELETE CASCADE,
    gateway_charge_id  text NOT NULL UNIQUE,
    amount             bigint NOT NULL,
    currency           text NOT NULL,
    idempotency_key    text NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS charges_payment_id ON charges (payment_id);
CREATE TABLE IF NOT EXISTS gateway_charges (
    id               text PRIMARY KEY,
    idempotency_key  text NOT NULL UNIQUE,
    payment_ref      text NOT NULL,
    amount           bigint NOT NULL,
    currency         text NOT NULL,
    customer         text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS gateway_charges_payment_ref ON gateway_charges (payment_ref);
CREATE OR REPLACE VIEW failed_transactions AS
SELECT id, customer, amount, currency, attempts, last_error, failed_at
FROM payments WHERE status = 'failed';
"""

TRUNCATE = "TRUNCATE payments, payment_idempotency_keys, charges, gateway_charges"


def ensure_payments_schema(dsn: str) -> None:
    """Create the payments tables and view in an existing database (idempotent)."""
    with psycopg.connect(dsn, connect_timeout=5) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        conn.execute(SCHEMA)


def ensure_payments_schema_or_warn(dsn: str) -> None:
    """`ensure_payments_schema`, but an unreachable database only warns on stderr: a process
    starting before its database must still serve (its payment routes fail until then)."""
    try:
        ensure_payments_schema(dsn)
    except psycopg.Error as exc:
        sys.stderr.write(f"payments schema not ensured: {type(exc).__name__}\n")
