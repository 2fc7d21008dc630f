"""The receiver's outbox: every accepted firing alert, on disk before Alertmanager gets 2xx.

Why: on the embedded SQLite Prefect server a burst of `create_flow_run` calls queues on the
database lock (503 "database is locked", seconds of retries). Holding Alertmanager's request
that long makes it time out and re-send, and a 5xx makes it retry the whole group. Instead
the receiver writes the alert's run request here (one small fsync'd SQLite transaction,
unique on the idempotency key), answers, and creates the Prefect run in the background,
retrying until Prefect takes it; entries left by a stopped receiver are replayed at start.
Prefect's `idempotency_key` still guarantees one run per alert across receivers.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alert_runs (
    idempotency_key TEXT PRIMARY KEY,
    deployment      TEXT NOT NULL,
    name            TEXT NOT NULL,
    parameters      TEXT NOT NULL,
    tags            TEXT NOT NULL,
    accepted_at     TEXT NOT NULL,
    flow_run_id     TEXT,
    created_at      TEXT
)
"""


@dataclass(frozen=True)
class Entry:
    """One accepted alert's run request."""

    idempotency_key: str
    deployment: str
    name: str
    parameters: dict[str, Any]
    tags: list[str]
    flow_run_id: str | None = None


class Journal:
    """A tiny durable table; `path=None` keeps it in memory (tests)."""

    def __init__(self, path: Path | None) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            str(path) if path else ":memory:", check_same_thread=False, isolation_level=None
        )
        self._lock = threading.Lock()
        with self._lock:
            if path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # accepted means on disk
            self._db.execute(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, entry: Entry) -> tuple[bool, str | None]:
        """Record the request; (True, None) if new, else (False, its run id if created)."""
        return self.add_many([entry])[0]

    def add_many(self, entries: list[Entry]) -> list[tuple[bool, str | None]]:
        """Record several requests in one transaction: one fsync for a burst (group commit)."""
        out: list[tuple[bool, str | None]] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for entry in entries:
                    cur = self._db.execute(
                        "INSERT OR IGNORE INTO alert_runs (idempotency_key, deployment, name,"
                        " parameters, tags, accepted_at) VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            entry.idempotency_key,
                            entry.deployment,
                            entry.name,
                            json.dumps(entry.parameters),
                            json.dumps(entry.tags),
                            datetime.now(UTC).isoformat(),
                        ),
                    )
                    if cur.rowcount == 1:
                        out.append((True, None))
                        continue
                    row = self._db.execute(
                        "SELECT flow_run_id FROM alert_runs WHERE idempotency_key = ?",
                        (entry.idempotency_key,),
                    ).fetchone()
                    out.append((False, row[0] if row else None))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return out

    def created(self, key: str, flow_run_id: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE alert_runs SET flow_run_id = ?, created_at = ? WHERE idempotency_key = ?",
                (flow_run_id, datetime.now(UTC).isoformat(), key),
            )

    def pending(self) -> list[Entry]:
        """Accepted but not yet created in Prefect (oldest first)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT idempotency_key, deployment, name, parameters, tags FROM alert_runs"
                " WHERE flow_run_id IS NULL ORDER BY accepted_at"
            ).fetchall()
        return [Entry(k, d, n, json.loads(p), json.loads(t)) for k, d, n, p, t in rows]
