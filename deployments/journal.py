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
`pg:db1:5432/app`) and how much it may do (plan, approve, auto). Within the route's
cooldown after an entry that started a run for a target (its *handler*), an alert of
another fingerprint for the same deployment and target is recorded as `covered_by` that
handler, in the same transaction as the check: however many deliveries race, one run
handles the target and the rest point at it. A handler never covers an alert whose route
lets it do more (a plan-only run never stands in for an `approve` alert, an `approve` run
never for an `auto` one).

Alert state (`occurrences`): every firing and resolved notification of a routed alert is
recorded per *occurrence* (fingerprint + startsAt, the idempotency key), in the same
transaction as the entry (a firing one) or alone (a resolved one), also when it starts
nothing (within the cooldown, covered, expired). Alertmanager semantics decide the answer:
- one fingerprint is one label set, and Prometheus keeps at most one active alert per label
  set: a re-fire after a resolve carries a new startsAt, so the occurrence with the latest
  startsAt is the alert's current state, whatever order the notifications arrived in (a late
  resolve of an earlier occurrence never turns a newer one resolved);
- a resolved notification carries its occurrence's startsAt (and an endsAt) and ends that
  occurrence for good: a firing notification of it that arrives afterwards is a late
  re-delivery (HA peers and retries are at-least-once and unordered) and changes nothing.
A run that waited asks `alert_state` whether its alert still fires; a resolve cancels only
the runs of its own occurrence (`resolved` returns them).
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

from pydantic import TypeAdapter, ValidationError

Status = Literal["pending", "created", "failed", "expired", "cancelled"]
AlertState = Literal["firing", "resolved", "unknown"]
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
)
#: One row per alert occurrence: what Alertmanager said about it, and when we heard it.
_OCCURRENCES = """
CREATE TABLE occurrences (
    fingerprint TEXT NOT NULL,
    starts_at   TEXT NOT NULL,  -- Alertmanager's text, as in the idempotency key
    starts_ts   REAL NOT NULL,  -- the same instant, for ordering occurrences
    fired_ts    REAL,           -- first firing notification received
    resolved_ts REAL,           -- first resolved notification received: the end, for good
    ends_at     TEXT,           -- the resolved notification's endsAt
    seen_ts     REAL NOT NULL,  -- last change (pruning)
    PRIMARY KEY (fingerprint, starts_at)
) WITHOUT ROWID
"""
#: No secondary index: `alert_state` reads one alert's few occurrences by the key's prefix,
#: and pruning scans the bounded table every few minutes; each index would cost every new
#: occurrence another b-tree write on the delivery's path.
_DATETIME = TypeAdapter(datetime)


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
    #: How much the route lets the run do (`routing.MODE_LEVELS`: 0 plan, 1 approve,
    #: 2 auto); a run covers only alerts whose route lets them do no more.
    acts: int = 0
    #: The handler's idempotency key when this alert is covered by its run.
    covered_by: str | None = None
    #: The occurrence's startsAt (Alertmanager's text); "" = the key's part after the
    #: fingerprint (`fingerprint:startsAt`).
    starts_at: str = ""

    @property
    def occurrence(self) -> tuple[str, str]:
        """(fingerprint, startsAt) of the alert occurrence this entry was accepted for."""
        fingerprint, _, tail = self.idempotency_key.partition(":")
        return self.fingerprint or fingerprint, self.starts_at or tail


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
        self._upgrade_occurrences()
        for statement in _INDEXES:
            self._db.execute(statement)

    def _upgrade_occurrences(self) -> None:
        """Create the per-occurrence record; from an older journal, fill it from its entries.

        An older receiver kept one firing time per entry and one resolve time per
        fingerprint: each entry becomes a firing occurrence, resolved if that fingerprint's
        resolve came after it; a resolve with no entry left becomes a resolved occurrence
        of unknown startsAt (older than any real one).
        """
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master")}
        if "occurrences" in tables:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(_OCCURRENCES)
            rows = self._db.execute(
                "SELECT idempotency_key, fingerprint, accepted_ts FROM alert_runs"
            ).fetchall()
            for key, fingerprint, accepted in rows:
                fp, _, starts_at = key.partition(":")
                self._db.execute(
                    "INSERT OR IGNORE INTO occurrences (fingerprint, starts_at, starts_ts,"
                    " fired_ts, seen_ts) VALUES (?, ?, ?, ?, ?)",
                    (fingerprint or fp, starts_at, _starts_ts(starts_at), accepted, accepted),
                )
            if "resolved" in tables:
                for fingerprint, resolved in self._db.execute(
                    "SELECT fingerprint, resolved_ts FROM resolved"
                ).fetchall():
                    self._db.execute(
                        "UPDATE occurrences SET resolved_ts = ?, seen_ts = max(seen_ts, ?)"
                        " WHERE fingerprint = ? AND fired_ts <= ?",
                        (resolved, resolved, fingerprint, resolved),
                    )
                    self._db.execute(
                        "INSERT OR IGNORE INTO occurrences (fingerprint, starts_at, starts_ts,"
                        " resolved_ts, seen_ts) SELECT ?, '', 0, ?, ? WHERE NOT EXISTS"
                        " (SELECT 1 FROM occurrences WHERE fingerprint = ?)",
                        (fingerprint, resolved, resolved, fingerprint),
                    )
                self._db.execute("DROP TABLE resolved")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

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
        # Whatever happens to the run request below (new, repeat, cooldown, covered), the
        # source said "firing" for this occurrence. A repeat changes no row: no extra write.
        fingerprint, starts_at = entry.occurrence
        self._db.execute(
            "INSERT INTO occurrences (fingerprint, starts_at, starts_ts, fired_ts, seen_ts)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (fingerprint, starts_at) DO UPDATE SET"
            " fired_ts = excluded.fired_ts, seen_ts = max(seen_ts, excluded.seen_ts)"
            " WHERE fired_ts IS NULL",
            (fingerprint, starts_at, _starts_ts(starts_at), at, at),
        )
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
                acts=int(ac),
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

    def resolved(
        self, fingerprint: str, starts_at: str, ends_at: str | None = None, now: float | None = None
    ) -> list[Record]:
        """Record a resolved notification of one occurrence; the runs it may still cancel.

        The first resolve ends the occurrence (a later one changes no row: no extra write).
        Only this occurrence's pending or created entry is returned: a late resolve of an
        earlier occurrence never reaches a newer occurrence's run.
        """
        at = time.time() if now is None else now
        with self._lock:
            self._db.execute(
                "INSERT INTO occurrences (fingerprint, starts_at, starts_ts, resolved_ts,"
                " ends_at, seen_ts) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (fingerprint, starts_at) DO UPDATE SET"
                " resolved_ts = excluded.resolved_ts, ends_at = excluded.ends_at,"
                " seen_ts = max(seen_ts, excluded.seen_ts) WHERE resolved_ts IS NULL",
                (fingerprint, starts_at, _starts_ts(starts_at), at, ends_at, at),
            )
            rows = self._db.execute(
                "SELECT idempotency_key, status, flow_run_id, reason, accepted_ts, covered_by"
                " FROM alert_runs WHERE idempotency_key = ? AND status IN ('pending', 'created')",
                (f"{fingerprint}:{starts_at}",),
            ).fetchall()
        return [Record(*row) for row in rows]

    def alert_state(self, fingerprint: str) -> tuple[AlertState, str]:
        """Firing or resolved: the state of the alert's latest occurrence (by startsAt).

        Unknown when no notification of it was recorded (or all were pruned).
        """
        with self._lock:
            row = self._db.execute(
                "SELECT starts_at, fired_ts, resolved_ts FROM occurrences WHERE fingerprint = ?"
                " ORDER BY starts_ts DESC, seen_ts DESC LIMIT 1",
                (fingerprint,),
            ).fetchone()
        if row is None:
            return "unknown", "the receiver has no record of this alert"
        starts_at, fired, resolved = row
        occurrence = f"occurrence startsAt {starts_at}" if starts_at else "occurrence"
        if resolved is not None:
            return "resolved", f"{occurrence}: resolved notification received at {_iso(resolved)}"
        return "firing", f"{occurrence}: firing notification received at {_iso(fired)}"

    def prune(self, retention_s: float, now: float | None = None) -> int:
        """Delete entries finished more than `retention_s` ago; pending ones are kept.

        Occurrences unchanged for that long go too, but never the latest of an alert whose
        other occurrences are still recent: what is left always gives the same answer.
        """
        at = time.time() if now is None else now
        cutoff = at - retention_s
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM alert_runs WHERE status != 'pending' AND finished_ts < ?", (cutoff,)
            )
            # Alerts quiet for the whole retention: forgotten ("unknown").
            self._db.execute(
                "DELETE FROM occurrences WHERE fingerprint IN (SELECT fingerprint FROM"
                " occurrences GROUP BY fingerprint HAVING max(seen_ts) < ?)",
                (cutoff,),
            )
            # Old occurrences superseded by a later one never decide the answer again.
            self._db.execute(
                "DELETE FROM occurrences AS o WHERE seen_ts < ? AND EXISTS (SELECT 1 FROM"
                " occurrences AS n WHERE n.fingerprint = o.fingerprint"
                " AND n.starts_ts > o.starts_ts)",
                (cutoff,),
            )
            return cur.rowcount


def _starts_ts(starts_at: str) -> float:
    """startsAt as epoch seconds, for ordering; 0 (older than any) if it is not a timestamp."""
    try:
        return _DATETIME.validate_python(starts_at).timestamp()
    except (ValidationError, ValueError, OverflowError):
        return 0.0


def _epoch(iso: str | None) -> float:
    if not iso:
        return 0.0
    return datetime.fromisoformat(iso).timestamp()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
