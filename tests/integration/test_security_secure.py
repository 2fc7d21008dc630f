"""security-breach's non-Kubernetes secure steps on real things: session revocation in the
local Redis (own key prefix), the forced password reset through the sandbox backend's
endpoint (its PostgreSQL users table)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
import redis
from pydantic import SecretStr

from tasks.errors import PermanentError, SafetyViolation, TransientError
from tasks.security.passwords import force_password_reset
from tasks.security.sessions import revoke_sessions
from tasks.settings import BackendSettings, RedisSettings, SecuritySettings
from tests.fixtures.sandbox import ADMIN_TOKEN, Sandbox

SESSIONS = 1203  # more than two UNLINK batches
KEEP = ("user:1", "sessions-index", "session", "xsession:1")  # near misses of the pattern


@pytest.fixture
def keys() -> Iterator[tuple[str, redis.Redis]]:
    prefix = f"t-sec-{uuid.uuid4().hex[:8]}:"
    client = redis.Redis(host="127.0.0.1", port=6379, decode_responses=True)
    pipe = client.pipeline()
    for i in range(SESSIONS):
        pipe.set(f"{prefix}session:{i}", f"user-{i}")
    for other in KEEP:
        pipe.set(f"{prefix}{other}", "keep")
    pipe.execute()
    yield prefix, client
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        client.unlink(key)
    client.close()


def test_revoke_sessions_removes_only_matching_keys(keys: tuple[str, redis.Redis]) -> None:
    prefix, client = keys
    settings = SecuritySettings(session_key_pattern=f"{prefix}session:*")
    local = RedisSettings(url=SecretStr("redis://127.0.0.1:6379/0"))

    dry = revoke_sessions.fn(settings=settings, redis_settings=local)
    assert (dry.dry_run, dry.matched, dry.revoked) == (True, SESSIONS, 0)
    assert len(list(client.scan_iter(match=f"{prefix}session:*", count=1000))) == SESSIONS

    done = revoke_sessions.fn(dry_run=False, settings=settings, redis_settings=local)
    assert (done.matched, done.revoked) == (SESSIONS, SESSIONS)
    assert done.target == "127.0.0.1:6379/0"
    left = sorted(client.scan_iter(match=f"{prefix}*", count=1000))
    assert left == sorted(
        f"{prefix}{k}" for k in ("user:1", "sessions-index", "session", "xsession:1")
    )
    again = revoke_sessions.fn(dry_run=False, settings=settings, redis_settings=local)
    assert (again.matched, again.revoked) == (0, 0)  # idempotent


def test_revoke_sessions_refuses_without_a_narrow_pattern(keys: tuple[str, redis.Redis]) -> None:
    prefix, client = keys
    local = RedisSettings(url=SecretStr("redis://127.0.0.1:6379/0"))
    for pattern, match in ((None, "no session key pattern"), ("", "no session"), ("*", "every")):
        with pytest.raises(SafetyViolation, match=match):
            revoke_sessions.fn(
                dry_run=False,
                settings=SecuritySettings(session_key_pattern=pattern),
                redis_settings=local,
            )
    assert len(list(client.scan_iter(match=f"{prefix}*", count=1000))) == SESSIONS + 4


def _flags(dsn: str) -> tuple[int, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE must_reset_password) FROM users"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def test_force_password_reset_through_the_sandbox(sandbox_backend: Sandbox) -> None:
    dsn = sandbox_backend.settings.database_dsn
    security = SecuritySettings(password_reset_token=SecretStr(ADMIN_TOKEN))
    backend = sandbox_backend.backend_settings()
    try:
        dry = force_password_reset.fn(settings=security, backend=backend)
        users, before = _flags(dsn)
        assert users > 0 and dry.dry_run and dry.flagged == 0
        assert (dry.users, dry.must_reset) == (users, before)

        done = force_password_reset.fn(dry_run=False, settings=security, backend=backend)
        assert (done.users, done.must_reset, done.flagged) == (users, users, users - before)
        assert _flags(dsn) == (users, users)
        again = force_password_reset.fn(dry_run=False, settings=security, backend=backend)
        assert (again.flagged, again.must_reset) == (0, users)  # idempotent
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE users SET must_reset_password = false")


def test_force_password_reset_failures_are_clear_and_never_name_the_token(
    sandbox_backend: Sandbox,
) -> None:
    backend = sandbox_backend.backend_settings()
    wrong = SecuritySettings(password_reset_token=SecretStr("wrong-token-Xy7"))
    with pytest.raises(PermanentError, match=r"refused the token \(HTTP 401\)") as err:
        force_password_reset.fn(dry_run=False, settings=wrong, backend=backend)
    assert "wrong-token-Xy7" not in str(err.value) and ADMIN_TOKEN not in str(err.value)
    with pytest.raises(PermanentError, match="no token"):
        force_password_reset.fn(dry_run=False, settings=SecuritySettings(), backend=backend)
    missing = SecuritySettings(
        password_reset_token=SecretStr(ADMIN_TOKEN), password_reset_path="/api/admin/nope"
    )
    with pytest.raises(PermanentError, match="HTTP 404"):
        force_password_reset.fn(dry_run=False, settings=missing, backend=backend)
    down = BackendSettings(url="http://127.0.0.1:9", connect_timeout_s=0.5)
    security = SecuritySettings(password_reset_token=SecretStr(ADMIN_TOKEN))
    with pytest.raises(TransientError, match="unreachable"):
        force_password_reset.fn(dry_run=False, settings=security, backend=down)
