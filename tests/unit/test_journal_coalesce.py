"""The journal's coalescing rule and its record of resolved alerts (in-memory SQLite)."""

from __future__ import annotations

from pathlib import Path

from deployments.journal import Entry, Journal


def entry(key: str, *, target: str = "pg:h:5432/app", acts: bool = False, **kw: object) -> Entry:
    base: dict[str, object] = {
        "idempotency_key": f"{key}:2026-11-27T03:00:00Z",
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
    acting = j.add(entry("act", acts=True), now=1001.0)
    assert acting.outcome == "new"
    later = j.add(entry("plan2"), now=1002.0)
    assert (later.outcome, later.earlier_key) == ("covered", "act:2026-11-27T03:00:00Z")


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
    j.resolved("a", now=1010.0)
    assert j.alert_state("a")[0] == "resolved"
    # Fires again after the route's cooldown (a re-fire within it starts nothing and is not
    # recorded: a waiting run then reads "resolved" and does nothing, the safe side).
    j.add(entry("a", idempotency_key="a:2026-11-27T05:00:00Z"), now=1700.0)
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
