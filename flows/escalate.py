"""Flow `escalate`: notify the contacts a severity and topic call for, once per incident.

Trigger: a subflow of any runbook (`escalate_incident(...)`), the Prefect UI, or the two
automations of `deployments/automations.py` (a runbook run Failed or Crashed; a run paused
for approval longer than its severity's deadline).

What it may change: nothing in any system; it sends notifications through Prefect
notification blocks (`tasks/notify.py`), each target (contact, block) at most once per
incident key, whatever the retries and reruns. A contact's channels are tried in order: the
next one when a block is down or did not confirm.

Acknowledgement: for a severity with `ack_required` (critical), the run waits for an
`Acknowledgement` input (the UI's Resume form, or `resume_flow_run(id, run_input=...)`) up
to the severity's deadline; without one it pages the next level and waits again, until the
levels run out. A subflow call from a runbook does not wait (`wait_for_ack=False`): the
runbook's own run ends, and the automation's `escalate` run with the same incident key
(the runbook run's id) waits for the acknowledgement and pages nobody twice.

Audit: one artifact per run (every exit path): who was notified, through which block,
when, and the answer; the acknowledgement or the re-escalation. Undo: none (a page cannot
be unsent); PagerDuty incidents are resolved in PagerDuty.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import BaseModel, Field

from flows.common import (
    Report,
    _end_expired_pause,
    md_escape,
    publish_on_exit,
    table,
    tag_run,
)
from tasks.contacts import EscalationConfig, EscalationSettings, Severity, load_config
from tasks.errors import RunbookError
from tasks.notify import Delivery, send_notification

RUNBOOK = "escalate"


class Acknowledgement(RunInput):
    """The form the on-call fills to acknowledge a page (stops the re-escalation)."""

    acknowledged: bool = Field(True, description="Untick to record 'seen, not taken'.")
    by: str = Field(..., min_length=1, max_length=200, description="Your name, for the audit.")
    note: str = Field("", max_length=2000, description="Anything the next responder must know.")


class EscalateParams(BaseModel):
    """Parameters of the escalate flow (the UI's Run form; automations fill them in)."""

    severity: Severity = Field(description="critical, high, medium or low (the seed's table).")
    topic: str = Field(
        "platform",
        min_length=1,
        max_length=64,
        pattern=r"^[a-z0-9][a-z0-9-]*$",
        description="database, security, payments, ...: chooses the topic's contact.",
    )
    incident_key: str = Field(
        min_length=1,
        max_length=200,
        description="One incident: each target is notified once per key (alert fingerprint,"
        " runbook run id).",
    )
    summary: str = Field("", max_length=2000, description="What happened, for the message.")
    wait_for_ack: bool = Field(
        True, description="Wait for an acknowledgement where the severity needs one."
    )


class EscalationOutcome(BaseModel):
    """Who was notified and how the escalation ended."""

    severity: Severity
    incident_key: str
    deliveries: list[Delivery]
    unreached: list[str] = Field(description="Contacts no channel confirmed.")
    acknowledged_by: str | None = None
    levels_paged: int = Field(1, description="1 = the first level only.")
    ended: Literal["notified", "acknowledged", "unacknowledged", "not-waited"]


class EscalationFailed(RunbookError):
    """A contact could not be reached on any of its channels."""


def notify_contact(
    config: EscalationConfig,
    contact: str,
    incident_key: str,
    subject: str,
    body: str,
) -> list[Delivery]:
    """Try the contact's channels in order until one confirms; every attempt is a row."""
    logger = get_run_logger()
    rows: list[Delivery] = []
    for block_ref in config.contacts[contact].channels:
        state = send_notification(
            incident_key, contact, block_ref, subject, body, return_state=True
        )
        if state.is_completed():
            delivery = state.result()
            assert isinstance(delivery, Delivery)
            rows.append(delivery)
            if delivery.confirmed:
                return rows
            continue
        # Failed after its retries (down, refused, not saved): the record says why.
        logger.warning("%s via %s failed; trying the next channel", contact, block_ref)
        rows.append(
            Delivery(
                incident_key=incident_key,
                contact=contact,
                block=block_ref,
                status="failed",
                answer=_failed_answer(incident_key, contact, block_ref),
                at=datetime.now(UTC),
            )
        )
    return rows


def _failed_answer(incident_key: str, contact: str, block_ref: str) -> str:
    from tasks.notify import read_record

    record = read_record(incident_key, contact, block_ref)
    return record.answer if record and record.answer else "failed"


def _subject(params: EscalateParams, level: int) -> str:
    again = f" (re-escalation, level {level})" if level > 1 else ""
    return f"[{params.severity.value.upper()}] {params.topic}: {params.incident_key}{again}"[:250]


def _body(params: EscalateParams, deadline_s: int, action: str) -> str:
    ctx = FlowRunContext.get()
    run = f"escalation run {ctx.flow_run.name} ({ctx.flow_run.id})" if ctx and ctx.flow_run else ""
    return (
        f"{params.summary or 'No summary given.'}\n"
        f"Severity {params.severity.value}: {action}; respond within {deadline_s // 60} min"
        f" ({deadline_s} s). Incident key: {params.incident_key}. {run}"
    ).strip()


def _wait_for_ack(summary: str, timeout_s: int, poll_s: int) -> Acknowledgement | None:
    """Pause until someone acknowledges (UI or API); None when the deadline passed."""
    try:
        return pause_flow_run(
            wait_for_input=Acknowledgement.with_initial_data(description=summary, by=""),
            timeout=timeout_s,
            poll_interval=min(poll_s, max(1, timeout_s // 2)),
        )
    except FlowPauseTimeout:
        # Unanswered is not a failure of this run: it goes on to page the next level.
        _end_expired_pause()
        return None


def _tag_incident(incident_key: str) -> None:
    """Tag the run `incident:<key>`, so an incident's notifications are found by tag."""
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(ctx.flow_run.id).tags or []
        client.update_flow_run(ctx.flow_run.id, tags=sorted({*current, f"incident:{incident_key}"}))


def _deliveries_md(rows: list[Delivery]) -> str:
    return table(
        ["contact", "block", "status", "answer", "when (UTC)", "note"],
        [
            [
                d.contact,
                d.block,
                d.status,
                d.answer,
                d.at.strftime("%Y-%m-%d %H:%M:%S"),
                "already done for this incident: not sent again" if d.repeated else "",
            ]
            for d in rows
        ],
    )


@flow(name=RUNBOOK, log_prints=False)
def escalate(params: EscalateParams) -> EscalationOutcome:
    """Notify the contacts of a severity and topic once per incident; re-page without an ack."""
    logger = get_run_logger()
    tag_run(RUNBOOK)
    _tag_incident(params.incident_key)
    settings = EscalationSettings()
    config = load_config(settings)
    policy = config.severities[params.severity]
    report = Report(RUNBOOK, f"Escalation ({params.severity.value}, {params.topic})")
    deliveries: list[Delivery] = []
    outcome: list[EscalationOutcome] = []

    def summary() -> str:
        ended = outcome[0].ended if outcome else "stopped"
        return f"{RUNBOOK} {params.severity.value}/{params.topic}: {ended}"

    with publish_on_exit(report, summary):
        report.add(
            "Incident",
            f"Key **{md_escape(params.incident_key)}**, severity **{params.severity.value}**"
            f" ({md_escape(policy.action)}; deadline {policy.deadline_s} s), topic"
            f" **{md_escape(params.topic)}**.\n\n{md_escape(params.summary)}",
        )
        try:
            first = config.first_level(params.severity, params.topic)
            subject = _subject(params, 1)
            body = _body(params, policy.deadline_s, policy.action)
            for contact in first:
                deliveries += notify_contact(config, contact, params.incident_key, subject, body)
            ended: Literal["notified", "acknowledged", "unacknowledged", "not-waited"]
            ended = "notified"
            acked_by: str | None = None
            level = 1
            if policy.ack_required:
                ended = "not-waited"
            if policy.ack_required and params.wait_for_ack:
                levels = [None, *policy.next_levels]
                for index, contact_now in enumerate(levels):
                    if contact_now is not None:
                        level = index + 1
                        logger.warning(
                            "no acknowledgement: paging level %d, %s", level, contact_now
                        )
                        report.add(
                            f"Level {level}",
                            f"No acknowledgement within {policy.deadline_s} s: paging"
                            f" **{md_escape(contact_now)}**.",
                        )
                        deliveries += notify_contact(
                            config,
                            contact_now,
                            params.incident_key,
                            _subject(params, level),
                            body,
                        )
                    ack = _wait_for_ack(
                        f"Acknowledge the {params.severity.value} page for"
                        f" {params.incident_key} (level {level})",
                        policy.deadline_s,
                        settings.poll_interval_s,
                    )
                    if ack is not None:
                        acked_by = ack.by
                        ended = "acknowledged" if ack.acknowledged else "unacknowledged"
                        report.add(
                            "Acknowledgement",
                            f"{'acknowledged' if ack.acknowledged else 'seen, NOT taken'} by"
                            f" **{md_escape(ack.by)}** at level {level}"
                            + (f": {md_escape(ack.note)}" if ack.note else "")
                            + ".",
                        )
                        if ack.acknowledged:
                            break
                else:
                    ended = "unacknowledged"
                    report.add(
                        "Not acknowledged",
                        f"Nobody acknowledged after {level} level(s); the escalation path is"
                        " exhausted. Call the people on the contact list.",
                    )
        finally:
            report.add("Notifications", _deliveries_md(deliveries))
        confirmed = {d.contact for d in deliveries if d.confirmed}
        unreached = [c for c in dict.fromkeys(d.contact for d in deliveries) if c not in confirmed]
        result = EscalationOutcome(
            severity=params.severity,
            incident_key=params.incident_key,
            deliveries=deliveries,
            unreached=unreached,
            acknowledged_by=acked_by,
            levels_paged=level,
            ended=ended,
        )
        outcome.append(result)
        if unreached:
            report.add("Unreached", ", ".join(md_escape(c) for c in unreached))
            raise EscalationFailed(
                f"no channel confirmed for: {', '.join(unreached)} (see the run's artifact)"
            )
        return result


def escalate_incident(
    severity: Severity | str,
    topic: str,
    summary: str,
    incident_key: str | None = None,
) -> EscalationOutcome | None:
    """Escalate from inside a runbook, as a subflow that never waits and never raises.

    The incident key defaults to the calling run's id: the Failed/Crashed automation uses the
    same key, so its own `escalate` run (which waits for the acknowledgement) pages nobody
    twice. A failure to notify is logged and in the subflow's artifact; the runbook goes on.
    """
    ctx = FlowRunContext.get()
    key = incident_key or (str(ctx.flow_run.id) if ctx and ctx.flow_run else None)
    if key is None:
        raise ValueError("escalate_incident needs an incident_key outside a flow run")
    params = EscalateParams(
        severity=Severity(severity),
        topic=topic,
        incident_key=key,
        summary=summary[:2000],
        wait_for_ack=False,
    )
    state = escalate(params, return_state=True)
    if state.is_completed():
        result = state.result()
        assert isinstance(result, EscalationOutcome)
        return result
    get_run_logger().error("escalation %s/%s: %s", params.severity.value, topic, state.message)
    return None
