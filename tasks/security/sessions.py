"""Revoke login sessions in Redis: every key matching the configured session pattern.

SCAN + UNLINK in batches (`tasks.redis.scan_unlink`, the cache clear's loop), a dry run
(count only) unless told otherwise. Refuses without a pattern and refuses a pattern that
matches every key (sessions share the db with other data; FLUSHDB is never an option here).
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.errors import SafetyViolation
from tasks.kubernetes.api import run_logger
from tasks.redis import matches_everything, redis_session, scan_unlink
from tasks.retry import RETRY_IDEMPOTENT_WRITE
from tasks.settings import RedisSettings, SecuritySettings


class RevokeResult(BaseModel):
    """What a session revocation matched and (unless a dry run) removed."""

    target: str
    pattern: str
    dry_run: bool
    matched: int
    revoked: int
    # No sample of key names, unlike the cache clear's: a session key usually holds the
    # session id, a bearer credential that must not reach a task result, log or artifact.


def session_pattern(settings: SecuritySettings) -> str:
    """The configured session key pattern; none, or a match-everything one, is refused."""
    pattern = (settings.session_key_pattern or "").strip()
    if not pattern:
        raise SafetyViolation(
            "no session key pattern configured (RUNBOOKS_SECURITY_SESSION_KEY_PATTERN):"
            " refusing to guess which keys are sessions"
        )
    if matches_everything(pattern):
        raise SafetyViolation(f"session pattern {pattern!r} matches every key: refused")
    return pattern


@task(**RETRY_IDEMPOTENT_WRITE, cache_policy=NO_CACHE, task_run_name="revoke-sessions-{dry_run}")
def revoke_sessions(
    dry_run: bool = True,
    settings: SecuritySettings | None = None,
    redis_settings: RedisSettings | None = None,
) -> RevokeResult:
    """Count (dry run) or UNLINK the login session keys; idempotent (a retry finds none)."""
    pattern = session_pattern(settings or SecuritySettings())
    with redis_session(redis_settings or RedisSettings()) as (client, target):
        matched, deleted, _ = scan_unlink(client, pattern, dry_run)
    run_logger().warning(
        "sessions %s on %s: %d matched, %d revoked%s",
        pattern,
        target,
        matched,
        deleted,
        " (dry run)" if dry_run else "",
    )
    return RevokeResult(
        target=target,
        pattern=pattern,
        dry_run=dry_run,
        matched=matched,
        revoked=deleted,
    )
