"""The Alertmanager webhook receiver: `POST /alerts` -> one flow run per firing alert.

Order of checks, each refusing before anything starts:

1. auth (bearer token or basic auth, constant-time compare) before the body is even read: 401;
2. body size: 413; JSON and the version-4 payload model: 400 / 422;
3. per alert: resolved -> recorded only; no route -> recorded only; parameters that the
   route cannot build or the runbook's model rejects -> recorded, nothing started.

Then every routed firing alert is written to the journal (`deployments/journal.py`, durable,
unique per `idempotency_key = fingerprint:startsAt`) and created as a deployment flow run in
the background, so Alertmanager's at-least-once delivery (HA peers, retries) starts exactly
one run and a slow Prefect never holds Alertmanager's request. Status: 200 when every alert
was started, accepted, deduplicated or deliberately skipped; 503 only when an alert could not
be recorded at all (Alertmanager retries 5xx only; the retry is deduplicated). The token is
never logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.alertmanager import Alert, WebhookPayload
from deployments.catalog import Runbook, by_deployment
from deployments.intake import DeploymentNotFound, PrefectRuns, PrefectUnavailable
from deployments.journal import Entry, Journal
from deployments.routing import MissingLabel, RoutingTable, build_params
from deployments.settings import ReceiverSettings
from deployments.warm_pool import WarmPool

log = logging.getLogger("runbooks.receiver")

Outcome = Literal[
    "started", "accepted", "deduplicated", "resolved", "unrouted", "rejected", "failed"
]


class AlertResult(BaseModel):
    """What happened to one alert of the delivery."""

    fingerprint: str
    alertname: str
    outcome: Outcome
    deployment: str | None = None
    flow_run_id: str | None = None
    executor: Literal["warm", "runner"] | None = None
    detail: str = ""


class IntakeResult(BaseModel):
    """The answer to a delivery, one entry per alert."""

    alerts: list[AlertResult] = Field(default_factory=list)


class Credentials:
    """Accepted credentials; compared in constant time, never printed."""

    def __init__(self, token: str | None, basic_user: str | None, basic_pw: str | None) -> None:
        if not token and not (basic_user and basic_pw):
            raise ValueError("the receiver needs a bearer token or basic-auth credentials")
        self._token = token.encode() if token else None
        self._basic = f"{basic_user}:{basic_pw}".encode() if basic_user and basic_pw else None

    def __repr__(self) -> str:
        return "Credentials(***)"

    def check(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        given = value.strip().encode()
        if scheme == "bearer" and self._token is not None:
            return hmac.compare_digest(given, self._token)
        if scheme == "basic" and self._basic is not None:
            try:
                decoded = base64.b64decode(given, validate=True)
            except (binascii.Error, ValueError):
                return False
            return hmac.compare_digest(decoded, self._basic)
        return False


class AuthFirst:
    """ASGI middleware: `/alerts` is refused (401) before its body is read or parsed."""

    def __init__(self, app: ASGIApp, credentials: Credentials, max_body: int) -> None:
        self.app = app
        self.credentials = credentials
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].rstrip("/") == "/alerts":
            headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
            auth = headers.get("authorization", b"").decode("latin-1")
            if not self.credentials.check(auth):
                response = JSONResponse(
                    {"detail": "unauthorized"},
                    status_code=401,
                    headers={"WWW-Authenticate": 'Bearer realm="alerts"'},
                )
                await response(scope, receive, send)
                return
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                await JSONResponse({"detail": "body too large"}, status_code=413)(
                    scope, receive, send
                )
                return
        started = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                took = (time.perf_counter() - started) * 1000
                headers = list(message.get("headers", []))
                headers.append((b"server-timing", f"receiver;dur={took:.2f}".encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, timed_send)


@dataclass
class Intake:
    """Turns a validated payload into flow runs; shared by every request.

    A routed firing alert is written to the journal (durable, unique per idempotency key),
    then its run is created in Prefect by a background task that retries until Prefect takes
    it. The request waits for that at most `sync_wait_s`: normally the answer carries the run
    id ("started"); under a burst it says "accepted" and the run follows.
    """

    table: RoutingTable
    runbooks: tuple[Runbook, ...]
    runs: PrefectRuns
    pool: WarmPool | None
    grace_s: float
    cache_size: int
    journal: Journal = field(default_factory=lambda: Journal(None))
    sync_wait_s: float = 0.0
    max_parallel_creates: int = 4
    _index: dict[str, Runbook] = field(default_factory=dict)
    _recent: OrderedDict[str, AlertResult] = field(default_factory=OrderedDict)
    _inflight: dict[str, asyncio.Task[AlertResult]] = field(default_factory=dict)
    _slots: asyncio.Semaphore | None = None
    _journal_queue: list[tuple[Entry, asyncio.Future[tuple[bool, str | None]]]] = field(
        default_factory=list
    )
    _journal_writer: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self._index = by_deployment(self.runbooks)

    async def start(self) -> None:
        """Replay what a previous receiver accepted but did not create."""
        self._slots = asyncio.Semaphore(self.max_parallel_creates)
        try:
            pending = self.journal.pending()
        except sqlite3.Error:
            log.exception("journal unreadable: nothing replayed")
            return
        for entry in pending:
            log.warning("replaying accepted alert %s", entry.idempotency_key)
            self._spawn(entry)

    async def stop(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    async def handle(self, payload: WebhookPayload) -> IntakeResult:
        jobs = [self._one(alert) for alert in payload.alerts]
        return IntakeResult(alerts=list(await asyncio.gather(*jobs)))

    async def _one(self, alert: Alert) -> AlertResult:
        base = {"fingerprint": alert.fingerprint, "alertname": alert.alertname}
        if alert.status == "resolved":
            _record("resolved", alert, "resolved alerts start nothing")
            return AlertResult(**base, outcome="resolved")
        route = self.table.route_for(alert.labels)
        if route is None:
            _record("unrouted", alert, "no route for this alert")
            return AlertResult(**base, outcome="unrouted")
        runbook = self._index[route.deployment]
        try:
            params = build_params(route, runbook, alert.labels)
        except (MissingLabel, ValidationError) as exc:
            detail = f"parameters rejected: {_short(exc)}"
            _record("rejected", alert, detail, route.deployment)
            return AlertResult(
                **base, outcome="rejected", deployment=route.deployment, detail=detail
            )
        key = alert.idempotency_key
        cached = self._recent.get(key)
        if cached is not None:
            return cached.model_copy(update={"outcome": "deduplicated", "executor": None})
        task = self._inflight.get(key)
        if task is None:
            entry = Entry(
                idempotency_key=key,
                deployment=route.deployment,
                name=f"{alert.alertname}-{alert.fingerprint[:12]}".lower(),
                parameters={"params": params},
                tags=[
                    "source:alert",
                    f"alert:{alert.fingerprint}",
                    f"alertname:{alert.alertname}",
                    "auto" if route.auto else "plan-only",
                ],
            )
            try:
                new, run_id = await self._journal_add(entry)
            except sqlite3.Error as exc:
                log.error("alert %s: journal write failed: %s", alert.fingerprint, exc)
                return AlertResult(
                    **base, outcome="failed", deployment=route.deployment, detail="not recorded"
                )
            if not new and run_id is not None:
                result = AlertResult(
                    **base, outcome="deduplicated", deployment=route.deployment, flow_run_id=run_id
                )
                self._remember(key, result)
                return result
            # New, or accepted earlier and still being created (by a concurrent delivery
            # that got here first, or replayed at start): one creation task per key.
            existing = self._inflight.get(key)
            task = existing if existing is not None else self._spawn(entry)
            first = new
        else:
            first = False
        if not first:  # a repeat of an alert whose run is being created: answer at once
            return AlertResult(
                **base,
                outcome="deduplicated",
                deployment=route.deployment,
                detail="recorded earlier; the run is being created",
            )
        if task.done() and not task.cancelled() and task.exception() is None:
            return task.result().model_copy(update=base)
        try:
            if self.sync_wait_s <= 0:
                raise TimeoutError
            result = await asyncio.wait_for(asyncio.shield(task), self.sync_wait_s)
        except TimeoutError:
            return AlertResult(
                **base,
                outcome="accepted",
                deployment=route.deployment,
                detail="recorded; the run is being created",
            )
        return result.model_copy(update=base)

    async def _journal_add(self, entry: Entry) -> tuple[bool, str | None]:
        """Group commit: deliveries arriving while a write is on disk share the next fsync."""
        future: asyncio.Future[tuple[bool, str | None]] = asyncio.get_running_loop().create_future()
        self._journal_queue.append((entry, future))
        if self._journal_writer is None or self._journal_writer.done():
            self._journal_writer = asyncio.get_running_loop().create_task(self._write_journal())
        return await future

    async def _write_journal(self) -> None:
        while self._journal_queue:
            batch, self._journal_queue = self._journal_queue, []
            try:
                # In a thread: the fsync must not stall the event loop.
                results = await asyncio.to_thread(self.journal.add_many, [e for e, _ in batch])
            except Exception as exc:  # noqa: BLE001 - each waiting delivery gets the error
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

    def _spawn(self, entry: Entry) -> asyncio.Task[AlertResult]:
        task = asyncio.get_running_loop().create_task(self._create(entry))
        self._inflight[entry.idempotency_key] = task

        def done(t: asyncio.Task[AlertResult]) -> None:
            self._inflight.pop(entry.idempotency_key, None)
            if not t.cancelled() and t.exception() is None:
                self._remember(entry.idempotency_key, t.result())

        task.add_done_callback(done)
        return task

    async def _create(self, entry: Entry) -> AlertResult:
        """Create the run in Prefect, retrying until it is recorded there."""
        fingerprint = entry.tags[1].removeprefix("alert:")
        base = {"fingerprint": fingerprint, "alertname": entry.tags[2].split(":", 1)[1]}
        delay = 0.5
        if self._slots is None:  # start() was not awaited (an app without its lifespan)
            self._slots = asyncio.Semaphore(self.max_parallel_creates)
        while True:
            try:
                async with self._slots:
                    run = await self.runs.create_run(
                        entry.deployment,
                        name=entry.name,
                        parameters=entry.parameters,
                        tags=entry.tags,
                        idempotency_key=entry.idempotency_key,
                        grace_s=self.grace_s if self.pool is not None else 0.0,
                    )
                break
            except DeploymentNotFound:
                log.error(
                    "alert %s: deployment %s not registered (is serve running?); retrying",
                    fingerprint,
                    entry.deployment,
                )
            except PrefectUnavailable as exc:
                log.warning("alert %s: run not created yet (%s); retrying", fingerprint, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        self.journal.created(entry.idempotency_key, str(run.id))
        if not run.new:
            log.info("alert %s: already has run %s", fingerprint, run.id)
            return AlertResult(
                **base, outcome="deduplicated", deployment=entry.deployment, flow_run_id=str(run.id)
            )
        warm = self.pool is not None and self.pool.try_submit(run.id, entry.deployment)
        log.info(
            "alert %s -> %s run %s [%s]",
            fingerprint,
            entry.deployment,
            run.id,
            "warm" if warm else "runner",
        )
        return AlertResult(
            **base,
            outcome="started",
            deployment=entry.deployment,
            flow_run_id=str(run.id),
            executor="warm" if warm else "runner",
        )

    def _remember(self, key: str, result: AlertResult) -> None:
        if self.cache_size <= 0:
            return
        self._recent[key] = result
        while len(self._recent) > self.cache_size:
            self._recent.popitem(last=False)


def _short(exc: Exception) -> str:
    return str(exc).replace("\n", " ")[:300]


def _record(kind: str, alert: Alert, detail: str, deployment: str | None = None) -> None:
    """Log, and emit a Prefect event so the intake decision is in the UI's event feed."""
    log.info("alert %s (%s) %s: %s", alert.fingerprint, alert.alertname, kind, detail)
    try:
        from prefect.events import emit_event
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            return  # no server configured: never let Prefect start an ephemeral one
        emit_event(
            event=f"runbooks.alert.{kind}",
            resource={
                "prefect.resource.id": f"alertmanager.alert.{alert.fingerprint}",
                "prefect.resource.name": alert.alertname or alert.fingerprint,
            },
            payload={
                "labels": alert.labels,
                "startsAt": alert.startsAt,
                "detail": detail,
                "deployment": deployment,
            },
        )
    except Exception:  # noqa: BLE001 - the log line above is the record of last resort
        log.warning("could not emit the intake event for %s", alert.fingerprint)


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
    credentials = Credentials(
        settings.token.get_secret_value() if settings.token else None,
        settings.basic_user,
        settings.basic_password.get_secret_value() if settings.basic_password else None,
    )
    runs = runs or PrefectRuns(api_url, api_auth_string, settings.prefect_retry_s)
    intake = Intake(
        table=table,
        runbooks=runbooks,
        runs=runs,
        pool=pool,
        grace_s=settings.grace_s,
        cache_size=settings.dedup_cache_size,
        journal=journal or Journal(settings.journal_path),
        sync_wait_s=settings.sync_wait_s,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
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
    )
    app.state.intake = intake

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

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness: the receiver answers; how many warm processes are idle."""
        return {
            "status": "ok",
            "routes": len(table.routes),
            "warm_idle": pool.idle() if pool is not None else 0,
        }

    app.add_middleware(AuthFirst, credentials=credentials, max_body=settings.max_body_bytes)
    return app
