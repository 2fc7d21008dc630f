"""The journal's coalescing rule and its per-occurrence alert state (in-memory SQLite)."""

from __future__ import annotations

from pathlib import Path

from deployments.journal import Entry, Journal
from deployments.routing import MODE_LEVELS

T1 = "2026-11-27T03:00:00Z"
T2 = "2026-11-27T03:04:00Z"
T3 = "2026-11-27T05:00:00Z"


def entry(key: str, *, target: str = "pg:h:5432/app", acts: int = 0, **kw: object) -> Entry:
    base: dict[str, object] = {
        "idempotency_key": f"{key}:{T1}",
        "deployment": "db-pool-exhausted/db-pool-exhausted",
        "name": key,
        "parameters": {},
        "tags": [],
        "fingerprint": key,
        "cooldown_s": 600.0,
        "target": target,
        "acts": acts,
    }
    return Entry(**(base | kw))  # type: ignore[arg-type]


def test_the_first_alert_for_a_target_handles_it_and_the_next_ones_are_covered() -> None:
    j = Journal(None)
    first, second, third = j.add_many([entry("a"), entry("b"), entry("c")], now=1000.0)
    assert first.outcome == "new"
    assert (second.outcome, second.earlier_key) == ("covered", "a:2026-11-27T03:00:00Z")
    assert (third.outcome, third.earlier_key) == ("covered", "a:2026-11-27T03:00:00Z")
    j.created("a:2026-11-27T03:00:00Z", "run-a", now=1001.0)
    j.created("b:2026-11-27T03:00:00Z", "run-b", now=1001.0)
    covered = j.get("b:2026-11-27T03:00:00Z")
    assert covered is not None and covered.covered_by == "a:2026-11-27T03:00:00Z"


def test_other_targets_deployments_and_expired_cooldowns_are_not_covered() -> None:
    j = Journal(None)
    assert j.add(entry("a"), now=1000.0).outcome == "new"
    assert j.add(entry("b", target="pg:h:5432/other"), now=1001.0).outcome == "new"
    assert j.add(entry("c", deployment="x/x"), now=1002.0).outcome == "new"
    assert j.add(entry("d", target=""), now=1003.0).outcome == "new"  # no target: never
    assert j.add(entry("e", cooldown_s=0.0), now=1004.0).outcome == "new"  # no cooldown: never
    assert j.add(entry("f"), now=1004.0 + 601).outcome == "new"  # a's and e's windows are over


def test_a_plan_only_handler_never_covers_an_alert_that_may_act() -> None:
    j = Journal(None)
    assert j.add(entry("plan"), now=1000.0).outcome == "new"
    acting = j.add(entry("act", acts=MODE_LEVELS["auto"]), now=1001.0)
    assert acting.outcome == "new"
    later = j.add(entry("plan2"), now=1002.0)
    assert (later.outcome, later.earlier_key) == ("covered", "act:2026-11-27T03:00:00Z")


def test_an_approve_handler_covers_plan_alerts_but_never_an_auto_one() -> None:
    # Coalescing compares the route modes' levels: plan < approve < auto.
    j = Journal(None)
    assert j.add(entry("approve", acts=MODE_LEVELS["approve"]), now=1000.0).outcome == "new"
    planned = j.add(entry("plan", acts=MODE_LEVELS["plan"]), now=1001.0)
    assert (planned.outcome, planned.earlier_key) == ("covered", f"approve:{T1}")
    assert j.add(entry("auto", acts=MODE_LEVELS["auto"]), now=1002.0).outcome == "new"
    approve2 = j.add(entry("approve2", acts=MODE_LEVELS["approve"]), now=1003.0)
    assert (approve2.outcome, approve2.earlier_key) == ("covered", f"auto:{T1}")


def test_a_handler_that_never_got_a_run_covers_nothing_more() -> None:
    j = Journal(None)
    j.add(entry("a"), now=1000.0)
    j.finish("a:2026-11-27T03:00:00Z", "failed", "refused", now=1000.5, only_pending=True)
    assert j.add(entry("b"), now=1001.0).outcome == "new"
    j.uncover("b:2026-11-27T03:00:00Z")
    record = j.get("b:2026-11-27T03:00:00Z")
    assert record is not None and record.covered_by is None


def test_alert_state_follows_the_last_notification() -> None:
    j = Journal(None)
    assert j.alert_state("a")[0] == "unknown"
    j.add(entry("a"), now=1000.0)
    assert j.alert_state("a")[0] == "firing"
    j.resolved("a", T1, now=1010.0)
    assert j.alert_state("a")[0] == "resolved"
    # Fires again after the route's cooldown: a new occurrence, a new run.
    j.add(entry("a", idempotency_key=f"a:{T3}"), now=1700.0)
    assert j.alert_state("a")[0] == "firing"


def test_an_old_journal_file_gains_the_new_columns(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "journal.sqlite"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE alert_runs (idempotency_key TEXT PRIMARY KEY, deployment TEXT NOT NULL,"
        " name TEXT NOT NULL, parameters TEXT NOT NULL, tags TEXT NOT NULL,"
        " accepted_at TEXT NOT NULL, flow_run_id TEXT, created_at TEXT)"
    )
    db.commit()
    db.close()
    j = Journal(path)
    assert j.add(entry("a"), now=1000.0).outcome == "new"
    assert j.add(entry("b"), now=1001.0).outcome == "covered"


# --- Alert state per occurrence (fingerprint + startsAt) ------------------------------------


def test_a_refire_within_the_cooldown_starts_nothing_and_is_firing() -> None:
    j = Journal(None)
    assert j.add(entry("a"), now=1000.0).outcome == "new"
    j.resolved("a", T1, now=1010.0)
    refire = j.add(entry("a", idempotency_key=f"a:{T2}"), now=1020.0)
    assert refire.outcome == "cooldown"  # still no second run ...
    assert [e.idempotency_key for e in j.pending()] == [f"a:{T1}"]
    state, detail = j.alert_state("a")  # ... but the alert fires again
    assert state == "firing"
    assert T2 in detail


def test_a_late_resolve_of_an_earlier_occurrence_touches_only_that_occurrence() -> None:
    j = Journal(None)
    j.add(entry("a", cooldown_s=0.0), now=1000.0)
    j.add(entry("a", idempotency_key=f"a:{T2}", cooldown_s=0.0), now=1020.0)
    late = j.resolved("a", T1, now=1030.0)
    assert [r.idempotency_key for r in late] == [f"a:{T1}"]  # the runs it may cancel
    assert j.alert_state("a")[0] == "firing"
    assert [r.idempotency_key for r in j.resolved("a", T2, now=1040.0)] == [f"a:{T2}"]
    assert j.alert_state("a")[0] == "resolved"


def test_the_latest_occurrence_decides_whatever_the_arrival_order() -> None:
    j = Journal(None)
    j.resolved("a", T2, now=1000.0)  # occurrence 2 resolved (its firing never reached us)
    j.add(entry("a"), now=1010.0)  # occurrence 1's firing, delivered late
    assert j.alert_state("a")[0] == "resolved"
    j.add(entry("a", idempotency_key=f"a:{T3}"), now=1020.0)
    assert j.alert_state("a")[0] == "firing"


def test_a_firing_redelivery_after_its_resolve_changes_nothing() -> None:
    """A resolve ends its occurrence for good: a re-fire gets a new startsAt, so a firing
    notification of the same occurrence afterwards is a late re-delivery (HA, retries)."""
    j = Journal(None)
    j.add(entry("a"), now=1000.0)
    j.resolved("a", T1, now=1010.0)
    again = j.add(entry("a"), now=1020.0)
    assert again.outcome == "exists"
    assert j.alert_state("a")[0] == "resolved"


def test_covered_and_cooled_down_alerts_are_recorded_firing() -> None:
    j = Journal(None)
    j.add(entry("a"), now=1000.0)
    assert j.add(entry("b"), now=1001.0).outcome == "covered"
    j.resolved("b", T1, now=1002.0)
    assert j.add(entry("b", idempotency_key=f"b:{T2}"), now=1003.0).outcome == "cooldown"
    assert j.alert_state("b")[0] == "firing"


def test_repeated_notifications_write_nothing() -> None:
    """Only a new occurrence or its first resolve writes a row: repeats cost no fsync."""
    j = Journal(None)
    j.add(entry("a"), now=1000.0)
    j.resolved("a", T1, now=1010.0)
    before = j._db.total_changes
    j.add(entry("a"), now=1020.0)
    j.resolved("a", T1, now=1030.0)
    assert j._db.total_changes == before


def test_pruning_forgets_quiet_alerts_and_keeps_every_answer() -> None:
    j = Journal(None)
    day = 24 * 3600.0
    j.add(entry("quiet", cooldown_s=0.0), now=1000.0)
    j.add(entry("busy", cooldown_s=0.0), now=1000.0)
    j.add(entry("busy", idempotency_key=f"busy:{T2}", cooldown_s=0.0), now=1000.0)
    j.resolved("busy", T1, now=1000.0 + 6 * day)  # a late resolve of the older occurrence
    j.prune(7 * day, now=1000.0 + 8 * day)
    assert j.alert_state("quiet")[0] == "unknown"
    state, detail = j.alert_state("busy")
    assert state == "firing" and T2 in detail
    count = j._db.execute("SELECT count(*) FROM occurrences").fetchone()[0]
    assert count == 2  # busy's two: T1 changed recently, T2 is the latest


def previous_journal(path: Path) -> None:
    """The previous receiver's file: entries, and one resolve time per fingerprint."""
    import sqlite3

    from deployments.journal import _COLUMNS, _SCHEMA

    db = sqlite3.connect(path)
    db.execute(_SCHEMA)
    for name, decl in _COLUMNS.items():
        db.execute(f"ALTER TABLE alert_runs ADD COLUMN {name} {decl}")
    db.execute("CREATE TABLE resolved (fingerprint TEXT PRIMARY KEY, resolved_ts REAL NOT NULL)")
    row = (
        "INSERT INTO alert_runs (idempotency_key, deployment, name, parameters, tags,"
        " accepted_at, fingerprint, status, accepted_ts, flow_run_id, finished_ts)"
        " VALUES (?, 'db-pool-exhausted/db-pool-exhausted', 'n', '{}', '[]', '', ?, 'created', ?,"
        " 'run', ?)"
    )
    for key, accepted in (("gone", 1000.0), ("back", 1000.0), ("firing", 1000.0)):
        db.execute(row, (f"{key}:{T1}", key, accepted, accepted))
    db.execute(row, (f"back:{T2}", "back", 1020.0, 1020.0))
    db.executemany(
        "INSERT INTO resolved VALUES (?, ?)",
        [("gone", 1010.0), ("back", 1010.0), ("unrouted", 1010.0)],
    )
    db.commit()
    db.close()


def test_a_journal_of_the_previous_receiver_keeps_its_answers(tmp_path: Path) -> None:
    """Entries and per-fingerprint resolves of the previous version become occurrences."""
    previous_journal(tmp_path / "journal.sqlite")
    j = Journal(tmp_path / "journal.sqlite")
    assert j.alert_state("gone")[0] == "resolved"
    assert j.alert_state("back")[0] == "firing"  # fired again after that resolve
    assert j.alert_state("firing")[0] == "firing"
    assert j.alert_state("unrouted")[0] == "resolved"
    assert j.alert_state("never")[0] == "unknown"
    # Its entries still hold the cooldown, and a resolve still finds its own run.
    assert j.add(entry("firing", idempotency_key=f"firing:{T3}"), now=1030.0).outcome == "cooldown"
    assert [r.flow_run_id for r in j.resolved("firing", T1, now=1040.0)] == ["run"]
    assert j.alert_state("firing")[0] == "firing"  # T3 is the latest occurrence
    j.close()
    assert Journal(tmp_path / "journal.sqlite").alert_state("gone")[0] == "resolved"
