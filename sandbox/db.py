"""The sandbox database: create it, give it a realistic schema and seed data, drop it.

The payments tables come from `sandbox.payments.schema`.

`orders.user_id` deliberately has no index: `/api/orders?user_id=` sequentially scans
`orders`, which is what a "missing index" check must find.
"""

from __future__ import annotations

import re

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from sandbox.payments.schema import SCHEMA as PAYMENTS_SCHEMA

_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id          integer PRIMARY KEY,
    email       text NOT NULL UNIQUE,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS products (
    id           integer PRIMARY KEY,
    sku          text NOT NULL UNIQUE,
    name         text NOT NULL,
    price_cents  integer NOT NULL CHECK (price_cents >= 0)
);
-- No index on user_id, on purpose (the "missing index" a runbook must spot).
CREATE TABLE IF NOT EXISTS orders (
    id          bigint PRIMARY KEY,
    user_id     integer NOT NULL REFERENCES users (id),
    product_id  integer NOT NULL REFERENCES products (id),
    quantity    integer NOT NULL CHECK (quantity > 0),
    status      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS audit_logs (
    id             bigserial PRIMARY KEY,
    user_id        integer,
    action         text NOT NULL,
    route          text NOT NULL,
    status         integer NOT NULL,
    ip             inet,
    response_time  double precision NOT NULL,
    release        text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS audit_logs_created_at ON audit_logs (created_at);
"""

SEED = """
SELECT setseed(0.42);
INSERT INTO users (id, email, name, created_at)
SELECT i, 'user' || i || '@example.test', 'User ' || i, now() - (i || ' hours')::interval
FROM generate_series(1, %(users)s) AS i ON CONFLICT DO NOTHING;
INSERT INTO products (id, sku, name, price_cents)
SELECT i, 'SKU-' || lpad(i::text, 5, '0'), 'Product ' || i, (100 + random() * 9900)::int
FROM generate_series(1, %(products)s) AS i ON CONFLICT DO NOTHING;
INSERT INTO orders (id, user_id, product_id, quantity, status, created_at)
SELECT i,
       1 + (random() * (%(users)s - 1))::int,
       1 + (random() * (%(products)s - 1))::int,
       1 + (random() * 4)::int,
       (ARRAY['paid', 'paid', 'paid', 'shipped', 'refunded'])[1 + (random() * 4)::int],
       now() - (random() * 90 || ' days')::interval
FROM generate_series(1, %(orders)s) AS i ON CONFLICT DO NOTHING;
ANALYZE users; ANALYZE products; ANALYZE orders;
"""


def database_dsn(admin_dsn: str, name: str) -> str:
    """`admin_dsn` with its database replaced by `name`."""
    return make_conninfo(admin_dsn, dbname=name)


def create_database(
    admin_dsn: str,
    name: str,
    *,
    users: int = 1000,
    products: int = 200,
    orders: int = 20_000,
) -> str:
    """Create (or recreate) database `name` with schema and seed data; returns its DSN."""
    if not _NAME.match(name):
        raise ValueError(f"not a plain database name: {name!r}")
    drop_database(admin_dsn, name)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = database_dsn(admin_dsn, name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute(PAYMENTS_SCHEMA)
        # Client-side binding: the seed is several statements, which the extended protocol refuses.
        with psycopg.ClientCursor(conn) as cur:
            cur.execute(SEED, {"users": users, "products": products, "orders": orders})
    return dsn


def drop_database(admin_dsn: str, name: str) -> None:
    """Drop database `name` if it exists, ending its sessions first."""
    if not _NAME.match(name):
        raise ValueError(f"not a plain database name: {name!r}")
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
