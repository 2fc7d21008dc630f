"""Schemathesis over the receiver's own OpenAPI schema: valid and invalid payloads alike.

Whatever the body, the receiver answers 2xx/4xx (never 5xx: nothing here is Prefect's fault),
and a run is requested only for a firing alert that a route matched.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings

from deployments.receiver import create_app
from tests.fixtures.stub_runbooks import STUB_RUNBOOKS
from tests.fixtures.triggers import RecordingRuns, bearer, receiver_settings, stub_table

RUNS = RecordingRuns()
APP = create_app(
    receiver_settings(), stub_table(), STUB_RUNBOOKS, api_url="http://127.0.0.1:9/api", runs=RUNS
)
# The app serves no /openapi.json (off, see docs/triggers.md): read the schema from FastAPI
# and send the cases to the app itself.
schema = schemathesis.openapi.from_dict(APP.openapi())
schema.app = APP


@schema.include(path="/alerts", method="POST").parametrize()
@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
def test_alerts_endpoint_never_fails_server_side(case: Any) -> None:
    before = len(RUNS.calls)
    response = case.call(headers=bearer())
    # 405: negative mode also tries other methods on the path.
    assert response.status_code in (200, 400, 405, 413, 422), response.text
    if response.status_code != 200:
        assert len(RUNS.calls) == before, "a rejected delivery must start nothing"
    else:
        started = [a for a in response.json()["alerts"] if a["outcome"] == "started"]
        assert len(RUNS.calls) - before == len(started)


@schema.include(path="/alerts", method="POST").parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_alerts_endpoint_refuses_everything_without_a_token(case: Any) -> None:
    before = len(RUNS.calls)
    response = case.call()
    assert response.status_code in (401, 405)
    assert len(RUNS.calls) == before
