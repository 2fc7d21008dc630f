"""A resolved alert: cancel the runs of its occurrence that have not started yet.

A Running run is left alone, and so is any run of another occurrence (a newer one may be
firing). If one of its runs ran, a `post-incident` draft run is started (once).

The runs are found in this receiver's journal, or, when it has no record of the occurrence
(another receiver behind the same load balancer created its run), in Prefect by the
occurrence's idempotency key (`fingerprint:startsAt`, the key the run was created with).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from deployments.alertmanager import Alert
from deployments.intake_results import AlertResult, record_decision, run_name
from deployments.journal import Journal, Record
from deployments.prefect_runs import (
    DeploymentNotFound,
    PrefectRefused,
    PrefectRuns,
    PrefectUnavailable,
)
from deployments.warm_pool import WarmPool
from tasks.run_tags import ALERT_SOURCE, alert_tag, incident_tag, parse_run_tags

log = logging.getLogger("runbooks.receiver")

#: A resolved alert whose run started (reached one of these states) gets a post-incident
#: draft. Scheduled/Pending runs are cancelled instead; a Cancelled one never acted.
RAN = {"RUNNING", "PAUSED", "COMPLETED", "FAILED", "CRASHED"}
POST_INCIDENT = "post-incident/post-incident"


@dataclass
class Resolutions:
    """Handles the resolved notifications of the intake (`Intake` owns the shared state)."""

    journal: Journal
    runs: PrefectRuns
    pool: WarmPool | None
    #: Whether the `post-incident` deployment is served (drafts are started only then).
    post_incident: bool
    #: Keys cancelled before their run was created; shared with the intake's `_create`.
    cancelled: set[str]
    keep: Callable[[asyncio.Task[Any]], asyncio.Task[Any]]
    wait: Callable[[asyncio.Task[AlertResult]], Awaitable[AlertResult | None]]
    #: Whether a route takes the alert: only then can another receiver have started a run
    #: of it, worth a look in Prefect when this journal has none.
    routed: Callable[[Alert], bool] = field(default=lambda alert: True)

    async def resolved(self, alert: Alert) -> AlertResult:
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
        if not records and not self.routed(alert):
            record_decision("resolved", alert, "resolved; no run of it waiting to start")
            return AlertResult(**base, outcome="resolved")
        task = self.keep(
            asyncio.get_running_loop().create_task(self._cancel_not_started(alert, records))
        )
        result = await self.wait(task)
        if result is None:
            return AlertResult(
                **base, outcome="resolved", detail="cancelling its runs that have not started"
            )
        return result

    async def _cancel_not_started(self, alert: Alert, records: list[Record]) -> AlertResult:
        try:
            if not records:
                records = await self._created_elsewhere(alert)
            if not records:
                record_decision("resolved", alert, "resolved; no run of it waiting to start")
                return AlertResult(
                    fingerprint=alert.fingerprint, alertname=alert.alertname, outcome="resolved"
                )
            return await self._cancel_each(alert, records)
        except Exception:  # a cancellation must never crash the receiver
            log.exception("alert %s resolved: cancelling its runs failed", alert.fingerprint)
            return AlertResult(
                fingerprint=alert.fingerprint,
                alertname=alert.alertname,
                outcome="resolved",
                detail="its runs could not be checked",
            )

    async def _created_elsewhere(self, alert: Alert) -> list[Record]:
        """The occurrence's runs in Prefect, as records: this journal has none (another
        receiver created them). Only runs created with this occurrence's key and tagged with
        its alert: never a run of another occurrence. A covered run is marked as covered."""
        try:
            found = await self.runs.runs_of_occurrence(
                alert.idempotency_key, alert_tag(alert.fingerprint)
            )
        except PrefectUnavailable as exc:
            log.warning("alert %s resolved: its runs not looked up: %s", alert.fingerprint, exc)
            return []
        records = []
        for run in found:
            handlers = parse_run_tags(run.get("tags")).covered_by
            records.append(
                Record(
                    idempotency_key=alert.idempotency_key,
                    status="created",
                    flow_run_id=str(run["id"]),
                    reason=None,
                    accepted_ts=0.0,
                    covered_by=handlers[-1] if handlers else None,
                )
            )
        return records

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
                self.cancelled.add(record.idempotency_key)
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
        if ran and self.post_incident:
            notes.append(await self._start_post_incident(alert))
        detail = "; ".join([*(f"{c} cancelled" for c in cancelled), *notes])[:500]
        record_decision("resolved", alert, detail or "resolved")
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
                parameters={"params": {"incident": alert_tag(fp), "draft": True}},
                # `incident:<key>` is the tag flows.post_incident.incident_tag gives its runs:
                # retention and the CLI find the record by it. Not `alert:<fp>`: the record
                # is about the incident's runs, not one of them.
                tags=[ALERT_SOURCE, incident_tag(alert_tag(fp))],
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
