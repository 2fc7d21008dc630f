"""Force a password reset for every user through the backend's admin endpoint.

`POST <backend url><password_reset_path>` with the bearer token (settings or a Prefect
Secret block), body `{"dry_run": ...}`. A dry run (the default) only counts. Idempotent on
the backend (flagging a flagged user again changes nothing), so the write is retried on
transient errors; the token is sent in a header only and never named in errors or logs.
"""

from __future__ import annotations

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from tasks.clients import backend_http, resolve_secret
from tasks.errors import PermanentError, TransientError
from tasks.kubernetes.api import run_logger
from tasks.retry import RETRY_IDEMPOTENT_WRITE
from tasks.settings import BackendSettings, SecuritySettings


class PasswordResetResult(BaseModel):
    """What the backend answered: how many users must now reset their password."""

    endpoint: str
    dry_run: bool
    users: int = Field(description="Users the backend has.")
    must_reset: int = Field(description="Users flagged to reset after the call.")
    flagged: int = Field(description="Users newly flagged by this call (0 on a repeat).")


@task(
    **RETRY_IDEMPOTENT_WRITE,
    cache_policy=NO_CACHE,
    task_run_name="force-password-reset-{dry_run}",
)
def force_password_reset(
    dry_run: bool = True,
    settings: SecuritySettings | None = None,
    backend: BackendSettings | None = None,
) -> PasswordResetResult:
    """Count (dry run) or flag every user for a forced password reset, via the backend."""
    settings = settings or SecuritySettings()
    backend = backend or BackendSettings()
    path = settings.password_reset_path
    if not path.startswith("/"):
        raise PermanentError(f"password_reset_path must start with '/', not {path!r}")
    token = resolve_secret(
        settings.password_reset_token, settings.password_reset_token_secret_block
    )
    if not token:
        raise PermanentError(
            "no token for the password-reset endpoint (RUNBOOKS_SECURITY_PASSWORD_RESET_TOKEN"
            " or its _SECRET_BLOCK): nothing sent"
        )
    what = f"password reset endpoint {backend.url.rstrip('/')}{path}"
    headers = {"Authorization": f"Bearer {token}"}
    try:
        with backend_http(backend, headers=headers) as client:
            resp = client.post(path, json={"dry_run": dry_run})
    except httpx.HTTPError as exc:
        raise TransientError(f"{what} unreachable ({type(exc).__name__})") from None
    if resp.status_code in (401, 403):
        raise PermanentError(f"{what} refused the token (HTTP {resp.status_code})")
    if resp.status_code >= 500 or resp.status_code == 429:
        raise TransientError(f"{what} answered HTTP {resp.status_code}")
    if resp.status_code >= 300:
        raise PermanentError(f"{what} answered HTTP {resp.status_code}")
    try:
        body = resp.json()
        result = PasswordResetResult(
            endpoint=what.removeprefix("password reset endpoint "),
            dry_run=bool(body.get("dry_run", dry_run)),
            users=int(body["users"]),
            must_reset=int(body["must_reset"]),
            flagged=int(body.get("flagged", 0)),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        raise PermanentError(f"{what} answered something that is not a reset count") from None
    run_logger().warning(
        "forced password reset%s: %d user(s), %d newly flagged, %d must reset",
        " (dry run)" if dry_run else "",
        result.users,
        result.flagged,
        result.must_reset,
    )
    return result
