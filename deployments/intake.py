"""The receiver's intake: routing an alert to runs, the journal, coalescing, cancelling.

A routed firing alert is journaled (`deployments/journal.py`, unique per
`fingerprint:startsAt`, subject to the route's cooldown) and its run created in Prefect in
the background (`deployments/prefect_runs.py`); a resolved alert cancels the runs of its
occurrence that have not started and, if one ran, starts a `post-incident` draft.
`deployments/receiver.py` serves it over HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from deployments.alertmanager import Alert, WebhookPayload
from deployments.catalog import Runbook, by_deployment, by_name
from deployments.coalescing import CoveredArtifacts, handler_run
from deployments.group_commit import GroupCommit
from deployments.intake_results import (
    AlertResult,
    IntakeResult,
    entry_base,
    record_decision,
    run_name,
    short_error,
)
from deployments.journal import Entry, Journal
from deployments.prefect_runs import (
    CreatedRun,
    DeploymentNotFound,
    PrefectRefused,
    PrefectRuns,
    PrefectUnavailable,
)
from deployments.resolution import POST_INCIDENT, Resolutions
from deployments.routing import (
    DEFAULT_REQUESTED_BY,
    MODE_LEVELS,
    MODE_TAGS,
    MissingLabel,
    Route,
    RoutingTable,
    build_params,
)
from deployments.warm_pool import WarmPool
from tasks.run_tags import ALERT_SOURCE, alert_tags, covered_by_tag, runbook_tag

log = logging.getLogger("runbooks.receiver")


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
    #: Who asked, in the runs' parameters (`requested_by`) unless a route says otherwise.
    requested_by: str = DEFAULT_REQUESTED_BY
    #: The catalog by runbook name, as routes name them.
    _index: dict[str, Runbook] = field(default_factory=dict)
    _recent: OrderedDict[str, AlertResult] = field(default_factory=OrderedDict)
    _inflight: dict[str, asyncio.Task[AlertResult]] = field(default_factory=dict)
    _background: set[asyncio.Task[Any]] = field(default_factory=set)
    #: Keys a resolved alert cancelled before their run was created (read by `_create`).
    _cancelled: set[str] = field(default_factory=set)
    _slots: asyncio.Semaphore | None = None
    _journal_writes: GroupCommit = field(init=False)
    #: Runs being created with the short grace, each counting on an idle warm process.
    _promised: int = 0
    _covered: CoveredArtifacts = field(init=False)
    _resolutions: Resolutions = field(init=False)

    def __post_init__(self) -> None:
        self._index = by_name(self.runbooks)
        self._covered = CoveredArtifacts(self.runs)
        self._journal_writes = GroupCommit(self.journal)
        self._resolutions = Resolutions(
            journal=self.journal,
            runs=self.runs,
            pool=self.pool,
            post_incident=POST_INCIDENT in by_deployment(self.runbooks),
            cancelled=self._cancelled,
            keep=self._keep,
            wait=self._wait,
            routed=lambda alert: self.table.route_for(alert.labels) is not None,
        )

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
            **entry_base(entry), outcome="expired", deployment=entry.deployment, detail=reason
        )

    async def handle(self, payload: WebhookPayload) -> IntakeResult:
        jobs = [self._one(alert) for alert in payload.alerts]
        return IntakeResult(alerts=list(await asyncio.gather(*jobs)))

    async def _one(self, alert: Alert) -> AlertResult:
        base = {"fingerprint": alert.fingerprint, "alertname": alert.alertname}
        if alert.status == "resolved":
            return await self._resolutions.resolved(alert)
        route = self.table.route_for(alert.labels)
        if route is None:
            record_decision("unrouted", alert, "no route for this alert")
            return AlertResult(**base, outcome="unrouted")
        runbook = self._index[route.runbook]
        try:
            params = build_params(route, runbook, alert.labels, self.requested_by)
            target = runbook.target_of({**params}) or ""
        except (MissingLabel, ValidationError) as exc:
            detail = f"parameters rejected: {short_error(exc)}"
            record_decision("rejected", alert, detail, runbook.deployment)
            return AlertResult(
                **base, outcome="rejected", deployment=runbook.deployment, detail=detail
            )
        key = alert.idempotency_key
        cached = self._recent.get(key)
        if cached is not None:
            return cached.model_copy(update={"outcome": "deduplicated", "executor": None})
        task = self._inflight.get(key)
        if task is None:
            entry = self._entry(alert, route, runbook, params, target)
            accepted = await self._accept(alert, route, entry)
            if isinstance(accepted, AlertResult):
                return accepted
            task, first = accepted
        else:
            first = False
        if not first:  # a repeat of an alert whose run is being created: answer at once
            return AlertResult(
                **base,
                outcome="deduplicated",
                deployment=runbook.deployment,
                detail="recorded earlier; the run is being created",
            )
        created = await self._wait(task)
        if created is None:
            return AlertResult(
                **base,
                outcome="accepted",
                deployment=runbook.deployment,
                detail="recorded; the run is being created",
            )
        return created.model_copy(update=base)

    def _entry(
        self, alert: Alert, route: Route, runbook: Runbook, params: dict[str, Any], target: str
    ) -> Entry:
        """The journal entry of a routed firing alert: its run's name, parameters and tags."""
        key = alert.idempotency_key
        return Entry(
            idempotency_key=key,
            deployment=runbook.deployment,
            name=run_name(alert.alertname, alert.fingerprint),
            parameters={"params": params},
            tags=[
                ALERT_SOURCE,
                # The tag the run would add itself (flows.common.tag_run): set here, it
                # saves every alert run an update of its own tags.
                runbook_tag(runbook.name),
                *alert_tags(alert.fingerprint, alert.alertname),
                MODE_TAGS[route.mode],
            ],
            fingerprint=alert.fingerprint,
            starts_at=alert.startsAt,
            cooldown_s=route.cooldown.total_seconds(),
            accepted_ts=time.time(),
            target=target,
            acts=MODE_LEVELS[route.mode],
        )

    async def _accept(
        self, alert: Alert, route: Route, entry: Entry
    ) -> AlertResult | tuple[asyncio.Task[AlertResult], bool]:
        """Journal the entry: the answer if decided now (cooldown, recorded earlier, not
        recorded), else its creation task and whether this delivery is the first."""
        base = {"fingerprint": alert.fingerprint, "alertname": alert.alertname}
        key = alert.idempotency_key
        try:
            added = await self._journal_writes.add(entry)
        except sqlite3.Error as exc:
            log.error("alert %s: journal write failed: %s", alert.fingerprint, exc)
            return AlertResult(
                **base, outcome="failed", deployment=entry.deployment, detail="not recorded"
            )
        if added.outcome == "cooldown":
            ago = time.time() - (added.earlier_ts or 0.0)
            detail = (
                f"this alert started a run of this route {ago:.0f} s ago (key "
                f"{added.earlier_key}); cooldown {route.cooldown.total_seconds():.0f} s: "
                "nothing started"
            )
            record_decision("cooldown", alert, detail, entry.deployment)
            # Not cached: a later delivery, after the cooldown, is decided again.
            return AlertResult(
                **base,
                outcome="cooldown",
                deployment=entry.deployment,
                flow_run_id=added.flow_run_id,
                detail=detail,
            )
        if added.outcome == "exists" and added.status != "pending":
            result = AlertResult(
                **base,
                outcome="deduplicated",
                deployment=entry.deployment,
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
        return task, added.outcome in ("new", "covered")

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
        """Create the run in Prefect, retrying what may succeed later, until max age."""
        fingerprint = entry_base(entry)["fingerprint"]
        if self._slots is None:  # start() was not awaited (an app without its lifespan)
            self._slots = asyncio.Semaphore(self.max_parallel_creates)
        handler: str | None = None
        if entry.covered_by is not None:
            handler = await handler_run(entry, self._inflight, self.journal, self.max_age_s)
            if handler is None:  # the covering alert never got a run: this one gets its own
                log.warning("alert %s: its covering run never started; starting one", fingerprint)
                await asyncio.to_thread(self.journal.uncover, entry.idempotency_key)
                entry = replace(entry, covered_by=None)
        tags = entry.tags if handler is None else [*entry.tags, covered_by_tag(handler)]
        promise = _Promise()
        try:
            return await self._create_run(entry, handler, tags, promise)
        finally:
            self._release(promise)

    async def _create_run(
        self, entry: Entry, handler: str | None, tags: list[str], promise: _Promise
    ) -> AlertResult:
        """`_create`'s loop: the run created (or refused, expired...), then handed over."""
        run = await self._create_until_taken(entry, handler, tags, promise)
        if isinstance(run, AlertResult):
            return run
        return await self._hand_over(entry, handler, run)

    async def _create_until_taken(
        self, entry: Entry, handler: str | None, tags: list[str], promise: _Promise
    ) -> CreatedRun | AlertResult:
        """Retry creating the run until Prefect takes it; the answer if it never will."""
        assert self._slots is not None
        base = entry_base(entry)
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
        return run

    async def _hand_over(self, entry: Entry, handler: str | None, run: CreatedRun) -> AlertResult:
        """The created run: cancelled if resolved meanwhile, else covered or started."""
        base = entry_base(entry)
        fingerprint = base["fingerprint"]
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
            self._covered.mark(handler, self._keep)
            await self._covered.note(str(run.id), handler)
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

    def _remember(self, key: str, result: AlertResult) -> None:
        if self.cache_size <= 0:
            return
        self._recent[key] = result
        while len(self._recent) > self.cache_size:
            self._recent.popitem(last=False)


@dataclass
class _Promise:
    """Whether a run being created holds one of the idle warm processes (`_grace`)."""

    held: bool = False
