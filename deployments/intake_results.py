"""What the receiver answers per alert, and the small helpers the intake records with."""

from __future__ import annotations

import logging
import re
from typing import Literal

from pydantic import BaseModel, Field

from deployments.alertmanager import Alert
from deployments.journal import Entry
from tasks.run_tags import parse_run_tags

log = logging.getLogger("runbooks.receiver")

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


def entry_base(entry: Entry) -> dict[str, str]:
    """fingerprint and alertname of a journal entry (from its tags, set by `_one`)."""
    tags = parse_run_tags(entry.tags)
    return {
        "fingerprint": entry.fingerprint or tags.alert or "",
        "alertname": tags.alertname or "",
    }


_SLUG = re.compile(r"[^a-z0-9]+")


def run_name(alertname: str, fingerprint: str) -> str:
    """`<alertname>-<fingerprint[:12]>`, reduced to [a-z0-9-]: a label is never markup here."""
    slug = _SLUG.sub("-", alertname.lower()).strip("-")[:60] or "alert"
    return f"{slug}-{fingerprint[:12].lower()}"


def short_error(exc: Exception) -> str:
    return str(exc).replace("\n", " ")[:300]


def record_decision(kind: str, alert: Alert, detail: str, deployment: str | None = None) -> None:
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
