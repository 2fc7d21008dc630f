"""Prefect answering 503 ("database is locked" on SQLite): retried with a short backoff."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from uuid import uuid4

import httpx
import pytest
from fastapi.testclient import TestClient

from deployments.journal import Journal
from deployments.prefect_runs import PrefectRuns, PrefectUnavailable
from deployments.receiver import create_app
from tests.fixtures.stub_runbooks import STUB_RUNBOOKS
from tests.fixtures.triggers import alert, bearer, payload, receiver_settings, stub_table

DEP_ID = str(uuid4())


def flaky_prefect(locked_answers: int) -> tuple[httpx.MockTransport, list[int]]:
    """A Prefect API stand-in: `locked_answers` 503s on create, then 201."""
    seen: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/deployments/name/stub-remediate/stub-remediate"):
            return httpx.Response(200, json={"id": DEP_ID})
        if request.url.path.endswith("/create_flow_run"):
            body = json.loads(request.content)
            assert body["idempotency_key"]
            assert body["state"]["type"] == "SCHEDULED"
            if len(seen) < locked_answers:
                seen.append(503)
                return httpx.Response(503, json={"detail": "database is locked"})
            seen.append(201)
            return httpx.Response(201, json={"id": str(uuid4()), "name": body["name"]})
        return httpx.Response(404)

    return httpx.MockTransport(handler), seen


def test_503s_are_retried_until_the_run_is_recorded() -> None:
    transport, seen = flaky_prefect(locked_answers=3)
    runs = PrefectRuns("http://prefect/api", None, retry_s=5, transport=transport)

    async def go() -> None:
        run = await runs.create_run(
            "stub-remediate/stub-remediate",
            name="n",
            parameters={},
            tags=[],
            idempotency_key="k",
            grace_s=0,
        )
        assert run.new
        await runs.aclose()

    asyncio.run(go())
    assert seen == [503, 503, 503, 201]


def test_prefect_kept_locked_the_alert_is_journaled_and_answered_fast() -> None:
    """Prefect stuck: Alertmanager still gets a quick 2xx; the run request waits on disk."""
    transport, _ = flaky_prefect(locked_answers=10_000)
    runs = PrefectRuns("http://prefect/api", None, retry_s=0.3, transport=transport)
    journal = Journal(None)
    app = create_app(
        receiver_settings(sync_wait_s=0),
        stub_table(),
        STUB_RUNBOOKS,
        api_url="http://prefect/api",
        runs=runs,
        journal=journal,
    )
    with TestClient(app) as client:
        r = client.post("/alerts", json=payload(alert(namespace="x")), headers=bearer())
        # Answered while the run was still being created: the answer did not wait for Prefect.
        creating_when_answered = len(app.state.intake._inflight)
    assert creating_when_answered == 1
    assert r.status_code == 200
    assert r.json()["alerts"][0]["outcome"] == "accepted"
    (entry,) = journal.pending()
    assert entry.parameters == {
        "params": {"namespace": "x", "dry_run": False, "auto_approve": True}
    }


def test_journal_failure_is_a_503_so_alertmanager_retries() -> None:
    transport, _ = flaky_prefect(locked_answers=0)
    runs = PrefectRuns("http://prefect/api", None, retry_s=0.3, transport=transport)
    journal = Journal(None)
    journal.close()  # the disk is gone
    app = create_app(
        receiver_settings(sync_wait_s=0),
        stub_table(),
        STUB_RUNBOOKS,
        api_url="http://prefect/api",
        runs=runs,
        journal=journal,
    )
    with TestClient(app) as client:
        r = client.post("/alerts", json=payload(alert(namespace="x")), headers=bearer())
    assert r.status_code == 503
    assert r.json()["alerts"][0]["outcome"] == "failed"


def test_accepted_alerts_are_replayed_by_the_next_receiver(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    stuck, _ = flaky_prefect(locked_answers=10_000)
    first = create_app(
        receiver_settings(sync_wait_s=0),
        stub_table(),
        STUB_RUNBOOKS,
        api_url="http://prefect/api",
        runs=PrefectRuns("http://prefect/api", None, retry_s=0.2, transport=stuck),
        journal=Journal(path),
    )
    with TestClient(first) as client:
        r = client.post("/alerts", json=payload(alert(namespace="r")), headers=bearer())
        assert r.json()["alerts"][0]["outcome"] == "accepted"
    healthy, seen = flaky_prefect(locked_answers=0)
    journal = Journal(path)
    second = create_app(
        receiver_settings(sync_wait_s=0),
        stub_table(),
        STUB_RUNBOOKS,
        api_url="http://prefect/api",
        runs=PrefectRuns("http://prefect/api", None, retry_s=0.2, transport=healthy),
        journal=journal,
    )
    with TestClient(second):
        deadline = time.monotonic() + 10
        while journal.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert journal.pending() == []
    assert seen == [201]


def test_prefect_unreachable_is_unavailable() -> None:
    runs = PrefectRuns("http://127.0.0.1:9/api", None, retry_s=0.2)

    async def go() -> None:
        with pytest.raises(PrefectUnavailable):
            await runs.deployment_id("stub-remediate/stub-remediate")
        await runs.aclose()

    asyncio.run(go())
