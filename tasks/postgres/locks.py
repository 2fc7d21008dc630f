"""The PostgreSQL advisory lock that keeps remediations of one server apart."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg.rows import DictRow

from tasks.clients import classify_pg_error, pg_connect, pg_target
from tasks.errors import RunbookError, SafetyViolation
from tasks.logs import run_logger
from tasks.settings import PostgresSettings


class AdvisoryLock:
    """A held `remediation_lock`: its session, and whether this run expects to lose it."""

    def __init__(self, conn: psycopg.Connection[DictRow], key: str, target: str) -> None:
        self._conn = conn
        self._key = key
        # Kept to blot it out of an error's text, should libpq ever quote it.
        self._secret = conn.info.password
        self.target = target
        self.expected_loss = ""
        self.released = ""

    def expect_loss(self, cause: str) -> None:
        """Say this run is about to end the lock's session itself (a restart of its server)."""
        self.expected_loss = cause

    def release(self) -> str:
        """Unlock now (once); how it ended. A session that died after `expect_loss` is no error:
        PostgreSQL released a session lock with its session. Any other failure raises."""
        if self.released:
            return self.released
        try:
            self._conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (self._key,))
        except psycopg.Error as exc:
            # Only a dead session counts as the expected loss; a live one that refused the
            # unlock is a real failure, restart or not.
            if not self.expected_loss or not (self._conn.broken or self._conn.closed):
                self.released = "unlock failed"
                raise classify_pg_error(exc, self.target, self._secret) from None
            self.released = (
                f"its session ended with {self.expected_loss}; PostgreSQL released it with the "
                "session"
            )
            run_logger().info("remediation lock on %s: %s", self.target, self.released)
            return self.released
        self.released = "released"
        return self.released


@contextmanager
def remediation_lock(name: str, settings: PostgresSettings | None = None) -> Iterator[AdvisoryLock]:
    """Hold a session advisory lock so only one remediation acts on this server at a time.

    A run that restarts this very server calls `expect_loss` first: the lock's session then
    dies on purpose, and the exit releases it quietly instead of failing the run.
    """
    settings = settings or PostgresSettings()
    key = f"incident-runbooks:{name}"
    with pg_connect(settings) as conn:
        got = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s)) AS ok", (key,)).fetchone()
        if not got or not got["ok"]:
            raise SafetyViolation(
                f"another {name} remediation holds the lock on {pg_target(settings)}; not acting"
            )
        lock = AdvisoryLock(conn, key, pg_target(settings))
        try:
            yield lock
        except BaseException:
            # The run is failing already: an unlock that fails too must not hide why.
            try:
                lock.release()
            except RunbookError as exc:
                run_logger().warning("remediation lock on %s: %s", lock.target, exc)
            raise
        lock.release()
