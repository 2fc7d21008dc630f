"""The receiver records every notification per occurrence (fingerprint + startsAt).

Issue 18, item 5: a re-fire inside the route cooldown starts no run but is firing for
`GET /alerts/{fingerprint}`; a resolve cancels only the runs of its own occurrence. Prefect
is the recording stand-in here (the receiver's own decisions); against a real Prefect server:
tests/integration/test_triggers_prefect.py (the late resolve) and
tests/integration/test_db_pool_locks.py (the approved run acts after a re-fire).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from deployments.journal import Journal
from tasks.run_tags import ALERT_SOURCE, alert_tag, covered_by_tag
from tests.fixtures.triggers import RecordingRuns, alert, bearer, no_cooldown_table, payload
from tests.unit.test_receiver_edges import app_with

T1 = "2026-11-27T03:00:00Z"
T2 = "2026-11-27T03:04:00Z"


def send(client: TestClient, one: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/alerts", json=payload(one, status=one["status"]), headers=bearer())
    assert r.status_code == 200, r.text
    return dict(r.json()["alerts"][0])


def state(client: TestClient, fingerprint: str) -> str:
    r = client.get(f"/alerts/{fingerprint}", headers=bearer())
    assert r.status_code == 200, r.text
    return str(r.json()["state"])


def resolved(one: dict[str, Any]) -> dict[str, Any]:
    return {**one, "status": "resolved", "endsAt": "2026-11-27T03:02:00Z"}


def test_a_refire_within_the_cooldown_is_firing_and_starts_nothing(
    recording_runs: RecordingRuns,
) -> None:
    first = alert(namespace="o", fingerprint="occ1", starts_at=T1)
    with TestClient(app_with(recording_runs)) as client:
        assert send(client, first)["outcome"] == "started"
        send(client, resolved(first))
        assert state(client, "occ1") == "resolved"
        refire = send(client, alert(namespace="o", fingerprint="occ1", starts_at=T2))
        assert refire["outcome"] == "cooldown"
        assert state(client, "occ1") == "firing"
    assert len(recording_runs.calls) == 1  # the cooldown still holds the run back


def test_the_refire_survives_a_restart(tmp_path: Path, recording_runs: RecordingRuns) -> None:
    path = tmp_path / "journal.sqlite3"
    first = alert(namespace="o", fingerprint="occ2", starts_at=T1)
    with TestClient(app_with(recording_runs, Journal(path))) as client:
        send(client, first)
        send(client, resolved(first))
        send(client, alert(namespace="o", fingerprint="occ2", starts_at=T2))
    with TestClient(app_with(recording_runs, Journal(path))) as client:
        assert state(client, "occ2") == "firing"


def test_a_late_resolve_of_an_earlier_occurrence_leaves_the_newer_run_alone(
    recording_runs: RecordingRuns,
) -> None:
    one = alert(namespace="o", fingerprint="occ3", starts_at=T1)
    two = alert(namespace="o", fingerprint="occ3", starts_at=T2)
    with TestClient(app_with(recording_runs, table=no_cooldown_table())) as client:
        run_one = send(client, one)["flow_run_id"]
        run_two = send(client, two)["flow_run_id"]
        assert run_one != run_two
        send(client, resolved(one))  # delivered after occurrence 2 fired
        assert state(client, "occ3") == "firing"
        assert recording_runs.cancel_requests == [run_one]
        send(client, resolved(two))
        assert state(client, "occ3") == "resolved"
    assert recording_runs.cancel_requests == [run_one, run_two]


def test_a_resolve_of_a_cooled_down_occurrence_cancels_nothing(
    recording_runs: RecordingRuns,
) -> None:
    one = alert(namespace="o", fingerprint="occ4", starts_at=T1)
    two = alert(namespace="o", fingerprint="occ4", starts_at=T2)
    with TestClient(app_with(recording_runs)) as client:
        send(client, one)
        assert send(client, two)["outcome"] == "cooldown"
        answer = send(client, resolved(two))
        assert answer["outcome"] == "resolved"
        # Occurrence 1 never resolved, but occurrence 2 (later) did: the alert is over.
        assert state(client, "occ4") == "resolved"
    assert recording_runs.cancel_requests == []


def test_resolved_alerts_start_drafts_only_where_post_incident_is_in_the_catalog() -> None:
    # The intake indexes runbooks by name (routes name them); post-incident is looked up
    # by its deployment, `post-incident/post-incident`.
    from deployments.catalog import RUNBOOKS
    from deployments.intake import Intake
    from tests.fixtures.stub_runbooks import STUB_RUNBOOKS
    from tests.fixtures.triggers import stub_table

    def drafts(runbooks: Any) -> bool:
        intake = Intake(
            table=stub_table(),
            runbooks=runbooks,
            runs=RecordingRuns(),
            pool=None,
            grace_s=0,
            cache_size=0,
        )
        return bool(intake._resolutions.post_incident)

    assert drafts(RUNBOOKS)
    assert not drafts(STUB_RUNBOOKS)


def test_a_resolve_reaching_the_other_receiver_cancels_that_occurrences_run_only(
    recording_runs: RecordingRuns,
) -> None:
    """Two receivers, one Prefect: B never saw the firing alert; its resolve finds A's run by
    the occurrence's key (never another occurrence's run) and asks to cancel it."""
    one = alert(namespace="o", fingerprint="occ5", starts_at=T1)
    two = alert(namespace="o", fingerprint="occ5", starts_at=T2)
    a = app_with(recording_runs, table=no_cooldown_table())
    b = app_with(recording_runs, table=no_cooldown_table())
    with TestClient(a) as client_a, TestClient(b) as client_b:
        run_one = send(client_a, one)["flow_run_id"]
        run_two = send(client_a, two)["flow_run_id"]
        answer = send(client_b, resolved(one))
        assert recording_runs.cancel_requests == [run_one]
        assert recording_runs.lookups == ["occ5:" + T1]
        assert state(client_b, "occ5") == "resolved"  # B recorded the notification
        # Unrouted: no route, so no receiver started a run of it; Prefect is not asked.
        send(client_b, resolved(alert("NoSuchRoute", fingerprint="occ6", starts_at=T1)))
        send(client_b, resolved(two))
    assert answer["outcome"] == "resolved"  # the stand-in cancels nothing: state unknown
    assert recording_runs.lookups == ["occ5:" + T1, "occ5:" + T2]
    assert recording_runs.cancel_requests == [run_one, run_two]


def test_a_covered_run_found_in_prefect_is_left_alone(recording_runs: RecordingRuns) -> None:
    """A covered alert's run never executes: the other receiver notes it, cancels nothing."""
    covered = alert(namespace="o", fingerprint="occ7", starts_at=T1)
    # The run another receiver created for it (Completed "Covered"), with that receiver's tags.
    asyncio.run(
        recording_runs.create_run(
            "stub-remediate/stub-remediate",
            name="stubauto-occ7",
            parameters={},
            tags=[ALERT_SOURCE, alert_tag("occ7"), covered_by_tag("handler-run-id")],
            idempotency_key="occ7:" + T1,
            grace_s=0.0,
            covered_by="handler-run-id",
        )
    )
    with TestClient(app_with(recording_runs)) as client:
        answer = send(client, resolved(covered))
    assert recording_runs.lookups == ["occ7:" + T1]
    assert recording_runs.cancel_requests == []
    assert answer["outcome"] == "resolved"
    assert "covered by the run of handler-run-id" in answer["detail"]
