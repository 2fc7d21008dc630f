"""Where a drill reads what happened: Alertmanager, the receiver's journal, Prefect.

Every reader polls with a deadline and returns None when nothing came, so the drill can say
which step of its timeline it did not see.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx

from drills.timeline import DrillFailed, Timeline

T = TypeVar("T")
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def poll(check: Callable[[], T | None], timeout_s: float, every_s: float = 0.1) -> T | None:
    """`check()` until it returns something, or None after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value is not None or time.monotonic() >= deadline:
            return value
        time.sleep(every_s)


def parse_time(text: str) -> datetime:
    """An RFC 3339 time from Prometheus, Alertmanager or Prefect (nanoseconds cut)."""
    text = text.replace("Z", "+00:00")
    head, dot, tail = text.partition(".")
    if dot:
        zone_at = next((i for i, c in enumerate(tail) if not c.isdigit()), len(tail))
        digits, zone = tail[:zone_at], tail[zone_at:]
        text = f"{head}.{digits[:6]}{zone}"
    return datetime.fromisoformat(text)


def epoch(ts: float) -> datetime:
    """An epoch time (the journal's) as an aware UTC datetime."""
    return datetime.fromtimestamp(ts, UTC)


def occurrence(journal: Path, fingerprint: str) -> dict[str, Any] | None:
    """The receiver's record of the alert's latest occurrence (read-only), or None."""
    if not journal.exists():
        return None
    conn = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=2)
    try:
        conn.row_factory = sqlite3.Row
        row = conn.execute(
            "SELECT starts_at, fired_ts, resolved_ts, ends_at FROM occurrences"
            " WHERE fingerprint = ? ORDER BY starts_ts DESC LIMIT 1",
            (fingerprint,),
        ).fetchone()
    except sqlite3.OperationalError:  # the receiver has not created the table yet
        return None
    finally:
        conn.close()
    return dict(row) if row else None


def alert_run(api_url: str, fingerprint: str) -> dict[str, Any] | None:
    """The flow run the receiver started for the alert (tag `alert:<fingerprint>`)."""
    body = {
        "flow_runs": {"tags": {"all_": [f"alert:{fingerprint}"]}},
        "sort": "EXPECTED_START_TIME_ASC",
    }
    r = httpx.post(f"{api_url}/flow_runs/filter", json=body, timeout=5)
    r.raise_for_status()
    runs: list[dict[str, Any]] = r.json()
    return runs[0] if runs else None


def final_run(api_url: str, run_id: str) -> dict[str, Any] | None:
    """The run once in a final state, else None."""
    r = httpx.get(f"{api_url}/flow_runs/{run_id}", timeout=5)
    r.raise_for_status()
    run: dict[str, Any] = r.json()
    return run if (run.get("state") or {}).get("type") in FINAL else None


def task_runs(api_url: str, run_id: str) -> list[dict[str, Any]]:
    """The run's task runs, oldest start first."""
    body = {"task_runs": {"flow_run_id": {"any_": [run_id]}}, "sort": "EXPECTED_START_TIME_ASC"}
    r = httpx.post(f"{api_url}/task_runs/filter", json=body, timeout=5)
    r.raise_for_status()
    runs: list[dict[str, Any]] = r.json()
    return sorted(runs, key=lambda t: t.get("start_time") or "9999")


def post_incident_record(api_url: str, fingerprint: str) -> Any:
    """The record `post-incident` makes of the alert's incident (its draft: no checklist)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.post_incident import build_record
    from tasks.run_history import IncidentKey, collect

    key = IncidentKey.parse(f"alert:{fingerprint}")
    with (
        temporary_settings(updates={PREFECT_API_URL: api_url}),
        get_client(sync_client=True) as client,
    ):
        return build_record(key, collect(client, key), mode="draft")


def seen(journal: Path, fingerprint: str, column: str) -> dict[str, Any] | None:
    """The alert's journaled occurrence once `column` (fired_ts, resolved_ts) is set."""
    row = occurrence(journal, fingerprint)
    return row if row and row.get(column) else None


def task_offsets(t0: datetime | None, tasks: list[dict[str, Any]]) -> str:
    """The task runs as `name +start (duration)` from `t0`: where the run's time went."""
    parts = []
    for t in tasks:
        start = parse_time(t["start_time"])
        took = (parse_time(t["end_time"]) - start).total_seconds() if t.get("end_time") else None
        offset = (start - t0).total_seconds() if t0 else 0.0
        parts.append(f"{t['name']} +{offset:.2f}s ({took:.2f}s)" if took is not None else t["name"])
    return ", ".join(parts)


def incident_figures(api_url: str, fingerprint: str) -> dict[str, Any]:
    """The post-incident record's figures as the drill report prints them."""
    record = post_incident_record(api_url, fingerprint)
    return {
        "incident": record.incident.label(),
        "first_action_s": record.metrics.first_action_s,
        "recovery_s": record.metrics.recovery_s,
        "recovered": record.metrics.recovered,
        "recovery_by": record.metrics.recovery_by,
        "started_by": record.metrics.started_by,
    }


def alert_to_webhook(
    timeline: Timeline,
    journal: Path,
    alerts: Callable[[], list[dict[str, Any]]],
    name: str,
    wait_s: float,
    detail_label: str = "",
) -> dict[str, Any]:
    """Wait for the drill's alert in Alertmanager, then for its webhook in the receiver's
    journal; mark "alert firing" (its startsAt) and "webhook received"; the alert."""
    alert = poll(lambda: next(iter(alerts()), None), wait_s)
    if alert is None:
        raise DrillFailed("alert firing", f"{name} not in Alertmanager within {wait_s:.0f} s")
    fp = str(alert["fingerprint"])
    detail = str(alert["labels"].get(detail_label, "")) if detail_label else ""
    timeline.mark("alert firing", parse_time(alert["startsAt"]), "Alertmanager startsAt", detail)
    got = poll(lambda: seen(journal, fp, "fired_ts"), 20)
    if got is None:
        raise DrillFailed("webhook received", f"no firing notification of {fp} journaled")
    timeline.mark("webhook received", epoch(got["fired_ts"]), "receiver journal")
    return alert


def mark_first_task(timeline: Timeline, api_url: str, run: dict[str, Any]) -> list[dict[str, Any]]:
    """Mark "first task" (the run's first task to start); the run's started task runs."""
    started = [t for t in task_runs(api_url, run["id"]) if t.get("start_time")]
    if not started:
        raise DrillFailed("first task", f"run {run['name']} ran no task")
    first = started[0]
    timeline.mark("first task", parse_time(first["start_time"]), "Prefect", first["name"])
    return started


def mark_resolved(timeline: Timeline, journal: Path, fingerprint: str, wait_s: float) -> None:
    """Wait for the alert's resolved webhook in the receiver's journal; mark "alert resolved"
    at its endsAt (when Alertmanager says it ended), noting when it was received."""
    gone = poll(lambda: seen(journal, fingerprint, "resolved_ts"), wait_s)
    if gone is None:
        raise DrillFailed("alert resolved", f"no resolved notification within {wait_s:.0f} s")
    ends = parse_time(gone["ends_at"]) if gone.get("ends_at") else epoch(gone["resolved_ts"])
    received = epoch(gone["resolved_ts"]).isoformat(timespec="milliseconds")
    timeline.mark("alert resolved", ends, "endsAt of the resolved webhook", received)
