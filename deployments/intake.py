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


class PrefectUnavailable(Exception):
    """The run could not be recorded (Prefect down, or kept answering 5xx)."""


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
    ) -> CreatedRun:
        """Create (or find, by idempotency key) the run, Scheduled `grace_s` from now."""
        dep_id = await self.deployment_id(deployment)
        when = datetime.now(UTC) + timedelta(seconds=grace_s)
        body = {
            "name": name,
            "parameters": parameters,
            "tags": tags,
            "idempotency_key": idempotency_key,
            "state": {
                "type": "SCHEDULED",
                "name": "Scheduled",
                "message": "started by an Alertmanager webhook",
                "state_details": {"scheduled_time": when.isoformat()},
            },
        }
        response = await self._request("POST", f"deployments/{dep_id}/create_flow_run", json=body)
        if response.status_code == 404:
            self._deployment_ids.pop(deployment, None)
            raise DeploymentNotFound(deployment)
        if response.is_error:
            # 409/422: the server refused the parameters; nothing was created.
            raise PrefectUnavailable(
                f"creating a run of {deployment}: HTTP {response.status_code} {response.text[:300]}"
            )
        data = response.json()
        return CreatedRun(UUID(data["id"]), data["name"], response.status_code == 201)
