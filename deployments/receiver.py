"""The Alertmanager webhook receiver: `POST /alerts` -> one flow run per firing alert.

Order of checks, each refusing before anything starts:

1. auth (bearer token or basic auth, constant-time compare) on every request but
   `/healthz`, the signed approval links (`deployments/approval_links.py`) and
   `/slack/interactions` (Slack signs those: `deployments/slack_interactions.py`), in an ASGI
   middleware before the body is even read, and again in the route (so it holds under a
   `root_path`, mounted in another app, or without the middleware): 401;
2. body size, counted while the body is read whatever its framing (chunked too): 413;
   JSON and the version-4 payload model: 422;
3. per alert: resolved -> recorded for its occurrence (fingerprint + startsAt); the runs of
   that occurrence still Scheduled or Pending are cancelled (never another occurrence's), a
   Running one is left alone, and if one of them ran, a `post-incident` draft run is
   started (once);
   no route -> recorded only; parameters that the route cannot build or the runbook's
   model rejects -> recorded, nothing started; started a run of the same route
   within the route's cooldown (a flapping alert) -> recorded, nothing started;
   another alert for the same deployment and *target* started a run within the route's
   cooldown (an alert storm) -> covered: a run is recorded Completed ("covered by run X",
   tag `covered-by:<X>`), never executed, and X's `covered-alerts` artifact lists it.

Then every routed firing alert is written to the journal (`deployments/journal.py`, durable,
unique per `idempotency_key = fingerprint:startsAt`) and created as a deployment flow run in
the background, so Alertmanager's at-least-once delivery (HA peers, retries) starts exactly
one run and a slow Prefect never holds Alertmanager's request. A final 4xx from Prefect is
recorded as failed, an entry older than `max_age_s` as expired; neither is retried. Status:
200 when every alert was started, accepted, deduplicated or deliberately skipped; 503 only
when an alert could not be recorded at all (Alertmanager retries 5xx only; the retry is
deduplicated). The token is never logged. `/docs` and `/openapi.json` are off.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from deployments.alertmanager import WebhookPayload
from deployments.approval_links import approval_router, install_redaction
from deployments.catalog import Runbook
from deployments.intake import Intake
from deployments.intake_results import IntakeResult
from deployments.journal import Journal
from deployments.prefect_runs import PrefectRuns
from deployments.receiver_auth import AuthFirst, Credentials
from deployments.routing import RoutingTable
from deployments.settings import ReceiverSettings
from deployments.slack_interactions import slack_router
from deployments.warm_pool import WarmPool
from tasks.alerts import FINGERPRINT


def create_app(
    settings: ReceiverSettings,
    table: RoutingTable,
    runbooks: tuple[Runbook, ...],
    *,
    api_url: str,
    api_auth_string: str | None = None,
    pool: WarmPool | None = None,
    runs: PrefectRuns | None = None,
    journal: Journal | None = None,
) -> FastAPI:
    """The ASGI app, with the auth-first middleware installed."""
    credentials = _credentials(settings)
    _check_retention(settings, table)
    runs = runs or PrefectRuns(api_url, api_auth_string, settings.prefect_retry_s)
    intake = _intake(settings, table, runbooks, runs, pool, journal)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Whichever server runs us has configured its logging by now: keep link tokens out.
        install_redaction()
        await intake.start()
        try:
            yield
        finally:
            await intake.stop()
            await runs.aclose()

    app = FastAPI(
        title="incident-runbooks alert receiver",
        version="1",
        lifespan=lifespan,
        description="Alertmanager webhook (version 4) -> Prefect deployment flow runs.",
        # No /docs, /redoc, /openapi.json: nothing but Alertmanager talks to this service,
        # and an unauthenticated schema only helps an attacker. Tools get `app.openapi()`.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.intake = intake

    _add_routes(app, intake, credentials, table, pool)
    # Signed approval links: their token is their credential (AuthFirst lets them through).
    app.include_router(approval_router(api_url, api_auth_string))
    # Slack's approval buttons: authenticated by Slack's signature, not the bearer token.
    app.include_router(slack_router(api_url=api_url, api_auth_string=api_auth_string))
    app.add_middleware(AuthFirst, credentials=credentials, max_body=settings.max_body_bytes)
    return app


def _credentials(settings: ReceiverSettings) -> Credentials:
    """The accepted credentials, from the settings' secrets."""
    return Credentials(
        settings.token.get_secret_value() if settings.token else None,
        settings.basic_user,
        settings.basic_password.get_secret_value() if settings.basic_password else None,
    )


def _check_retention(settings: ReceiverSettings, table: RoutingTable) -> None:
    """Refuse a journal retention shorter than a route's cooldown."""
    longest = max((r.cooldown.total_seconds() for r in table.routes), default=0.0)
    if settings.retention_s < longest:
        raise ValueError(
            f"RUNBOOKS_RECEIVER_RETENTION_S ({settings.retention_s:.0f} s) is shorter than the "
            f"longest route cooldown ({longest:.0f} s): pruning would forget a cooldown"
        )


def _intake(
    settings: ReceiverSettings,
    table: RoutingTable,
    runbooks: tuple[Runbook, ...],
    runs: PrefectRuns,
    pool: WarmPool | None,
    journal: Journal | None,
) -> Intake:
    """The intake every request shares, configured from the settings."""
    return Intake(
        table=table,
        runbooks=runbooks,
        runs=runs,
        pool=pool,
        grace_s=settings.grace_s,
        cache_size=settings.dedup_cache_size,
        journal=journal or Journal(settings.journal_path),
        sync_wait_s=settings.sync_wait_s,
        queue_grace_s=settings.queue_grace_s,
        max_age_s=settings.max_age_s,
        retention_s=settings.retention_s,
        prune_interval_s=settings.prune_interval_s,
        requested_by=settings.requested_by,
    )


def _add_routes(
    app: FastAPI,
    intake: Intake,
    credentials: Credentials,
    table: RoutingTable,
    pool: WarmPool | None,
) -> None:
    """`POST /alerts`, `GET /alerts/{fingerprint}`, `/healthz`, and the 422 handler."""

    async def require_credentials(request: Request) -> None:
        """The route's own check: holds even where the middleware is not in front of it."""
        if not credentials.check(request.headers.get("authorization")):
            raise HTTPException(
                status_code=401,
                detail="unauthorized",
                headers={"WWW-Authenticate": 'Bearer realm="alerts"'},
            )

    @app.exception_handler(RequestValidationError)
    async def invalid_payload(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Never echo the input back: it may not even be JSON-serialisable (Infinity).
        errors = [
            {"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))}
            for e in exc.errors()[:20]
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.post(
        "/alerts",
        dependencies=[Depends(require_credentials)],
        response_model=IntakeResult,
        responses={
            401: {"description": "missing or wrong credentials"},
            413: {"description": "body too large"},
            422: {"description": "not an Alertmanager version 4 payload"},
            503: {"description": "an alert could not be recorded; Alertmanager retries"},
        },
    )
    async def alerts(payload: WebhookPayload, response: Response) -> IntakeResult:
        """Start one flow run per routed firing alert (deduplicated by fingerprint+startsAt)."""
        result = await intake.handle(payload)
        if any(a.outcome == "failed" for a in result.alerts):
            response.status_code = 503
        return result

    @app.get(
        "/alerts/{fingerprint}",
        dependencies=[Depends(require_credentials)],
        responses={401: {"description": "missing or wrong credentials"}},
    )
    async def alert_state(fingerprint: str) -> dict[str, str]:
        """Firing or resolved: the alert's latest occurrence (runs ask before acting)."""
        if not FINGERPRINT.match(fingerprint):
            raise HTTPException(status_code=422, detail="not an alert fingerprint")
        state, detail = await asyncio.to_thread(intake.journal.alert_state, fingerprint)
        return {"fingerprint": fingerprint, "state": state, "detail": detail}

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness: the receiver answers; how many warm processes are idle."""
        return {
            "status": "ok",
            "routes": len(table.routes),
            "warm_idle": pool.idle() if pool is not None else 0,
        }
