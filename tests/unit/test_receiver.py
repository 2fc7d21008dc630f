"""Receiver behaviour that needs no Prefect: auth first, payload validation, intake decisions."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployments.catalog import Runbook
from deployments.receiver import create_app
from deployments.receiver_auth import Credentials
from deployments.routing import RoutingTable, validate_routing
from tests.fixtures.triggers import (
    BASIC,
    TOKEN,
    RecordingRuns,
    alert,
    bearer,
    payload,
    receiver_settings,
)


def post(client: TestClient, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response: httpx.Response = client.post(
        "/alerts", content=raw, headers={"content-type": "application/json", **(headers or {})}
    )
    return response


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {base64.b64encode(b'alertmanager:nope').decode()}"},
        {"Authorization": "Basic !!!notbase64"},
    ],
)
def test_bad_credentials_get_401_and_start_nothing(
    offline_app: Any, recording_runs: RecordingRuns, headers: dict[str, str]
) -> None:
    with TestClient(offline_app) as client:
        r = post(client, payload(alert()), headers)
    assert r.status_code == 401
    assert recording_runs.calls == []


def test_auth_is_checked_before_the_body_is_parsed(offline_app: Any) -> None:
    with TestClient(offline_app) as client:
        assert post(client, b"{not json", {}).status_code == 401
        assert post(client, b"{not json", bearer()).status_code == 422


def test_bearer_and_basic_auth_are_accepted(
    offline_app: Any, recording_runs: RecordingRuns
) -> None:
    basic = base64.b64encode(f"{BASIC[0]}:{BASIC[1]}".encode()).decode()
    with TestClient(offline_app) as client:
        assert post(client, payload(alert(namespace="a")), bearer()).status_code == 200
        r = post(client, payload(alert(namespace="b")), {"Authorization": f"Basic {basic}"})
        assert r.status_code == 200
    assert len(recording_runs.calls) == 2


def test_credentials_never_show_in_repr_or_logs(
    offline_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    assert TOKEN not in repr(Credentials(TOKEN, None, None))
    with pytest.raises(ValueError, match="needs"):
        Credentials(None, None, None)
    caplog.set_level(logging.DEBUG)
    with TestClient(offline_app) as client:
        post(client, payload(alert(namespace="a")), bearer())
        post(client, payload(alert(namespace="a")), bearer("wrong-secret"))
    assert TOKEN not in caplog.text
    assert "wrong-secret" not in caplog.text


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[]",
        b'{"version": "3", "alerts": []}',
        json.dumps({**payload(alert()), "version": "5"}).encode(),
        json.dumps(payload({**alert(), "status": "pending"})).encode(),
        json.dumps(payload({**alert(), "startsAt": "yesterday"})).encode(),
        json.dumps(payload({**alert(), "fingerprint": "../../etc"})).encode(),
        json.dumps(payload({**alert(), "labels": {"alertname": 5}})).encode(),
    ],
)
def test_malformed_payloads_get_4xx_and_start_nothing(
    offline_app: Any, recording_runs: RecordingRuns, body: bytes
) -> None:
    with TestClient(offline_app) as client:
        r = post(client, body, bearer())
    assert r.status_code in (400, 422)
    assert recording_runs.calls == []


def test_oversized_body_is_refused(offline_app: Any, recording_runs: RecordingRuns) -> None:
    with TestClient(offline_app) as client:
        r = post(client, b"x" * (5 * 1024 * 1024), bearer())
    assert r.status_code == 413
    assert recording_runs.calls == []


def test_resolved_and_unrouted_alerts_start_nothing(
    offline_app: Any, recording_runs: RecordingRuns
) -> None:
    body = payload(
        alert(status="resolved", namespace="a"),
        alert(alertname="SomethingElse"),
        alert(alertname="StubPlan", severity="warning", namespace="prod-a"),  # no match
        alert(alertname="StubAuto"),  # required label `namespace` missing
    )
    with TestClient(offline_app) as client:
        r = post(client, body, bearer())
    assert r.status_code == 200
    outcomes = [a["outcome"] for a in r.json()["alerts"]]
    assert outcomes == ["resolved", "unrouted", "unrouted", "rejected"]
    assert recording_runs.calls == []


def test_firing_alert_becomes_one_run_with_tags_params_and_key(
    offline_app: Any, recording_runs: RecordingRuns
) -> None:
    a = alert(alertname="StubPlan", severity="critical", namespace="prod-eu", fingerprint="abc1")
    with TestClient(offline_app) as client:
        first = post(client, payload(a), bearer())
        again = post(client, payload(a), bearer())
    assert first.status_code == 200
    assert again.status_code == 200
    assert first.json()["alerts"][0]["outcome"] == "started"
    assert again.json()["alerts"][0]["outcome"] == "deduplicated"
    (call,) = recording_runs.calls  # the repeat is answered from the recent-key cache
    assert call["deployment"] == "stub-remediate/stub-remediate"
    assert call["parameters"] == {"params": {"namespace": "prod-eu", "dry_run": True}}
    assert call["idempotency_key"] == "abc1:2026-11-27T03:00:00.123456789Z"
    assert {"source:alert", "runbook:stub-remediate", "alert:abc1", "alertname:StubPlan"} <= set(
        call["tags"]
    )


def test_an_approve_route_starts_an_acting_run_that_asks_with_the_request_filled_in(
    recording_runs: RecordingRuns,
) -> None:
    table = RoutingTable.model_validate(
        {
            "routes": [
                {
                    "alertname": "FlagStale",
                    "runbook": "stale-flag",
                    "mode": "approve",
                    "params": {"key": "${key}"},
                }
            ]
        }
    )
    flag = (Runbook(entrypoint="tests.fixtures.throwaway_runbook:stale_flag", description=""),)
    validate_routing(table, flag, "test")
    app = create_app(
        receiver_settings(requested_by="am-eu"),
        table,
        flag,
        api_url="http://127.0.0.1:9/api",
        runs=recording_runs,
    )
    a = alert(alertname="FlagStale", key="k1", job="flagger", fingerprint="appr1")
    with TestClient(app) as client:
        assert post(client, payload(a), bearer()).json()["alerts"][0]["outcome"] == "started"
    (call,) = recording_runs.calls
    assert call["deployment"] == "stale-flag/stale-flag"  # from the catalog, not the route
    assert call["parameters"] == {
        "params": {
            "key": "k1",
            "dry_run": False,
            "auto_approve": False,
            "requested_by": "am-eu",
            "reason": "alert FlagStale on flagger",
        }
    }
    assert {"source:alert", "alert:appr1", "alertname:FlagStale", "approve"} <= set(call["tags"])


def test_concurrent_identical_deliveries_share_one_create(
    offline_app: Any, recording_runs: RecordingRuns
) -> None:
    body = json.dumps(payload(alert(namespace="n", fingerprint="same"))).encode()

    async def storm() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=offline_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://r") as client:
            headers = {**bearer(), "content-type": "application/json"}
            return await asyncio.gather(
                *(client.post("/alerts", content=body, headers=headers) for _ in range(50))
            )

    responses = asyncio.run(storm())
    assert all(r.status_code == 200 for r in responses)
    outcomes = sorted(r.json()["alerts"][0]["outcome"] for r in responses)
    assert outcomes.count("started") == 1
    assert outcomes.count("deduplicated") == 49
    assert len(recording_runs.calls) == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=st.one_of(
        st.binary(max_size=200),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries(
            {"version": st.just("4"), "alerts": st.lists(json_values, max_size=3)},
            optional={"status": json_values, "groupKey": json_values, "receiver": json_values},
        ).map(lambda v: json.dumps(v).encode()),
    )
)
def test_arbitrary_bodies_never_500_and_start_nothing(
    offline_app: Any, recording_runs: RecordingRuns, body: bytes
) -> None:
    with TestClient(offline_app) as client:
        r = post(client, body, bearer())
    assert r.status_code in (400, 422), r.text
    assert recording_runs.calls == []


def test_by_default_a_new_alert_is_answered_once_journaled(recording_runs: RecordingRuns) -> None:
    from deployments.receiver import create_app
    from tests.fixtures.stub_runbooks import STUB_RUNBOOKS
    from tests.fixtures.triggers import receiver_settings, stub_table

    app = create_app(
        receiver_settings(sync_wait_s=0),
        stub_table(),
        STUB_RUNBOOKS,
        api_url="http://127.0.0.1:9/api",
        runs=recording_runs,
    )
    with TestClient(app) as client:
        r = post(client, payload(alert(namespace="q")), bearer())
        assert r.status_code == 200
        assert r.json()["alerts"][0]["outcome"] in ("accepted", "started")
        deadline = 50
        while not recording_runs.calls and deadline:
            import time

            time.sleep(0.05)
            deadline -= 1
    assert len(recording_runs.calls) == 1
