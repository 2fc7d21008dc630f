"""Receiver edge cases (issue 8, item 5): auth wherever the app is served, bodies of any
framing, Prefect's final answers, old and resolved alerts, flapping, label rendering.

Prefect is replaced here only where the receiver's own decisions are under test (a recording
stand-in, or httpx's MockTransport answering like Prefect); the same paths run against a real
Prefect server in tests/integration/test_triggers_prefect.py. HTTP framing is tested against
a real uvicorn server.
"""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.routing import Mount

from deployments.journal import Entry, Journal
from deployments.prefect_runs import PrefectRuns
from deployments.receiver import create_app
from deployments.routing import RoutingTable
from tests.fixtures.stub_runbooks import STUB_RUNBOOKS
from tests.fixtures.triggers import (
    TOKEN,
    RecordingRuns,
    alert,
    bearer,
    payload,
    receiver_settings,
    serve_app,
    stub_table,
)

API = "http://prefect/api"
DEP_ID = str(uuid4())
T1 = "2026-11-27T03:00:00Z"
T2 = "2026-11-27T03:04:00Z"
T3 = "2026-11-27T03:08:00Z"


def app_with(
    runs: PrefectRuns, journal: Journal | None = None, table: RoutingTable | None = None, **s: Any
) -> Any:
    return create_app(
        receiver_settings(**s),
        table or stub_table(),
        STUB_RUNBOOKS,
        api_url=API,
        runs=runs,
        journal=journal or Journal(None),
    )


def post(client: TestClient, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    response: httpx.Response = client.post("/alerts", json=body, headers=headers or {})
    return response


def outcome(response: httpx.Response, n: int = 0) -> str:
    return str(response.json()["alerts"][n]["outcome"])


def prefect_answering(create_status: int) -> tuple[httpx.MockTransport, list[int]]:
    """Answers like Prefect: the deployment exists; every create gets `create_status`."""
    creates: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if "/deployments/name/" in request.url.path:
            return httpx.Response(200, json={"id": DEP_ID})
        if request.url.path.endswith("/create_flow_run"):
            creates.append(create_status)
            if create_status == 201:
                body = json.loads(request.content)
                return httpx.Response(201, json={"id": str(uuid4()), "name": body["name"]})
            return httpx.Response(
                create_status,
                json={"detail": "Error creating flow run: 100000 is greater than the maximum"},
            )
        return httpx.Response(404)

    return httpx.MockTransport(handler), creates


def runs_via(transport: httpx.MockTransport) -> PrefectRuns:
    return PrefectRuns(API, None, retry_s=0.2, transport=transport)


def wait_for(check: Any, what: str, timeout: float = 20) -> None:
    """Poll a state (bounded); the assertion is on the state, not on the time taken."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"still not {what}"
        time.sleep(0.05)


def status_of(journal: Journal, key: str) -> str | None:
    record = journal.get(key)
    return record.status if record else None


# --- Auth ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/docs"),
        ("GET", "/redoc"),
        ("GET", "/openapi.json"),
        ("GET", "/alerts"),
        ("POST", "/alerts"),
        ("GET", "/no-such-route"),
        ("GET", "/healthz/extra"),
    ],
)
def test_every_route_but_healthz_needs_credentials(
    offline_app: Any, method: str, path: str
) -> None:
    with TestClient(offline_app) as client:
        r = client.request(method, path)
    assert r.status_code == 401


def test_healthz_answers_without_credentials(offline_app: Any) -> None:
    with TestClient(offline_app) as client:
        r = client.get("/healthz")
    assert r.status_code == 200


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json"])
def test_docs_and_openapi_are_off_even_with_credentials(offline_app: Any, path: str) -> None:
    with TestClient(offline_app) as client:
        r = client.get(path, headers=bearer())
    assert r.status_code == 404


def test_auth_holds_when_the_app_is_mounted_in_another_app(
    offline_app: Any, recording_runs: RecordingRuns
) -> None:
    outer = Starlette(routes=[Mount("/hooks", app=offline_app)])
    with TestClient(outer) as client:
        refused = client.post("/hooks/alerts", json=payload(alert(namespace="m")))
    assert refused.status_code == 401
    assert recording_runs.calls == []


def test_mounted_app_still_serves_authenticated_alerts(
    offline_app: Any, recording_runs: RecordingRuns
) -> None:
    outer = Starlette(routes=[Mount("/hooks", app=offline_app)])
    with TestClient(outer) as client:
        r = client.post("/hooks/alerts", json=payload(alert(namespace="m")), headers=bearer())
    assert outcome(r) == "started"


def test_the_route_checks_credentials_without_the_middleware(
    offline_app: Any, recording_runs: RecordingRuns
) -> None:
    """Routes copied into another app lose the middleware; the route's own check remains."""
    bare = FastAPI()
    bare.include_router(offline_app.router)
    with TestClient(bare) as client:
        r = client.post("/alerts", json=payload(alert(namespace="b")))
    assert r.status_code == 401
    assert recording_runs.calls == []


def test_auth_holds_under_a_root_path_on_a_real_server(
    offline_app: Any, recording_runs: RecordingRuns
) -> None:
    """uvicorn --root-path (behind a proxy that strips /runbooks): the prefix is in the path."""
    with serve_app(offline_app, root_path="/runbooks") as server:
        r = httpx.post(f"{server.url}/alerts", json=payload(alert(namespace="rp")), timeout=20)
    assert r.status_code == 401
    assert recording_runs.calls == []


def test_root_path_serves_health_and_authenticated_alerts(
    offline_app: Any, recording_runs: RecordingRuns
) -> None:
    with serve_app(offline_app, root_path="/runbooks") as server:
        health = httpx.get(f"{server.url}/healthz", timeout=20)
        r = httpx.post(
            f"{server.url}/alerts",
            json=payload(alert(namespace="rp")),
            headers=bearer(),
            timeout=20,
        )
    assert health.status_code == 200
    assert outcome(r) == "started"


# --- Body size, whatever the framing (real uvicorn, real chunked requests) ---------------


def small_body_app(recording_runs: RecordingRuns) -> Any:
    return app_with(recording_runs, max_body_bytes=64 * 1024)


def test_a_chunked_body_over_the_limit_is_refused_before_it_ends(
    recording_runs: RecordingRuns,
) -> None:
    """72 KiB of a 64 KiB limit sent chunked, never terminated: 413 without waiting."""
    head = (
        "POST /alerts HTTP/1.1\r\nHost: receiver\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b" " * 8192
    with (
        serve_app(small_body_app(recording_runs)) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock,
    ):
        sock.sendall(head)
        for _ in range(9):  # the terminating 0-length chunk is never sent
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        status_line = sock.recv(64).split(b"\r\n", 1)[0]
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large"


def test_a_refused_chunked_body_starts_nothing(recording_runs: RecordingRuns) -> None:
    big = json.dumps(payload(*(alert(namespace="c" * 1000) for _ in range(80)))).encode()
    assert len(big) > 64 * 1024

    def chunks() -> Any:
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096]

    with serve_app(small_body_app(recording_runs)) as server:
        try:
            r = httpx.post(
                f"{server.url}/alerts",
                content=chunks(),  # a generator: httpx sends Transfer-Encoding: chunked
                headers={**bearer(), "content-type": "application/json"},
                timeout=20,
            )
            status = r.status_code
        except httpx.TransportError:  # the server may close while we are still sending
            status = 413
    assert status == 413
    assert recording_runs.calls == []


def test_a_chunked_body_within_the_limit_is_accepted(recording_runs: RecordingRuns) -> None:
    raw = json.dumps(payload(alert(namespace="chunked"))).encode()

    def chunks() -> Any:
        yield raw[:50]
        yield raw[50:]

    with serve_app(small_body_app(recording_runs)) as server:
        r = httpx.post(
            f"{server.url}/alerts",
            content=chunks(),
            headers={**bearer(), "content-type": "application/json"},
            timeout=20,
        )
    assert outcome(r) == "started"


# --- Prefect's final answers ---------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 409, 422])
def test_a_final_4xx_from_prefect_is_recorded_as_failed(status: int) -> None:
    transport, _ = prefect_answering(status)
    journal = Journal(None)
    a = alert(namespace="x", fingerprint=f"refused{status}")
    with TestClient(app_with(runs_via(transport), journal)) as client:
        r = post(client, payload(a), bearer())
    record = journal.get(f"refused{status}:{a['startsAt']}")
    assert record is not None
    assert record.status == "failed"
    assert record.reason is not None and f"HTTP {status}" in record.reason
    assert outcome(r) == "refused"
    assert r.status_code == 200  # not 503: Alertmanager must not retry what cannot succeed


def test_a_final_4xx_is_asked_once_even_when_redelivered() -> None:
    transport, creates = prefect_answering(409)
    a = alert(namespace="x")
    with TestClient(app_with(runs_via(transport))) as client:
        post(client, payload(a), bearer())
        again = post(client, payload(a), bearer())
    assert creates == [409]
    assert outcome(again) == "deduplicated"


@pytest.mark.parametrize("status", [401, 404, 503])
def test_answers_that_may_change_are_retried(status: int) -> None:
    transport, creates = prefect_answering(status)
    journal = Journal(None)
    with TestClient(app_with(runs_via(transport), journal, sync_wait_s=0)) as client:
        post(client, payload(alert(namespace="x")), bearer())
        wait_for(lambda: len(creates) >= 3, "retried")
        (entry,) = journal.pending()
    assert entry.deployment == "stub-remediate/stub-remediate"


# --- Old alerts: max age ------------------------------------------------------------------


def journal_entry(fingerprint: str, starts_at: str = T1) -> Entry:
    return Entry(
        idempotency_key=f"{fingerprint}:{starts_at}",
        deployment="stub-remediate/stub-remediate",
        name=f"stubauto-{fingerprint}",
        parameters={"params": {"namespace": "old", "dry_run": False}},
        tags=["source:alert", f"alert:{fingerprint}", "alertname:StubAuto", "auto"],
        fingerprint=fingerprint,
        cooldown_s=600,
    )


def test_an_entry_older_than_max_age_is_expired_at_start_not_replayed(
    tmp_path: Path, recording_runs: RecordingRuns
) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    journal.add(journal_entry("old1"), now=time.time() - 2 * 3600)
    with TestClient(app_with(recording_runs, journal)):
        pass
    record = journal.get(f"old1:{T1}")
    assert record is not None and record.status == "expired"
    assert recording_runs.calls == []


def test_an_entry_within_max_age_is_replayed_at_start(
    tmp_path: Path, recording_runs: RecordingRuns
) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    journal.add(journal_entry("young1"), now=time.time() - 30 * 60)
    with TestClient(app_with(recording_runs, journal)):
        wait_for(lambda: journal.pending() == [], "replayed")
    assert len(recording_runs.calls) == 1


def test_an_alert_prefect_never_takes_expires_and_is_no_longer_retried() -> None:
    transport, _ = prefect_answering(503)
    journal = Journal(None)
    a = alert(namespace="x", fingerprint="stale1")
    app = app_with(runs_via(transport), journal, sync_wait_s=0, max_age_s=1.0)
    with TestClient(app) as client:
        post(client, payload(a), bearer())
        wait_for(lambda: status_of(journal, f"stale1:{a['startsAt']}") == "expired", "expired")
        # The retry loop ends (no task left), instead of retrying forever.
        wait_for(lambda: not app.state.intake._inflight, "creation task ended")
        record = journal.get(f"stale1:{a['startsAt']}")
    assert record is not None and record.reason is not None and "max_age" in record.reason


# --- Resolved alerts ------------------------------------------------------------------------


def test_resolved_before_its_run_is_created_cancels_the_entry() -> None:
    transport, _ = prefect_answering(503)  # Prefect stuck: the run is not created yet
    journal = Journal(None)
    firing = alert(namespace="x", fingerprint="gone1", starts_at=T1)
    resolved = {**firing, "status": "resolved"}
    app = app_with(runs_via(transport), journal, sync_wait_s=2)
    with TestClient(app) as client:
        post(client, payload(firing), bearer())
        r = post(client, payload(resolved, status="resolved"), bearer())
        wait_for(lambda: not app.state.intake._inflight, "creation task ended")
    record = journal.get(f"gone1:{T1}")
    assert record is not None and record.status == "cancelled"
    assert outcome(r) == "cancelled"


def test_a_resolved_alert_is_answered_when_prefect_cannot_say_the_run_state() -> None:
    created, _ = prefect_answering(201)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/api/flow_runs/"):
            return httpx.Response(503, json={"detail": "database is locked"})
        return created.handle_request(request)

    firing = alert(namespace="x", fingerprint="unsure1", starts_at=T1)
    app = app_with(runs_via(httpx.MockTransport(handler)), sync_wait_s=5)
    with TestClient(app) as client:
        post(client, payload(firing), bearer())
        r = post(client, payload({**firing, "status": "resolved"}, status="resolved"), bearer())
    assert r.status_code == 200
    assert "not checked" in r.json()["alerts"][0]["detail"]


def test_a_resolved_alert_with_nothing_recorded_only_resolves(
    offline_app: Any, recording_runs: RecordingRuns
) -> None:
    with TestClient(offline_app) as client:
        r = post(client, payload(alert(status="resolved", namespace="x")), bearer())
    assert outcome(r) == "resolved"
    assert recording_runs.cancel_requests == []


# --- Pruning ---------------------------------------------------------------------------------


def filled_journal(journal: Journal, now: float) -> None:
    """Finished 10 days ago (created, failed), still pending 10 days on, finished 1 h ago."""
    day = 24 * 3600
    journal.add(journal_entry("done", T1), now=now - 10 * day)
    journal.created(f"done:{T1}", str(uuid4()), now=now - 10 * day)
    journal.add(journal_entry("refused", T1), now=now - 10 * day)
    journal.finish(f"refused:{T1}", "failed", "HTTP 409", now=now - 10 * day, only_pending=True)
    journal.add(journal_entry("waiting", T1), now=now - 10 * day)
    journal.add(journal_entry("recent", T1), now=now - 3600)
    journal.created(f"recent:{T1}", str(uuid4()), now=now - 3600)


def test_finished_entries_older_than_retention_are_pruned() -> None:
    journal = Journal(None)
    now = time.time()
    filled_journal(journal, now)
    assert journal.prune(7 * 24 * 3600, now=now) == 2


def test_pruning_keeps_pending_and_recent_entries() -> None:
    journal = Journal(None)
    now = time.time()
    filled_journal(journal, now)
    journal.prune(7 * 24 * 3600, now=now)
    kept = sorted(k for k in ("done", "refused", "waiting", "recent") if journal.get(f"{k}:{T1}"))
    assert kept == ["recent", "waiting"]


def test_the_receiver_prunes_its_journal_when_it_starts(
    tmp_path: Path, recording_runs: RecordingRuns
) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    filled_journal(journal, time.time())
    with TestClient(app_with(recording_runs, journal)):
        pass
    assert journal.get(f"done:{T1}") is None


def test_retention_shorter_than_a_cooldown_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="cooldown"):
        app_with(RecordingRuns(), retention_s=60)


# --- Flapping: one run per fingerprint per route cooldown ----------------------------------


def test_a_flapping_alert_starts_one_run_per_cooldown(
    tmp_path: Path, recording_runs: RecordingRuns
) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    with TestClient(app_with(recording_runs, journal)) as client:
        first = post(
            client, payload(alert(namespace="f", fingerprint="flap1", starts_at=T1)), bearer()
        )
        second = post(
            client, payload(alert(namespace="f", fingerprint="flap1", starts_at=T2)), bearer()
        )
    assert outcome(first) == "started"
    assert outcome(second) == "cooldown"
    assert len(recording_runs.calls) == 1


def test_the_cooldown_survives_a_restart(tmp_path: Path, recording_runs: RecordingRuns) -> None:
    path = tmp_path / "journal.sqlite3"
    with TestClient(app_with(recording_runs, Journal(path))) as client:
        post(client, payload(alert(namespace="f", fingerprint="flap2", starts_at=T1)), bearer())
    with TestClient(app_with(recording_runs, Journal(path))) as client:
        again = post(
            client, payload(alert(namespace="f", fingerprint="flap2", starts_at=T3)), bearer()
        )
    assert outcome(again) == "cooldown"
    assert len(recording_runs.calls) == 1


def test_two_startsat_in_one_delivery_start_one_run(recording_runs: RecordingRuns) -> None:
    body = payload(
        alert(namespace="f", fingerprint="flap3", starts_at=T1),
        alert(namespace="f", fingerprint="flap3", starts_at=T2),
    )
    with TestClient(app_with(recording_runs)) as client:
        r = post(client, body, bearer())
    assert sorted(a["outcome"] for a in r.json()["alerts"]) == ["cooldown", "started"]
    assert len(recording_runs.calls) == 1


def test_after_the_cooldown_the_alert_starts_a_run_again(
    tmp_path: Path, recording_runs: RecordingRuns
) -> None:
    journal = Journal(tmp_path / "journal.sqlite3")
    eleven_minutes_ago = time.time() - 11 * 60
    journal.add(journal_entry("flap4", T1), now=eleven_minutes_ago)
    journal.created(f"flap4:{T1}", str(uuid4()), now=eleven_minutes_ago)
    with TestClient(app_with(recording_runs, journal)) as client:
        r = post(client, payload(alert(namespace="f", fingerprint="flap4", starts_at=T2)), bearer())
    assert outcome(r) == "started"


def test_a_run_cancelled_before_it_started_does_not_hold_the_cooldown() -> None:
    transport, _ = prefect_answering(503)
    journal = Journal(None)
    firing = alert(namespace="x", fingerprint="flap5", starts_at=T1)
    app = app_with(runs_via(transport), journal, sync_wait_s=2)
    with TestClient(app) as client:
        post(client, payload(firing), bearer())
        post(client, payload({**firing, "status": "resolved"}, status="resolved"), bearer())
        refired = post(
            client, payload(alert(namespace="x", fingerprint="flap5", starts_at=T2)), bearer()
        )
    assert outcome(refired) == "accepted"


def test_an_exact_redelivery_is_still_deduplicated_not_cooled_down(
    recording_runs: RecordingRuns,
) -> None:
    a = alert(namespace="f", fingerprint="flap6", starts_at=T1)
    with TestClient(app_with(recording_runs)) as client:
        post(client, payload(a), bearer())
        again = post(client, payload(a), bearer())
    assert outcome(again) == "deduplicated"


# --- Rendering: label values never become markup -------------------------------------------

EVIL = "a|b *c* [x](http://evil)\n# d"


def evil_table() -> RoutingTable:
    return RoutingTable.model_validate(
        {
            "routes": [
                {
                    "alertname": EVIL,
                    "runbook": "stub-remediate",
                    "params": {"namespace": "${namespace}"},
                }
            ]
        }
    )


def evil_run(recording_runs: RecordingRuns) -> dict[str, Any]:
    a = alert(alertname=EVIL, namespace=EVIL)
    with TestClient(app_with(recording_runs, table=evil_table())) as client:
        post(client, payload(a), bearer())
    (call,) = recording_runs.calls
    return call


def test_a_run_name_carries_no_markup_from_labels(recording_runs: RecordingRuns) -> None:
    assert re.fullmatch(r"[a-z0-9-]+", evil_run(recording_runs)["name"])


def test_a_label_in_a_tag_is_one_line(recording_runs: RecordingRuns) -> None:
    (tag,) = [t for t in evil_run(recording_runs)["tags"] if t.startswith("alertname:")]
    assert "\n" not in tag


def test_label_values_reach_the_runbook_unchanged(recording_runs: RecordingRuns) -> None:
    """Parameters are data (a filter must match exactly); escaping happens where rendered."""
    assert evil_run(recording_runs)["parameters"]["params"]["namespace"] == EVIL


# --- A journal written by the previous receiver -------------------------------------------

OLD_SCHEMA = """
CREATE TABLE alert_runs (
    idempotency_key TEXT PRIMARY KEY, deployment TEXT NOT NULL, name TEXT NOT NULL,
    parameters TEXT NOT NULL, tags TEXT NOT NULL, accepted_at TEXT NOT NULL,
    flow_run_id TEXT, created_at TEXT
)
"""


def old_journal(path: Path) -> None:
    import sqlite3
    from datetime import UTC, datetime

    now = datetime.now(UTC).isoformat()
    db = sqlite3.connect(path)
    db.execute(OLD_SCHEMA)
    row = "INSERT INTO alert_runs VALUES (?, 'd/d', 'n', '{}', '[]', ?, ?, ?)"
    db.execute(row, (f"waiting1:{T1}", now, None, None))
    db.execute(row, (f"made1:{T1}", now, str(uuid4()), now))
    db.commit()
    db.close()


def test_an_old_journal_is_upgraded_and_its_pending_entry_kept(tmp_path: Path) -> None:
    old_journal(tmp_path / "journal.sqlite3")
    (entry,) = Journal(tmp_path / "journal.sqlite3").pending()
    assert entry.fingerprint == "waiting1"


def test_an_old_journal_keeps_its_created_entries_created(tmp_path: Path) -> None:
    old_journal(tmp_path / "journal.sqlite3")
    assert status_of(Journal(tmp_path / "journal.sqlite3"), f"made1:{T1}") == "created"
