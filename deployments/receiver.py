"""The Alertmanager webhook receiver: `POST /alerts` -> one flow run per firing alert.

Order of checks, each refusing before anything starts:

1. auth (bearer token or basic auth, constant-time compare) on every request but
   `/healthz`, in an ASGI middleware before the body is even read, and again in the route
   (so it holds under a `root_path`, mounted in another app, or without the middleware): 401;
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
import base64
import binascii
import hmac
import logging
import re
import sqlite3
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.alertmanager import Alert, WebhookPayload
from deployments.catalog import Runbook, by_deployment
from deployments.intake import DeploymentNotFound, PrefectRefused, PrefectRuns, PrefectUnavailable
from deployments.journal import Added, Entry, Journal, Record
from deployments.routing import MissingLabel, RoutingTable, build_params
from deployments.settings import ReceiverSettings
from deployments.warm_pool import WarmPool
from flows.common import md_escape
from tasks.alerts import FINGERPRINT

log = logging.getLogger("runbooks.receiver")

#: A resolved alert whose run started (reached one of these states) gets a post-incident
#: draft. Scheduled/Pending runs are cancelled instead; a Cancelled one never acted.
RAN = {"RUNNING", "PAUSED", "COMPLETED", "FAILED", "CRASHED"}
POST_INCIDENT = "post-incident/post-incident"

Outcome = Literal[
    "started",  # run created (flow_run_id)
    "accepted",  # journaled, run being created
    "deduplicated",  # recorded earlier (same fingerprint + startsAt)
    "cooldown",  # this alert started a run of the route within its cooldown: nothing started
    "covered",  # another alert's run handles the same target: recorded Completed, covered
    "resolved",  # resolved, no run of it waiting to start (a Running one is left alone)
    "cancelled",  # resolved while its run was Scheduled or Pending: that run was cancelled
    "unrouted",  # no route
    "rejected",  # parameters the route or the runbook's model refused
    "refused",  # Prefect refused the run for good (4xx): journaled as failed
    "expired",  # not created within max_age: journaled as expired, never started
    "failed",  # could not be journaled: 503, Alertmanager retries
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


def route_path(scope: Scope) -> str:
    """The path inside this app, whether it is served under a `root_path` or mounted.

    Servers and Starlette's `Mount` put the prefix in `root_path`; depending on the version,
    `path` still carries it (ASGI spec) or not. Either way, strip it: authentication must
    not depend on where the app is mounted.
    """
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path or "/"


class AuthFirst:
    """ASGI middleware: every request but `/healthz` is authenticated before anything else.

    Default deny: a request that is not exactly `/healthz` (inside this app) needs
    credentials, 401 otherwise, before its body is read or parsed. The body of an
    authenticated request is then read here, counting bytes, whatever its framing
    (Content-Length, chunked, or a stream with neither): 413 as soon as it exceeds
    `max_body`, so a sender that never ends its body cannot make us buffer it.
    """

    def __init__(self, app: ASGIApp, credentials: Credentials, max_body: int) -> None:
        self.app = app
        self.credentials = credentials
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # no websocket routes: refuse before accepting
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                took = (time.perf_counter() - started) * 1000
                headers = list(message.get("headers", []))
                headers.append((b"server-timing", f"receiver;dur={took:.2f}".encode()))
                message = {**message, "headers": headers}
            await send(message)

        if route_path(scope) == "/healthz":
            await self.app(scope, receive, timed_send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        if not self.credentials.check(headers.get("authorization", b"").decode("latin-1")):
            await _unauthorized()(scope, receive, send)
            return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _too_large()(scope, receive, send)
            return
        body = await self._read_body(receive)
        if body is None:  # over the limit: answered without reading the rest
            await _too_large()(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # http.disconnect, when the client goes

        await self.app(scope, replay, timed_send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it exceeds the limit."""
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _unauthorized() -> JSONResponse:
    return JSONResponse(
        {"detail": "unauthorized"},
        status_code=401,
        headers={"WWW-Authenticate": 'Bearer realm="alerts"'},
    )


def _too_large() -> JSONResponse:
    # Connection: close: the rest of the body is never read, so the connection cannot be
    # reused for another request.
    return JSONResponse(
        {"detail": "body too large"}, status_code=413, headers={"Connection": "close"}
    )


@dataclass
class Intake:
    """Turns a validated payload into flow runs; shared by every request.

    A routed firing alert is written to the journal (durable, unique per idempotency key,
    subject to the route's cooldown), then its run is created in Prefect by a background task
    that retries until Prefect takes it, refuses it for good (a final 4xx: recorded as
    failed) or the entry is older than `max_age_s` (recorded as expired). The request waits
    for that at most `sync_wait_s`: normally the answer carries the run id ("started"); under
    a burst it says "accepted" and the run follows. Every firing and resolved notification
    of a routed alert is recorded per occurrence (`GET /alerts/{fingerprint}` reads it). A
    resolved alert cancels the runs of its own occurrence that have not started yet
    (Scheduled or Pending), never a Running one.
    """

    table: RoutingTable
    runbooks: tuple[Runbook, ...]
    runs: PrefectRuns
    pool: WarmPool | None
    grace_s: float
    cache_size: int
    journal: Journal = field(default_factory=lambda: Journal(None))
    sync_wait_s: float = 0.0
    #: Grace of a run created while every warm process is busy (it waits in their queue).
    queue_grace_s: float = 120.0
    max_parallel_creates: int = 4
    max_age_s: float = 3600.0
    retention_s: float = 7 * 24 * 3600.0
    prune_interval_s: float = 600.0
    _index: dict[str, Runbook] = field(default_factory=dict)
    _recent: OrderedDict[str, AlertResult] = field(default_factory=OrderedDict)
    _inflight: dict[str, asyncio.Task[AlertResult]] = field(default_factory=dict)
    _background: set[asyncio.Task[Any]] = field(default_factory=set)
    #: Keys a resolved alert cancelled before their run was created (read by `_create`).
    _cancelled: set[str] = field(default_factory=set)
    _slots: asyncio.Semaphore | None = None
    _journal_queue: list[tuple[Entry, asyncio.Future[Added]]] = field(default_factory=list)
    _journal_writer: asyncio.Task[None] | None = None
    #: Handler runs whose `covered-alerts` artifact is to be (re)written, and its id.
    _covered_dirty: set[str] = field(default_factory=set)
    _covered_writers: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    #: Runs being created with the short grace, each counting on an idle warm process.
    _promised: int = 0
    _covered_artifacts: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._index = by_deployment(self.runbooks)

    async def start(self) -> None:
        """Replay what a previous receiver accepted but did not create; prune the journal."""
        self._slots = asyncio.Semaphore(self.max_parallel_creates)
        try:
            self._prune()
            pending = self.journal.pending()
        except sqlite3.Error:
            log.exception("journal unreadable: nothing replayed")
            return
        now = time.time()
        for entry in pending:
            if now - entry.accepted_ts <= self.max_age_s:
                log.warning("replaying accepted alert %s", entry.idempotency_key)
                self._spawn(entry)
                continue
            try:  # stale: recorded as expired, never started
                self._expire(entry, now)
            except sqlite3.Error:
                log.exception("journal: could not expire %s; not replayed", entry.idempotency_key)
        self._keep(asyncio.get_running_loop().create_task(self._housekeeping()))

    async def stop(self) -> None:
        tasks = [*self._inflight.values(), *self._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _keep(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """Hold a reference to a background task until it ends (and cancel it at stop)."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(self.prune_interval_s)
            try:
                await asyncio.to_thread(self._prune)
            except sqlite3.Error:
                log.exception("journal prune failed")

    def _prune(self) -> None:
        pruned = self.journal.prune(self.retention_s)
        if pruned:
            log.info("journal: pruned %d finished entries", pruned)

    def _expire(self, entry: Entry, now: float) -> AlertResult:
        age = now - entry.accepted_ts
        reason = f"not created within max_age ({age:.0f} s > {self.max_age_s:.0f} s)"
        self.journal.finish(entry.idempotency_key, "expired", reason, only_pending=True)
        log.error("alert %s expired, not started: %s", entry.idempotency_key, reason)
        return AlertResult(
            **_base(entry), outcome="expired", deployment=entry.deployment, detail=reason
        )

    async def handle(self, payload: WebhookPayload) -> IntakeResult:
        jobs = [self._one(alert) for alert in payload.alerts]
        return IntakeResult(alerts=list(await asyncio.gather(*jobs)))

    async def _one(self, alert: Alert) -> AlertResult:
        base = {"fingerprint": alert.fingerprint, "alertname": alert.alertname}
        if alert.status == "resolved":
            return await self._resolved(alert)
        route = self.table.route_for(alert.labels)
        if route is None:
            _record("unrouted", alert, "no route for this alert")
            return AlertResult(**base, outcome="unrouted")
        runbook = self._index[route.deployment]
        try:
            params = build_params(route, runbook, alert.labels)
            target = runbook.target_of({**params}) or ""
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
                name=run_name(alert.alertname, alert.fingerprint),
                parameters={"params": params},
                tags=[
                    "source:alert",
                    # The tag the run would add itself (flows.common.tag_run): set here, it
                    # saves every alert run an update of its own tags.
                    f"runbook:{runbook.name}",
                    f"alert:{alert.fingerprint}",
                    f"alertname:{_tag_value(alert.alertname)}",
                    "auto" if route.auto else "plan-only",
                ],
                fingerprint=alert.fingerprint,
                starts_at=alert.startsAt,
                cooldown_s=route.cooldown.total_seconds(),
                accepted_ts=time.time(),
                target=target,
                acts=route.auto,
            )
            try:
                added = await self._journal_add(entry)
            except sqlite3.Error as exc:
                log.error("alert %s: journal write failed: %s", alert.fingerprint, exc)
                return AlertResult(
                    **base, outcome="failed", deployment=route.deployment, detail="not recorded"
                )
            if added.outcome == "cooldown":
                ago = time.time() - (added.earlier_ts or 0.0)
                detail = (
                    f"this alert started a run of this route {ago:.0f} s ago (key "
                    f"{added.earlier_key}); cooldown {route.cooldown.total_seconds():.0f} s: "
                    "nothing started"
                )
                _record("cooldown", alert, detail, route.deployment)
                # Not cached: a later delivery, after the cooldown, is decided again.
                return AlertResult(
                    **base,
                    outcome="cooldown",
                    deployment=route.deployment,
                    flow_run_id=added.flow_run_id,
                    detail=detail,
                )
            if added.outcome == "exists" and added.status != "pending":
                result = AlertResult(
                    **base,
                    outcome="deduplicated",
                    deployment=route.deployment,
                    flow_run_id=added.flow_run_id,
                    detail=f"recorded earlier as {added.status}"
                    + (f": {added.reason}" if added.reason else ""),
                )
                self._remember(key, result)
                return result
            if added.outcome == "covered":
                entry = replace(entry, covered_by=added.earlier_key)
            # New, or accepted earlier and still being created (by a concurrent delivery
            # that got here first, or replayed at start): one creation task per key.
            existing = self._inflight.get(key)
            task = existing if existing is not None else self._spawn(entry)
            first = added.outcome in ("new", "covered")
        else:
            first = False
        if not first:  # a repeat of an alert whose run is being created: answer at once
            return AlertResult(
                **base,
                outcome="deduplicated",
                deployment=route.deployment,
                detail="recorded earlier; the run is being created",
            )
        created = await self._wait(task)
        if created is None:
            return AlertResult(
                **base,
                outcome="accepted",
                deployment=route.deployment,
                detail="recorded; the run is being created",
            )
        return created.model_copy(update=base)

    async def _wait(self, task: asyncio.Task[AlertResult]) -> AlertResult | None:
        """The task's result if it comes within `sync_wait_s`, else None (it goes on).

        A task that failed unexpectedly also gives None: the alert is journaled (replayed by
        the next start), so the delivery is answered, not turned into a 500.
        """
        if task.done():
            if task.cancelled() or task.exception() is not None:
                return None
            return task.result()
        if self.sync_wait_s <= 0:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.sync_wait_s)
        except TimeoutError:
            return None
        except Exception:  # logged; the answer says what is known
            log.exception("intake task failed")
            return None

    async def _resolved(self, alert: Alert) -> AlertResult:
        """Cancel the runs of this occurrence that have not started; a Running run is left
        alone, and so is any run of another occurrence (a newer one may be firing)."""
        base = {"fingerprint": alert.fingerprint, "alertname": alert.alertname}
        try:
            # In a thread, like every journal call on a request's path: the loop never waits
            # for the journal's lock while another thread holds it for an fsync.
            records = await asyncio.to_thread(
                self.journal.resolved, alert.fingerprint, alert.startsAt, alert.endsAt
            )
        except sqlite3.Error:
            log.exception("alert %s resolved: journal unreadable", alert.fingerprint)
            records = []
        if not records:
            _record("resolved", alert, "resolved; no run of it waiting to start")
            return AlertResult(**base, outcome="resolved")
        task = self._keep(
            asyncio.get_running_loop().create_task(self._cancel_not_started(alert, records))
        )
        result = await self._wait(task)
        if result is None:
            return AlertResult(
                **base, outcome="resolved", detail="cancelling its runs that have not started"
            )
        return result

    async def _cancel_not_started(self, alert: Alert, records: list[Record]) -> AlertResult:
        try:
            return await self._cancel_each(alert, records)
        except Exception:  # a cancellation must never crash the receiver
            log.exception("alert %s resolved: cancelling its runs failed", alert.fingerprint)
            return AlertResult(
                fingerprint=alert.fingerprint,
                alertname=alert.alertname,
                outcome="resolved",
                detail="its runs could not be checked",
            )

    async def _cancel_each(self, alert: Alert, records: list[Record]) -> AlertResult:
        base = {"fingerprint": alert.fingerprint, "alertname": alert.alertname}
        cancelled: list[str] = []
        run_ids: list[str] = []
        notes: list[str] = []
        ran = False
        for record in records:
            if record.covered_by is not None:
                # A covered alert's run never executes; its incident is the handler's.
                notes.append(f"covered by the run of {record.covered_by}")
                continue
            if record.status == "pending" and await asyncio.to_thread(
                self.journal.finish,
                record.idempotency_key,
                "cancelled",
                "the alert resolved before its run was created",
                only_pending=True,
            ):
                self._cancelled.add(record.idempotency_key)
                cancelled.append(f"{record.idempotency_key} (its run was not created yet)")
                continue
            # Created meanwhile, or earlier: ask Prefect.
            current = await asyncio.to_thread(self.journal.get, record.idempotency_key)
            run_id = current.flow_run_id if current else record.flow_run_id
            if run_id is None:
                continue
            try:
                done, state = await self.runs.cancel_if_not_started(run_id)
            except PrefectUnavailable as exc:
                log.warning(
                    "alert %s resolved: run %s not checked: %s", alert.fingerprint, run_id, exc
                )
                notes.append(f"run {run_id}: not checked (Prefect unavailable)")
                continue
            if done:
                await asyncio.to_thread(
                    self.journal.finish,
                    record.idempotency_key,
                    "cancelled",
                    "the alert resolved before its run started",
                    only_pending=False,
                )
                cancelled.append(f"run {run_id}")
                run_ids.append(run_id)
            elif state is not None:
                notes.append(f"run {run_id} is {state}: left alone")
                ran = ran or state in RAN
        if ran and POST_INCIDENT in self._index:
            notes.append(await self._start_post_incident(alert))
        detail = "; ".join([*(f"{c} cancelled" for c in cancelled), *notes])[:500]
        _record("resolved", alert, detail or "resolved")
        return AlertResult(
            **base,
            outcome="cancelled" if cancelled else "resolved",
            flow_run_id=run_ids[0] if run_ids else None,
            detail=detail,
        )

    async def _start_post_incident(self, alert: Alert) -> str:
        """Start the `post-incident` draft of a resolved alert whose runbook ran (once)."""
        fp = alert.fingerprint
        try:
            run = await self.runs.create_run(
                POST_INCIDENT,
                name=run_name("post-incident", fp),
                parameters={"params": {"incident": f"alert:{fp}", "draft": True}},
                # `incident:<key>` is the tag flows.post_incident.incident_tag gives its runs:
                # retention and the CLI find the record by it. Not `alert:<fp>`: the record
                # is about the incident's runs, not one of them.
                tags=["source:alert", f"incident:alert:{fp}"],
                # One draft per alert occurrence, however often Alertmanager re-sends it.
                idempotency_key=f"post-incident:{alert.idempotency_key}",
                grace_s=0.0,
            )
        except (PrefectUnavailable, PrefectRefused, DeploymentNotFound) as exc:
            log.warning("alert %s resolved: post-incident draft not started: %s", fp, exc)
            return f"post-incident draft not started ({type(exc).__name__})"
        if run.new and self.pool is not None:
            self.pool.try_submit(run.id, POST_INCIDENT)
        return f"post-incident draft run {run.id}"

    async def _journal_add(self, entry: Entry) -> Added:
        """Group commit: deliveries arriving while a write is on disk share the next fsync."""
        future: asyncio.Future[Added] = asyncio.get_running_loop().create_future()
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

    async def _handler_run(self, entry: Entry) -> str | None:
        """The run id of the alert covering `entry`, once created; None if it never will be."""
        assert entry.covered_by is not None
        while True:
            creating = self._inflight.get(entry.covered_by)
            if creating is not None:  # its run is being created here: wait for that, not a poll
                await asyncio.wait([creating])
            record = await asyncio.to_thread(self.journal.get, entry.covered_by)
            if record is None or record.status in ("failed", "expired", "cancelled"):
                return None
            if record.flow_run_id is not None:
                return record.flow_run_id
            if time.time() - entry.accepted_ts > self.max_age_s:
                return None
            await asyncio.sleep(0.1)

    async def _create(self, entry: Entry) -> AlertResult:
        """Create the run in Prefect, retrying what may succeed later, until max age."""
        fingerprint = _base(entry)["fingerprint"]
        if self._slots is None:  # start() was not awaited (an app without its lifespan)
            self._slots = asyncio.Semaphore(self.max_parallel_creates)
        handler: str | None = None
        if entry.covered_by is not None:
            handler = await self._handler_run(entry)
            if handler is None:  # the covering alert never got a run: this one gets its own
                log.warning("alert %s: its covering run never started; starting one", fingerprint)
                await asyncio.to_thread(self.journal.uncover, entry.idempotency_key)
                entry = replace(entry, covered_by=None)
        tags = entry.tags if handler is None else [*entry.tags, f"covered-by:{handler}"]
        promise = _Promise()
        try:
            return await self._create_run(entry, handler, tags, promise)
        finally:
            self._release(promise)

    async def _create_run(
        self, entry: Entry, handler: str | None, tags: list[str], promise: _Promise
    ) -> AlertResult:
        """`_create`'s loop: the run created (or refused, expired...), then handed over."""
        assert self._slots is not None
        base = _base(entry)
        fingerprint = base["fingerprint"]
        delay = 0.5
        while True:
            if entry.idempotency_key in self._cancelled:  # resolved meanwhile
                self._cancelled.discard(entry.idempotency_key)
                return AlertResult(
                    **base,
                    outcome="cancelled",
                    deployment=entry.deployment,
                    detail="the alert resolved before its run was created",
                )
            now = time.time()
            if now - entry.accepted_ts > self.max_age_s:
                return await asyncio.to_thread(self._expire, entry, now)
            try:
                async with self._slots:
                    run = await self.runs.create_run(
                        entry.deployment,
                        name=entry.name,
                        parameters=entry.parameters,
                        tags=tags,
                        idempotency_key=entry.idempotency_key,
                        grace_s=0.0 if handler else self._grace(promise),
                        covered_by=handler,
                    )
                break
            except PrefectRefused as exc:
                # Final: the same request would be refused again. Recorded, never retried.
                reason = f"Prefect refused the run: {exc}"
                await asyncio.to_thread(
                    self.journal.finish, entry.idempotency_key, "failed", reason, only_pending=True
                )
                log.error("alert %s: %s", fingerprint, reason)
                return AlertResult(
                    **base, outcome="refused", deployment=entry.deployment, detail=reason[:500]
                )
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
        if not await asyncio.to_thread(self.journal.created, entry.idempotency_key, str(run.id)):
            self._cancelled.discard(entry.idempotency_key)
            # The alert resolved while its run was being created: cancel it before it starts.
            done, state = await self.runs.cancel_if_not_started(str(run.id))
            log.info("alert %s resolved during creation: run %s %s", fingerprint, run.id, state)
            return AlertResult(
                **base,
                outcome="cancelled" if done else "deduplicated",
                deployment=entry.deployment,
                flow_run_id=str(run.id),
                detail=f"the alert resolved while its run was created; run is {state}",
            )
        if not run.new:
            log.info("alert %s: already has run %s", fingerprint, run.id)
            return AlertResult(
                **base, outcome="deduplicated", deployment=entry.deployment, flow_run_id=str(run.id)
            )
        if handler is not None:
            log.info("alert %s -> covered by run %s (run %s)", fingerprint, handler, run.id)
            self._covered_dirty.add(handler)
            if handler not in self._covered_writers:
                writer = self._keep(
                    asyncio.get_running_loop().create_task(self._write_covered(handler))
                )
                self._covered_writers[handler] = writer
            await self._note_covered(str(run.id), handler)
            return AlertResult(
                **base,
                outcome="covered",
                deployment=entry.deployment,
                flow_run_id=str(run.id),
                detail=f"covered by run {handler} (same target: {entry.target})",
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

    def _grace(self, promise: _Promise) -> float:
        """How far ahead to schedule a new run: long enough for the warm pool's queue to
        reach it while the pool is up (the Runner takes what is still waiting then); no
        wait at all when there is no pool to take it.

        The short grace promises the run an idle process. Runs being created at the same
        time must not count on the same one: a run queued behind it with the short grace
        would be due before a process frees up, and the Runner would start it in a fresh
        process, paying seconds of imports on the cores the storm needs.
        """
        self._release(promise)
        if self.pool is None or not self.pool.accepting():
            return 0.0
        if self.pool.idle() > self._promised:
            self._promised += 1
            promise.held = True
            return self.grace_s
        return max(self.grace_s, self.queue_grace_s)

    def _release(self, promise: _Promise) -> None:
        if promise.held:
            promise.held = False
            self._promised -= 1

    async def _note_covered(self, run_id: str, handler: str) -> None:
        """The covered run's own artifact: which run handles its alert, with a link."""
        text = (
            f"# Covered by run [{handler}](/runs/flow-run/{handler})\n\n"
            "Another alert for the same target started that run within the route's "
            "cooldown: it handles this alert too (alert storm coalescing). This run never "
            "executed; see that run's `covered-alerts` artifact and report."
        )
        try:
            await self.runs.put_markdown(None, run_id, "covered-by", text, f"covered by {handler}")
        except PrefectUnavailable as exc:  # the tag and the state message still say it
            log.warning("covered run %s: artifact not written: %s", run_id, exc)

    async def _write_covered(self, handler: str) -> None:
        """Keep the handler's `covered-alerts` artifact equal to its `covered-by:` runs.

        The list is read back from the tags each time (never accumulated here), and the
        loop runs again whenever a covered run was created meanwhile, so the last write
        always follows the last tag.
        """
        try:
            while handler in self._covered_dirty:
                self._covered_dirty.discard(handler)
                try:
                    runs = await self.runs.runs_tagged(f"covered-by:{handler}")
                    text = _covered_markdown(handler, runs)
                    self._covered_artifacts[handler] = await self.runs.put_markdown(
                        self._covered_artifacts.get(handler),
                        handler,
                        "covered-alerts",
                        text,
                        f"{len(runs)} alert(s) covered by this run",
                    )
                except PrefectUnavailable as exc:
                    log.warning("covered-alerts of run %s not written yet: %s", handler, exc)
                    self._covered_dirty.add(handler)
                    await asyncio.sleep(1.0)
        finally:
            self._covered_writers.pop(handler, None)

    def _remember(self, key: str, result: AlertResult) -> None:
        if self.cache_size <= 0:
            return
        self._recent[key] = result
        while len(self._recent) > self.cache_size:
            self._recent.popitem(last=False)


def _covered_markdown(handler: str, runs: list[dict[str, Any]]) -> str:
    """The handler's list of the alerts it covers, one row per covered run."""
    rows = []
    for run in runs:
        tags = dict(t.split(":", 1) for t in run.get("tags", []) if ":" in t)
        rows.append(
            f"| [{run['name']}](/runs/flow-run/{run['id']}) | `{tags.get('alert', '')}` "
            f"| {md_escape(tags.get('alertname', ''))} | {str(run.get('created', ''))[:19]} |"
        )
    return (
        f"# Alerts covered by this run ({len(runs)})\n\n"
        "Alerts of other fingerprints for the same target, received within the route's "
        "cooldown: recorded as Completed runs tagged `covered-by:"
        f"{handler}`, never executed.\n\n"
        "| run | alert | alertname | received (UTC) |\n|---|---|---|---|\n" + "\n".join(rows)
    )


@dataclass
class _Promise:
    """Whether a run being created holds one of the idle warm processes (`_grace`)."""

    held: bool = False


def _base(entry: Entry) -> dict[str, str]:
    """fingerprint and alertname of a journal entry (from its tags, set by `_one`)."""
    tags = dict(t.split(":", 1) for t in entry.tags if ":" in t)
    return {
        "fingerprint": entry.fingerprint or tags.get("alert", ""),
        "alertname": tags.get("alertname", ""),
    }


_SLUG = re.compile(r"[^a-z0-9]+")


def run_name(alertname: str, fingerprint: str) -> str:
    """`<alertname>-<fingerprint[:12]>`, reduced to [a-z0-9-]: a label is never markup here."""
    slug = _SLUG.sub("-", alertname.lower()).strip("-")[:60] or "alert"
    return f"{slug}-{fingerprint[:12].lower()}"


def _tag_value(value: str) -> str:
    """A label value in a tag: one line, bounded (tags are filters, not text to render)."""
    return " ".join(value.split())[:100]


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
    longest = max((r.cooldown.total_seconds() for r in table.routes), default=0.0)
    if settings.retention_s < longest:
        raise ValueError(
            f"RUNBOOKS_RECEIVER_RETENTION_S ({settings.retention_s:.0f} s) is shorter than the "
            f"longest route cooldown ({longest:.0f} s): pruning would forget a cooldown"
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
        queue_grace_s=settings.queue_grace_s,
        max_age_s=settings.max_age_s,
        retention_s=settings.retention_s,
        prune_interval_s=settings.prune_interval_s,
    )

    async def require_credentials(request: Request) -> None:
        """The route's own check: holds even where the middleware is not in front of it."""
        if not credentials.check(request.headers.get("authorization")):
            raise HTTPException(
                status_code=401,
                detail="unauthorized",
                headers={"WWW-Authenticate": 'Bearer realm="alerts"'},
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
        # No /docs, /redoc, /openapi.json: nothing but Alertmanager talks to this service,
        # and an unauthenticated schema only helps an attacker. Tools get `app.openapi()`.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
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

    app.add_middleware(AuthFirst, credentials=credentials, max_body=settings.max_body_bytes)
    return app
