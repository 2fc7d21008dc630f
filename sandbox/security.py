"""The sandbox's forced password reset: `POST /api/admin/users/force-password-reset`.

Sets `users.must_reset_password` for every user (the column is added on first use), behind
the admin token. Body `{"dry_run": true}` counts without changing anything. The answer:
`users` (all), `flagged` (newly flagged by this call; 0 on a repeat: idempotent),
`must_reset` (flagged after the call).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.params import Depends as DependsParam
from pydantic import BaseModel

from sandbox.pool import Pool

RESET_PATH = "/api/admin/users/force-password-reset"
_COLUMN = (
    "ALTER TABLE users ADD COLUMN IF NOT EXISTS must_reset_password boolean NOT NULL DEFAULT false"
)


class ResetRequest(BaseModel):
    """The body: a dry run only counts."""

    dry_run: bool = False


def force_reset(pool: Pool, dry_run: bool) -> dict[str, Any]:
    """Flag every user (or count them, on a dry run)."""
    with pool.connection() as conn:
        conn.execute(_COLUMN)
        flagged = 0
        if not dry_run:
            flagged = conn.execute(
                "UPDATE users SET must_reset_password = true WHERE NOT must_reset_password"
            ).rowcount
        row = conn.execute(
            "SELECT count(*) AS users, count(*) FILTER (WHERE must_reset_password) AS must_reset"
            " FROM users"
        ).fetchone()
    assert row is not None
    return {
        "users": int(row["users"]),
        "must_reset": int(row["must_reset"]),
        "flagged": int(flagged),
        "dry_run": dry_run,
    }


def add_security_routes(app: FastAPI, pool: Pool, guarded: Sequence[DependsParam]) -> None:
    """Mount the forced password reset on `app`, behind the admin token."""

    @app.post(RESET_PATH, dependencies=list(guarded))
    def force_password_reset(req: ResetRequest | None = None) -> dict[str, Any]:
        return force_reset(pool, bool(req and req.dry_run))
