"""The PostgreSQL advisory lock (`remediation_lock`) on the real server: a session that dies
after the run said it would end it (its own database restart) is released quietly; one that
dies with no such word from the run is still an error, as is any failure of a live session."""

from __future__ import annotations

import time
import uuid

import psycopg
import pytest
from pydantic import SecretStr

from tasks.errors import SafetyViolation, TransientError
from tasks.postgres import remediation_lock
from tasks.settings import PostgresSettings
from tests.fixtures.postgres import ADMIN_DSN


def settings() -> PostgresSettings:
    """The shared server, with an application name that finds the lock's session."""
    return PostgresSettings(dsn=SecretStr(ADMIN_DSN), application_name=f"rb-lock-{uuid.uuid4()}")


def end_session(config: PostgresSettings) -> None:
    """What a restart of the server does to the lock's session: it ends, from outside."""
    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        row = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (config.application_name,),
        ).fetchone()
    assert row is not None and row[0] is True
    time.sleep(0.2)  # the backend exits after the signal


def free(name: str, config: PostgresSettings) -> bool:
    """Whether another session can take the lock now (the server released it)."""
    try:
        with remediation_lock(name, config.model_copy(update={"application_name": "rb-probe"})):
            return True
    except SafetyViolation:
        return False


def test_a_session_that_dies_after_expect_loss_is_released_quietly() -> None:
    config, name = settings(), f"test-{uuid.uuid4()}"
    with remediation_lock(name, config) as lock:
        assert not free(name, config)
        lock.expect_loss("the test's restart of the server")
        end_session(config)
    assert lock.released.startswith("its session ended with the test's restart of the server")
    assert free(name, config)


def test_a_session_that_dies_unannounced_is_still_an_error() -> None:
    config, name = settings(), f"test-{uuid.uuid4()}"
    with pytest.raises(TransientError, match="unavailable"), remediation_lock(name, config):
        end_session(config)
    assert free(name, config)


def test_expect_loss_with_a_live_session_unlocks_as_usual() -> None:
    config, name = settings(), f"test-{uuid.uuid4()}"
    with remediation_lock(name, config) as lock:
        lock.expect_loss("a restart that never came")
        assert lock.release() == "released"
        assert free(name, config)  # released early, before the block ends
    assert lock.released == "released"


def test_an_unlock_failure_does_not_hide_why_the_run_failed() -> None:
    config, name = settings(), f"test-{uuid.uuid4()}"

    def act() -> None:
        with remediation_lock(name, config):
            end_session(config)
            raise RuntimeError("the act failed")

    with pytest.raises(RuntimeError, match="the act failed"):
        act()
