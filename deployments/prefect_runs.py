"""Creates alert flow runs through Prefect's REST API, retrying what is worth retrying.

Plain httpx instead of `PrefectClient` for two reasons: the answer's status code says whether
the run is new (201) or an earlier delivery's (200, same `idempotency_key`), and 503s
("database is locked" on SQLite) are retried with a short backoff (Prefect's client waits
2, 4, 8 ... s, which would hold Alertmanager's request far too long).
"""

from __future__ import annotations

import asyncio
import base64
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import httpx

RETRY_STATUS = {429, 502, 503, 504}
#: 4xx answers that may succeed later without the request changing: auth being fixed
#: (401/403: the operator corrects PREFECT_API_AUTH_STRING), a deployment not served yet
#: (404), a timeout (408), rate limiting (429). Every other 4xx (409 parameters refused by the
#: deployment's schema, 422, 400) is final: retrying the same request can never succeed.
NOT_FINAL_4XX = {401, 403, 404, 408, 429}
#: A run in one of these states has not started executing: it may still be cancelled.
NOT_STARTED = {"SCHEDULED", "PENDING"}


class PrefectUnavailable(Exception):
    """The run could not be recorded (Prefect down, or kept answering 5xx)."""


class PrefectRefused(Exception):
    """Prefect answered a final 4xx (e.g. 409/422): the same request will never succeed."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status


class DeploymentNotFound(Exception):
    """The routed deployment is not registered on the server (is `serve` running?)."""


@dataclass(frozen=True)
class CreatedRun:
    id: UUID
    name: str
    new: bool


def api_headers(auth_string: str | None) -> dict[str, str]:
    """Headers for Prefect's API; the auth string is sent as Basic, as Prefect's client does."""
    if not auth_string:
        return {}
    token = base64.b64encode(auth_string.encode()).decode()
    return {"Authorization": f"Basic {token}"}


class PrefectRuns:
    """A small async client for the two calls the receiver makes."""

    def __init__(
        self,
        api_url: str,
        auth_string: str | None,
        retry_s: float,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            transport=transport,
            base_url=api_url.rstrip("/") + "/",
            headers=api_headers(auth_string),
            timeout=httpx.Timeout(5.0, connect=2.0),
            limits=httpx.Limits(max_connections=20),
        )
        self._retry_s = retry_s
        self._deployment_ids: dict[str, UUID] = {}

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        deadline = asyncio.get_running_loop().time() + self._retry_s
        delay = 0.05
        while True:
            try:
                response = await self._http.request(method, path, **kwargs)
                if response.status_code not in RETRY_STATUS:
                    return response
                problem = f"HTTP {response.status_code}"
            except httpx.TransportError as exc:
                problem = type(exc).__name__
            if asyncio.get_running_loop().time() + delay > deadline:
                raise PrefectUnavailable(f"Prefect API {method} {path}: {problem}")
            await asyncio.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 1.0)

    async def deployment_id(self, deployment: str) -> UUID:
        cached = self._deployment_ids.get(deployment)
        if cached is not None:
            return cached
        response = await self._request("GET", f"deployments/name/{deployment}")
        if response.status_code == 404:
            raise DeploymentNotFound(deployment)
        if response.is_error:
            raise PrefectUnavailable(f"reading deployment {deployment}: {response.status_code}")
        found = UUID(response.json()["id"])
        self._deployment_ids[deployment] = found
        return found

    async def create_run(
        self,
        deployment: str,
        *,
        name: str,
        parameters: dict[str, Any],
        tags: list[str],
        idempotency_key: str,
        grace_s: float,
        covered_by: str | None = None,
    ) -> CreatedRun:
        """Create (or find, by idempotency key) the run, Scheduled `grace_s` from now.

        With `covered_by` (another run's id) the run is created Completed, named after it:
        it records the alert and never executes (the other run handles its target).
        """
        dep_id = await self.deployment_id(deployment)
        when = datetime.now(UTC) + timedelta(seconds=grace_s)
        state: dict[str, Any] = {
            "type": "SCHEDULED",
            "name": "Scheduled",
            "message": "started by an Alertmanager webhook",
            "state_details": {"scheduled_time": when.isoformat()},
        }
        if covered_by is not None:
            state = {
                "type": "COMPLETED",
                "name": "Covered",
                "message": f"covered by run {covered_by}, acting on the same target",
            }
        body = {
            "name": name,
            "parameters": parameters,
            "tags": tags,
            "idempotency_key": idempotency_key,
            "state": state,
        }
        response = await self._request("POST", f"deployments/{dep_id}/create_flow_run", json=body)
        if response.status_code == 404:
            self._deployment_ids.pop(deployment, None)
            raise DeploymentNotFound(deployment)
        if _is_final(response):
            # 409/422/400: the server refused the request; nothing was created, and the same
            # request will be refused again.
            raise PrefectRefused(response.status_code, _detail(response))
        if response.is_error:
            raise PrefectUnavailable(f"creating a run of {deployment}: HTTP {response.status_code}")
        data = response.json()
        return CreatedRun(UUID(data["id"]), data["name"], response.status_code == 201)

    async def runs_tagged(self, tag: str, page: int = 200) -> list[dict[str, Any]]:
        """Every flow run carrying `tag`, oldest first (id, name, tags, created)."""
        found: list[dict[str, Any]] = []
        while True:
            body = {
                "flow_runs": {"tags": {"all_": [tag]}},
                "sort": "EXPECTED_START_TIME_ASC",
                "limit": page,
                "offset": len(found),
            }
            response = await self._request("POST", "flow_runs/filter", json=body)
            if response.is_error:
                raise PrefectUnavailable(f"reading runs tagged {tag}: HTTP {response.status_code}")
            batch = list(response.json())
            found += batch
            if len(batch) < page:
                return found

    async def runs_of_occurrence(self, idempotency_key: str, tag: str) -> list[dict[str, Any]]:
        """The runs created for one alert occurrence (its idempotency key), carrying `tag`.

        What a receiver that never journaled the occurrence (another receiver created its
        run) finds to cancel when it resolves. Prefect keys runs by (flow, idempotency key),
        so this is one run per routed deployment, normally one.
        """
        body = {
            "flow_runs": {"idempotency_key": {"any_": [idempotency_key]}, "tags": {"all_": [tag]}},
            "limit": 20,
        }
        response = await self._request("POST", "flow_runs/filter", json=body)
        if response.is_error:
            raise PrefectUnavailable(f"reading the runs of an alert: HTTP {response.status_code}")
        return list(response.json())

    async def put_markdown(
        self, artifact_id: str | None, flow_run_id: str, key: str, markdown: str, description: str
    ) -> str:
        """Create a markdown artifact on a run, or update the one with `artifact_id`; its id."""
        if artifact_id is not None:
            response = await self._request(
                "PATCH",
                f"artifacts/{artifact_id}",
                json={"data": markdown, "description": description},
            )
            if response.status_code != 404:
                if response.is_error:
                    raise PrefectUnavailable(f"updating artifact: HTTP {response.status_code}")
                return artifact_id
        body = {
            "key": key,
            "type": "markdown",
            "data": markdown,
            "description": description,
            "flow_run_id": flow_run_id,
        }
        response = await self._request("POST", "artifacts/", json=body)
        if response.is_error:
            raise PrefectUnavailable(f"creating artifact: HTTP {response.status_code}")
        return str(response.json()["id"])

    async def run_state(self, run_id: str) -> str | None:
        """The run's state type (`SCHEDULED`, `RUNNING`, ...), or None if it does not exist."""
        response = await self._request("GET", f"flow_runs/{run_id}")
        if response.status_code == 404:
            return None
        if response.is_error:
            raise PrefectUnavailable(f"reading run {run_id}: HTTP {response.status_code}")
        state = response.json().get("state") or {}
        return str(state.get("type")) if state.get("type") else None

    async def cancel_if_not_started(self, run_id: str) -> tuple[bool, str | None]:
        """Cancel the run only while it is Scheduled or Pending: (cancelled, state type).

        Proposes CANCELLING, exactly as the UI's Cancel button does, through orchestration
        (not forced): Prefect turns it into CANCELLED at once for a Scheduled run with no
        process yet (its BypassCancellingFlowRunsWithNoInfra rule, checked inside the
        server's transaction), and the Runner or warm pool that claimed a Pending run
        terminates its process. A Running (or Paused, or finished) run is never touched.
        Prefect's API has no "only if still Pending" precondition: the remaining window is
        one round trip between the read and the write.
        """
        before = await self.run_state(run_id)
        if before not in NOT_STARTED:
            return False, before
        body = {
            "state": {
                "type": "CANCELLING",
                "name": "Cancelling",
                "message": "the alert resolved before its run started",
            },
            "force": False,
        }
        response = await self._request("POST", f"flow_runs/{run_id}/set_state", json=body)
        if response.is_error:
            raise PrefectUnavailable(f"cancelling run {run_id}: HTTP {response.status_code}")
        after = (response.json().get("state") or {}).get("type")
        return after in ("CANCELLING", "CANCELLED"), after


def _is_final(response: httpx.Response) -> bool:
    code = response.status_code
    return 400 <= code < 500 and code not in NOT_FINAL_4XX


def _detail(response: httpx.Response) -> str:
    """Prefect's `detail` text, one line, bounded (it may quote parameters, never secrets)."""
    try:
        data = response.json()
    except ValueError:
        data = response.text
    detail = data.get("detail", data) if isinstance(data, dict) else data
    return " ".join(str(detail).split())[:300]
