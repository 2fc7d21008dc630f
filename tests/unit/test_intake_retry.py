"""Prefect answering 503 ("database is locked" on SQLite): retried with a short backoff."""

from __future__ import annotations

import asyncio
import json
from uuid import uuid4

import httpx
import pytest
from fastapi.testclient import TestClient

from deployments.intake import PrefectRuns, PrefectUnavailable
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
            assert body["idempotency_key"] and body["state"]["type"] == "SCHEDULED"
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


def test_prefect_kept_locked_means_503_to_alertmanager_so_it_retries() -> None:
    transport, _ = flaky_prefect(locked_answers=10_000)
    runs = PrefectRuns("http://prefect/api", None, retry_s=0.3, transport=transport)
    app = create_app(
        receiver_settings(), stub_table(), STUB_RUNBOOKS, api_url="http://prefect/api", runs=runs
    )
    with TestClient(app) as client:
        r = client.post("/alerts", json=payload(alert(namespace="x")), headers=bearer())
    assert r.status_code == 503
    assert r.json()["alerts"][0]["outcome"] == "failed"


def test_prefect_unreachable_is_unavailable() -> None:
    runs = PrefectRuns("http://127.0.0.1:9/api", None, retry_s=0.2)

    async def go() -> None:
        with pytest.raises(PrefectUnavailable):
            await runs.deployment_id("stub-remediate/stub-remediate")
        await runs.aclose()

    asyncio.run(go())
