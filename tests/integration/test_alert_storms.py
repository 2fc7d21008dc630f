"""Alert storms against a real Prefect API: coalescing in the receiver, staleness via its record.

A storm of alerts for one target (other fingerprints, same deployment and target, within the
route's cooldown) becomes one run that executes and Completed "covered" runs that point at it;
the handler's `covered-alerts` artifact lists them, read back from their tags.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any
from uuid import UUID

import httpx
import pytest
from fastapi.testclient import TestClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_URL

from deployments.receiver import create_app
from deployments.serve import to_deployments
from tests.fixtures.stub_runbooks import STUB_RUNBOOKS
from tests.fixtures.triggers import (
    TOKEN,
    alert,
    bearer,
    payload,
    receiver_settings,
    serve_app,
    stub_table,
)

pytestmark = pytest.mark.usefixtures("stub_deployments")


@pytest.fixture(scope="module")
def stub_deployments(prefect_api: None) -> None:
    for deployment in to_deployments(STUB_RUNBOOKS):
        deployment.apply()


def live_app() -> Any:
    return create_app(
        receiver_settings(sync_wait_s=10),
        stub_table(),
        STUB_RUNBOOKS,
        api_url=str(PREFECT_API_URL.value()),
    )


def runs_tagged(tag: str) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]))
        )


def artifact(run_id: str, key: str) -> str:
    with get_client(sync_client=True) as client:
        (art,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(run_id)]),
                key=ArtifactFilterKey(any_=[key]),
            )
        )
    return str(art.data)


def eventually(read: Callable[[], str], needle: str, timeout: float = 30) -> str:
    """`read()` once it contains `needle` (the handler's list is written in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = read()
            if needle in text:
                return text
        except ValueError:  # not written yet
            text = ""
        assert time.monotonic() < deadline, f"{needle!r} not in {text!r}"
        time.sleep(0.2)


def post(client: TestClient, *alerts: dict[str, Any]) -> list[dict[str, Any]]:
    r = client.post("/alerts", json=payload(*alerts), headers=bearer())
    assert r.status_code == 200, r.text
    return list(r.json()["alerts"])


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(live_app()) as c:
        yield c


def test_alerts_for_one_target_are_covered_by_the_first_run(client: TestClient) -> None:
    storm = [alert("StubStorm", namespace="storm-a") for _ in range(6)]
    first, *rest = (post(client, a)[0] for a in storm)
    assert first["outcome"] == "started"
    assert [r["outcome"] for r in rest] == ["covered"] * 5
    handler = first["flow_run_id"]
    covered = runs_tagged(f"covered-by:{handler}")
    assert sorted(str(r.id) for r in covered) == sorted(r["flow_run_id"] for r in rest)
    for run in covered:
        assert run.state is not None and run.state.is_completed()
        assert run.state.name == "Covered" and handler in (run.state.message or "")
        assert f"/runs/flow-run/{handler}" in artifact(str(run.id), "covered-by")
    listing = eventually(lambda: artifact(handler, "covered-alerts"), "covered by this run (5)")
    for a in storm[1:]:
        assert a["fingerprint"] in listing
    assert storm[0]["fingerprint"] not in listing  # the handler's own alert is not "covered"


def test_other_targets_and_acting_alerts_are_not_covered(client: TestClient) -> None:
    plan = post(client, alert("StubStorm", namespace="storm-b"))[0]
    other = post(client, alert("StubStorm", namespace="storm-c"))[0]
    acting = post(client, alert("StubStorm", namespace="storm-b", mode="act"))[0]
    assert (plan["outcome"], other["outcome"]) == ("started", "started")
    # A plan-only run never stands in for one that may act.
    assert acting["outcome"] == "started"
    later_plan = post(client, alert("StubStorm", namespace="storm-b"))[0]
    later_act = post(client, alert("StubStorm", namespace="storm-b", mode="act"))[0]
    assert later_plan["outcome"] == later_act["outcome"] == "covered"
    assert acting["flow_run_id"] in later_act["detail"]


def test_a_repeated_delivery_of_a_covered_alert_is_deduplicated(client: TestClient) -> None:
    post(client, alert("StubStorm", namespace="storm-d"))
    second = alert("StubStorm", namespace="storm-d")
    covered = post(client, second)[0]
    again = post(client, second)[0]
    assert covered["outcome"] == "covered"
    assert again["outcome"] == "deduplicated"
    assert again["flow_run_id"] == covered["flow_run_id"]
    assert len(runs_tagged(f"alert:{second['fingerprint']}")) == 1


def test_receiver_answers_whether_an_alert_still_fires() -> None:
    firing = alert("StubStorm", namespace="storm-e")
    with serve_app(live_app()) as server:
        url = f"{server.url}/alerts/{firing['fingerprint']}"

        def state() -> str:
            r = httpx.get(url, headers=bearer(), timeout=10)
            assert r.status_code == 200, r.text
            return str(r.json()["state"])

        assert state() == "unknown"
        assert httpx.get(url, timeout=10).status_code == 401
        assert httpx.get(url, headers=bearer("wrong"), timeout=10).status_code == 401
        assert httpx.get(f"{server.url}/alerts/x;y", headers=bearer(), timeout=10).status_code in (
            404,
            422,
        )
        r = httpx.post(f"{server.url}/alerts", json=payload(firing), headers=bearer(), timeout=30)
        assert r.status_code == 200
        assert state() == "firing"
        resolved = {**firing, "status": "resolved", "endsAt": "2026-11-27T04:00:00Z"}
        r = httpx.post(
            f"{server.url}/alerts",
            json=payload(resolved, status="resolved"),
            headers=bearer(),
            timeout=30,
        )
        assert r.status_code == 200
        assert state() == "resolved"
    assert TOKEN not in url


def test_the_post_incident_record_shows_a_storm_as_one_incident(client: TestClient) -> None:
    from tasks.run_history import IncidentKey, collect

    storm = [alert("StubStorm", namespace="storm-f") for _ in range(3)]
    results = [post(client, a)[0] for a in storm]
    ids = {r["flow_run_id"] for r in results}
    for a in (storm[0], storm[2]):  # from the handler's alert, and from a covered one
        with get_client(sync_client=True) as c:
            gathered = collect(c, IncidentKey.parse(f"alert:{a['fingerprint']}"))
        assert {str(r.id) for r in gathered.runs} == ids
