"""The receiver's outbox: every accepted firing alert, on disk before Alertmanager gets 2xx.

Why: on the embedded SQLite Prefect server a burst of `create_flow_run` calls queues on the
database lock (503 "database is locked", seconds of retries). Holding Alertmanager's request
that long makes it time out and re-send, and a 5xx makes it retry the whole group. Instead
the receiver writes the alert's run request here (one small fsync'd SQLite transaction,
unique on the idempotency key), answers, and creates the Prefect run in the background,
retrying until Prefect takes it; entries left by a stopped receiver are replayed at start.
Prefect's `idempotency_key` still guarantees one run per alert across receivers.

Each entry has a status:

- `pending`: accepted, its run not created yet (replayed at start unless older than max age);
- `created`: the run exists in Prefect (`flow_run_id`);
- `failed`: Prefect refused the run for good (a 4xx such as 409/422; `reason` says why);
- `expired`: not created within the max age: recorded, never started;
- `cancelled`: the alert resolved before its run started.

The entries also carry what the per-route cooldown needs (fingerprint, deployment, accepted
time), so a restart does not reset a cooldown. Finished entries are pruned after a retention
period.

Coalescing (alert storms): an entry names its runbook's *target* (what it would change, e.g.
`pg:db1:5432/app`) and whether it may act. Within the route's cooldown after an entry that
started a run for a target (its *handler*), an alert of another fingerprint for the same
deployment and target is recorded as `covered_by` that handler, in the same transaction as
the check: however many deliveries race, one run handles the target and the rest point at
it. A plan-only handler never covers an alert that may act.

Resolved notifications are recorded per fingerprint (`resolved`), so a run that waited can
ask whether its alert still fires (`alert_state`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

Status = Literal["pending", "created", "failed", "expired", "cancelled"]
#: Statuses that count for a cooldown: a run was (or is being) created. A run cancelled
#: before it started, refused or expired never acted, so it does not hold the next one back.
_COOLDOWN_STATUSES = ("pending", "created")

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
#: Added after the first release: an existing journal file is upgraded in place.
_COLUMNS = {
    "fingerprint": "TEXT NOT NULL DEFAULT ''",
    "status": "TEXT NOT NULL DEFAULT 'pending'",
    "reason": "TEXT",
    "accepted_ts": "REAL NOT NULL DEFAULT 0",
    "finished_ts": "REAL",
    "target": "TEXT NOT NULL DEFAULT ''",
    "acts": "INTEGER NOT NULL DEFAULT 0",
    "covered_by": "TEXT",
}
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS alert_runs_cooldown"
    " ON alert_runs (fingerprint, deployment, accepted_ts)",
    "CREATE INDEX IF NOT EXISTS alert_runs_status ON alert_runs (status, finished_ts)",
    "CREATE INDEX IF NOT EXISTS alert_runs_target ON alert_runs (deployment, target, accepted_ts)",
    "CREATE TABLE IF NOT EXISTS resolved (fingerprint TEXT PRIMARY KEY, resolved_ts REAL NOT NULL)",
)


@dataclass(frozen=True)
class Entry:
    """One accepted alert's run request."""

    idempotency_key: str
    deployment: str
    name: str
    parameters: dict[str, Any]
    tags: list[str]
    flow_run_id: str | None = None
    fingerprint: str = ""
    #: Seconds during which this fingerprint starts no other run of this deployment.
    cooldown_s: float = 0.0
    #: When it was journaled (epoch seconds); set when read back.
    accepted_ts: float = 0.0
    #: What the run would change (`Runbook.target_of`); "" = never coalesced.
    target: str = ""
    #: The route lets the run act (`auto: true`), not only plan.
    acts: bool = False
    #: The handler's idempotency key when this alert is covered by its run.
    covered_by: str | None = None


@dataclass(frozen=True)
class Added:
    """What `add_many` did with one entry."""

    #: new: recorded, its run is to be created; exists: this key was recorded before;
    #: cooldown: not recorded, the fingerprint started a run within the route's cooldown;
    #: covered: recorded as covered by the run of `earlier_key` (same target, in cooldown).
    outcome: Literal["new", "exists", "cooldown", "covered"]
    flow_run_id: str | None = None
    status: Status | None = None
    reason: str | None = None
    #: For `cooldown` and `covered`: the key of the run that holds it, and when it was accepted.
    earlier_key: str | None = None
    earlier_ts: float | None = None


@dataclass(frozen=True)
class Record:
    """One journal row as the resolve and housekeeping paths need it."""

    idempotency_key: str
    status: Status
    flow_run_id: str | None
    reason: str | None
    accepted_ts: float
    covered_by: str | None = None


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
            self._upgrade()

    def _upgrade(self) -> None:
        """Add the columns a journal written by an older receiver lacks, filling them in."""
        have = {row[1] for row in self._db.execute("PRAGMA table_info(alert_runs)")}
        missing = {name: decl for name, decl in _COLUMNS.items() if name not in have}
        if missing:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for name, decl in missing.items():
                    self._db.execute(f"ALTER TABLE alert_runs ADD COLUMN {name} {decl}")
                rows = self._db.execute(
                    "SELECT idempotency_key, accepted_at, flow_run_id, created_at FROM alert_runs"
                ).fetchall()
                for key, accepted_at, run_id, created_at in rows:
                    accepted = _epoch(accepted_at)
                    self._db.execute(
                        "UPDATE alert_runs SET fingerprint = ?, accepted_ts = ?, status = ?,"
                        " finished_ts = ? WHERE idempotency_key = ?",
                        (
                            key.split(":", 1)[0],
                            accepted,
                            "created" if run_id else "pending",
                            _epoch(created_at) if run_id and created_at else None,
                            key,
                        ),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        for statement in _INDEXES:
            self._db.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, entry: Entry, now: float | None = None) -> Added:
        """Record one request (see `add_many`)."""
        return self.add_many([entry], now)[0]

    def add_many(self, entries: list[Entry], now: float | None = None) -> list[Added]:
        """Record several requests in one transaction: one fsync for a burst (group commit).

        The cooldown is checked in the same transaction as the insert, so two deliveries of
        a flapping alert (two `startsAt`, two keys) cannot both start a run.
        """
        at = time.time() if now is None else now
        out: list[Added] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for entry in entries:
                    out.append(self._add_one(entry, at))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return out

    def _add_one(self, entry: Entry, at: float) -> Added:
        row = self._db.execute(
            "SELECT flow_run_id, status, reason FROM alert_runs WHERE idempotency_key = ?",
            (entry.idempotency_key,),
        ).fetchone()
        if row is not None:
            return Added("exists", flow_run_id=row[0], status=row[1], reason=row[2])
        if entry.cooldown_s > 0 and entry.fingerprint:
            earlier = self._db.execute(
                "SELECT idempotency_key, flow_run_id, accepted_ts FROM alert_runs"
                " WHERE fingerprint = ? AND deployment = ? AND accepted_ts > ?"
                " AND status IN (?, ?) ORDER BY accepted_ts DESC LIMIT 1",
                (entry.fingerprint, entry.deployment, at - entry.cooldown_s, *_COOLDOWN_STATUSES),
            ).fetchone()
            if earlier is not None:
                return Added(
                    "cooldown",
                    flow_run_id=earlier[1],
                    earlier_key=earlier[0],
                    earlier_ts=earlier[2],
                )
        handler = None
        if entry.cooldown_s > 0 and entry.target:
            # Same deployment and target, within the cooldown, a run of its own (not itself
            # covered), that may do at least what this alert may do.
            handler = self._db.execute(
                "SELECT idempotency_key, flow_run_id, accepted_ts FROM alert_runs"
                " WHERE deployment = ? AND target = ? AND accepted_ts > ? AND covered_by IS NULL"
                " AND acts >= ? AND status IN (?, ?) ORDER BY accepted_ts DESC LIMIT 1",
                (
                    entry.deployment,
                    entry.target,
                    at - entry.cooldown_s,
                    int(entry.acts),
                    *_COOLDOWN_STATUSES,
                ),
            ).fetchone()
        self._db.execute(
            "INSERT INTO alert_runs (idempotency_key, deployment, name, parameters, tags,"
            " accepted_at, fingerprint, status, accepted_ts, target, acts, covered_by)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
            (
                entry.idempotency_key,
                entry.deployment,
                entry.name,
                json.dumps(entry.parameters),
                json.dumps(entry.tags),
                datetime.fromtimestamp(at, UTC).isoformat(),
                entry.fingerprint,
                at,
                entry.target,
                int(entry.acts),
                handler[0] if handler else None,
            ),
        )
        if handler is not None:
            return Added(
                "covered",
                status="pending",
                flow_run_id=handler[1],
                earlier_key=handler[0],
                earlier_ts=handler[2],
            )
        return Added("new", status="pending")

    def created(self, key: str, flow_run_id: str, now: float | None = None) -> bool:
        """Record the run id; False if the entry is no longer pending (resolved meanwhile)."""
        at = time.time() if now is None else now
        with self._lock:
            cur = self._db.execute(
                "UPDATE alert_runs SET flow_run_id = ?, created_at = ?, status = 'created',"
                " finished_ts = ? WHERE idempotency_key = ? AND status = 'pending'",
                (flow_run_id, datetime.fromtimestamp(at, UTC).isoformat(), at, key),
            )
            if cur.rowcount == 1:
                return True
            # Not pending any more: keep its status, but remember the run that now exists.
            self._db.execute(
                "UPDATE alert_runs SET flow_run_id = ? WHERE idempotency_key = ?",
                (flow_run_id, key),
            )
            return False

    def finish(
        self, key: str, status: Status, reason: str, now: float | None = None, *, only_pending: bool
    ) -> bool:
        """Close an entry as failed, expired or cancelled; True if it changed."""
        at = time.time() if now is None else now
        with self._lock:
            cur = self._db.execute(
                "UPDATE alert_runs SET status = ?, reason = ?, finished_ts = ?"
                " WHERE idempotency_key = ? AND (status = 'pending' OR NOT ?)",
                (status, reason[:500], at, key, only_pending),
            )
            return cur.rowcount == 1

    def get(self, key: str) -> Record | None:
        """One entry's status, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT idempotency_key, status, flow_run_id, reason, accepted_ts, covered_by"
                " FROM alert_runs"
                " WHERE idempotency_key = ?",
                (key,),
            ).fetchone()
        return Record(*row) if row else None

    def for_fingerprint(self, fingerprint: str, limit: int = 5) -> list[Record]:
        """The most recent pending or created entries of one alert (newest first)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT idempotency_key, status, flow_run_id, reason, accepted_ts, covered_by"
                " FROM alert_runs"
                " WHERE fingerprint = ? AND status IN ('pending', 'created')"
                " ORDER BY accepted_ts DESC LIMIT ?",
                (fingerprint, limit),
            ).fetchall()
        return [Record(*row) for row in rows]

    def pending(self) -> list[Entry]:
        """Accepted but not yet created in Prefect (oldest first)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT idempotency_key, deployment, name, parameters, tags, fingerprint,"
                " accepted_ts, target, acts, covered_by FROM alert_runs"
                " WHERE status = 'pending' ORDER BY accepted_ts"
            ).fetchall()
        return [
            Entry(
                k,
                d,
                n,
                json.loads(p),
                json.loads(t),
                fingerprint=f,
                accepted_ts=a,
                target=tg,
                acts=bool(ac),
                covered_by=cb,
            )
            for k, d, n, p, t, f, a, tg, ac, cb in rows
        ]

    def uncover(self, key: str) -> None:
        """The covering alert never got a run: this entry is handled on its own."""
        with self._lock:
            self._db.execute(
                "UPDATE alert_runs SET covered_by = NULL WHERE idempotency_key = ?", (key,)
            )

    def resolved(self, fingerprint: str, now: float | None = None) -> None:
        """Record that Alertmanager said this alert resolved (the latest word wins)."""
        at = time.time() if now is None else now
        with self._lock:
            self._db.execute(
                "INSERT INTO resolved (fingerprint, resolved_ts) VALUES (?, ?)"
                " ON CONFLICT (fingerprint) DO UPDATE SET resolved_ts = excluded.resolved_ts",
                (fingerprint, at),
            )

    def alert_state(self, fingerprint: str) -> tuple[Literal["firing", "resolved", "unknown"], str]:
        """Firing or resolved, by whichever notification came last; unknown if neither."""
        with self._lock:
            fired = self._db.execute(
                "SELECT max(accepted_ts) FROM alert_runs WHERE fingerprint = ?", (fingerprint,)
            ).fetchone()[0]
            row = self._db.execute(
                "SELECT resolved_ts FROM resolved WHERE fingerprint = ?", (fingerprint,)
            ).fetchone()
        resolved = row[0] if row else None
        if resolved is not None and (fired is None or resolved >= fired):
            return "resolved", f"resolved notification received at {_iso(resolved)}"
        if fired is not None:
            return "firing", f"firing notification received at {_iso(fired)}"
        return "unknown", "the receiver has no record of this alert"

    def prune(self, retention_s: float, now: float | None = None) -> int:
        """Delete entries finished more than `retention_s` ago; pending ones are kept."""
        at = time.time() if now is None else now
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM alert_runs WHERE status != 'pending' AND finished_ts < ?",
                (at - retention_s,),
            )
            self._db.execute("DELETE FROM resolved WHERE resolved_ts < ?", (at - retention_s,))
            return cur.rowcount


def _epoch(iso: str | None) -> float:
    if not iso:
        return 0.0
    return datetime.fromisoformat(iso).timestamp()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
