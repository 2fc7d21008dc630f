"""Flow `escalate`: one incident, one chain of pages.

Trigger: a subflow of any runbook (`escalate_incident(...)`), the Prefect UI, or the
automations of `deployments/automations.py` (a runbook run Failed or Crashed; a run paused
for approval longer than the reminder interval, `reason: approval`).

What it may change: nothing in any system; it sends notifications through Prefect
notification blocks (`tasks/notify.py`), each target (contact, block) at most once per
incident key and stage (severity and level), whatever the retries and reruns. A contact's
channels are tried in order: the next one when a block is down or did not confirm.

One chain (`tasks/incidents.py`): every run of an incident key pages at the highest severity
any run of it raised; one run waits for the acknowledgement (others end `joined`); a higher
severity pages its first level and takes the wait over; an ack is passed to the incident's
other paused runs, and no run re-pages after it. Approval reminders page the on-call chain
only, and stop when the runbook run stops waiting.

Follow-ups (`escalate_update(reason, ...)`, `reason: update`): news on an incident already
paged (the RTO at risk, the gateway down, a reconciliation anomaly) pages the first level of
the incident's severity once per reason (stage `update:<reason>`) and waits for nothing; a
second page at the incident's own stage would be deduplicated away and reach nobody.

Acknowledgement: for a severity with `ack_required` (critical), the waiting run pauses for
an `Acknowledgement` input (the UI's Resume form, or `resume_flow_run(id, run_input=...)`)
up to the severity's deadline; without one it pages the next level and waits again, until
the levels run out. A subflow call from a runbook does not wait (`wait_for_ack=False`): it
starts a deployed `escalate` run with the same incident key (the runbook run's id) that
waits, or the failure automation's run does.

Audit: one artifact per run (every exit path): who was notified, through which block,
when, and the answer; the severity; the acknowledgement, the re-escalation, what stopped
it. Undo: none (a page cannot be unsent); PagerDuty alerts are resolved in PagerDuty (one
per incident and service: `dedup_key` = the incident key).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import State, StateType
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout, ObjectNotFound
from prefect.flow_runs import pause_flow_run, resume_flow_run
from prefect.input import RunInput
from pydantic import BaseModel, Field

from flows.common import (
    Report,
    _end_expired_pause,
    md_escape,
    publish_on_exit,
    run_link,
    table,
    tag_run,
)
from flows.spec import RunbookSpec, runbook_flow
from tasks.approvals.message import ApprovalMessage
from tasks.contacts import EscalationConfig, EscalationSettings, Severity, highest, load_config
from tasks.errors import RunbookError
from tasks.incidents import (
    AckRecord,
    claim_waiter,
    current_severity,
    raise_severity,
    read_ack,
    record_ack,
)
from tasks.notify import Delivery, send_notification
from tasks.run_tags import incident_tag, runbook_tag

RUNBOOK = "escalate"


class Acknowledgement(RunInput):
    """The form the on-call fills to acknowledge a page (stops the re-escalation)."""

    acknowledged: bool = Field(True, description="Untick to record 'seen, not taken'.")
    by: str = Field(..., min_length=1, max_length=200, description="Your name, for the audit.")
    note: str = Field("", max_length=2000, description="Anything the next responder must know.")


class EscalateParams(BaseModel):
    """Parameters of the escalate flow (the UI's Run form; automations fill them in)."""

    severity: Severity = Field(
        description="critical, high, medium or low (the on-call runbook's table)."
    )
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
    reason: Literal["incident", "approval", "update"] = Field(
        "incident",
        description="incident: page the severity's contacts; approval: remind the on-call"
        " chain while the run `incident_key` waits for an approval (never leadership);"
        " update: a follow-up on an incident already paged, once per `update` reason.",
    )
    update: str = Field(
        "",
        max_length=64,
        pattern=r"^([a-z0-9][a-z0-9-]*)?$",
        description="reason update: what the follow-up is about (rto-at-risk, gateway-down,"
        " ...); each one pages the incident's first level once.",
    )


Ended = Literal[
    "notified",
    "acknowledged",
    "unacknowledged",
    "not-waited",
    "joined",
    "superseded",
    "approval-ended",
]


class EscalationOutcome(BaseModel):
    """Who was notified and how the escalation ended."""

    severity: Severity
    incident_key: str
    deliveries: list[Delivery]
    unreached: list[str] = Field(description="Contacts no channel confirmed.")
    acknowledged_by: str | None = None
    levels_paged: int = Field(1, description="1 = the first level only.")
    ended: Ended = Field(
        description="notified, acknowledged, unacknowledged, not-waited (a runbook's own call),"
        " joined (another run waits for the ack), superseded (a higher severity took over),"
        " approval-ended (the runbook run stopped waiting)."
    )


class EscalationFailed(RunbookError):
    """A contact could not be reached on any of its channels."""


def notify_contact(
    config: EscalationConfig,
    contact: str,
    incident_key: str,
    subject: str,
    body: str,
    stage: str = "",
    approval: ApprovalMessage | None = None,
) -> list[Delivery]:
    """Try the contact's channels in order until one confirms; every attempt is a row."""
    logger = get_run_logger()
    rows: list[Delivery] = []
    for block_ref in config.contacts[contact].channels:
        state = send_notification(
            incident_key, contact, block_ref, subject, body, stage, approval, return_state=True
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
                stage=stage,
                contact=contact,
                block=block_ref,
                status="failed",
                answer=_failed_answer(incident_key, contact, block_ref, stage),
                at=datetime.now(UTC),
            )
        )
    return rows


def _failed_answer(incident_key: str, contact: str, block_ref: str, stage: str) -> str:
    from tasks.notify import read_record

    record = read_record(incident_key, contact, block_ref, stage)
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
        client.update_flow_run(ctx.flow_run.id, tags=sorted({*current, incident_tag(incident_key)}))


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


def _run_id() -> str:
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else ""


def _propagate_ack(incident_key: str, ack: Acknowledgement) -> list[str]:
    """Resume the incident's other paused escalate runs with the same ack: one ack, one stop."""
    me = _run_id()
    resumed: list[str] = []
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[incident_tag(incident_key), runbook_tag(RUNBOOK)]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])),
            )
        )
    for other in runs:
        if str(other.id) == me:
            continue
        try:
            resume_flow_run(other.id, run_input=ack.model_dump(mode="json"))
            resumed.append(str(other.id))
        except Exception as exc:  # noqa: BLE001 - it may have ended meanwhile; its own check stops it
            get_run_logger().info("could not pass the ack to %s (%s)", other.id, type(exc).__name__)
    return resumed


def _watched_run_waits(run_id: UUID | None) -> bool:
    """True while the runbook run whose approval is awaited is still Paused."""
    if run_id is None:
        return True
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(run_id)
        except ObjectNotFound:
            return False
    return run.state is not None and run.state.is_paused()


def _as_uuid(text: str) -> UUID | None:
    try:
        return UUID(text)
    except ValueError:
        return None


class _Chain:
    """The pages and waits of one escalate run, and what stopped them."""

    def __init__(
        self, params: EscalateParams, config: EscalationConfig, report: Report, poll_s: int
    ) -> None:
        self.params, self.config, self.report, self.poll_s = params, config, report, poll_s
        self.deliveries: list[Delivery] = []
        self.level = 1
        self.acked_by: str | None = None

    def page(self, contacts: list[str], stage: str, subject: str, body: str) -> None:
        for contact in contacts:
            self.deliveries += notify_contact(
                self.config, contact, self.params.incident_key, subject, body, stage
            )

    def wait(
        self,
        stage: str,
        next_levels: list[str],
        deadline_s: int,
        body: str,
        stop: Callable[[], Ended | None],
        subject: Callable[[int], str],
    ) -> Ended:
        """Wait for an ack; page each next level after a deadline without one; `stop` ends it."""
        logger = get_run_logger()
        key = self.params.incident_key
        for index, contact_now in enumerate([None, *next_levels]):
            if contact_now is not None:
                if (why := stop()) is not None:
                    return self.stopped(why)
                self.level = index + 1
                logger.warning("no acknowledgement: paging level %d, %s", self.level, contact_now)
                self.report.add(
                    f"Level {self.level}",
                    f"No acknowledgement within {deadline_s} s: paging"
                    f" **{md_escape(contact_now)}**.",
                )
                self.page([contact_now], f"{stage}:level{self.level}", subject(self.level), body)
            ack = _wait_for_ack(
                f"Acknowledge the {stage} page for {key} (level {self.level})",
                deadline_s,
                self.poll_s,
            )
            if ack is None:
                continue
            self.acked_by = ack.by
            self.report.add(
                "Acknowledgement",
                f"{'acknowledged' if ack.acknowledged else 'seen, NOT taken'} by"
                f" **{md_escape(ack.by)}** at level {self.level}"
                + (f": {md_escape(ack.note)}" if ack.note else "")
                + ".",
            )
            if ack.acknowledged:
                record_ack(
                    key, AckRecord(by=ack.by, note=ack.note, at=datetime.now(UTC), run_id=_run_id())
                )
                resumed = _propagate_ack(key, ack)
                if resumed:
                    self.report.add(
                        "Same incident", f"The ack also stopped run(s) {', '.join(resumed)}."
                    )
                return "acknowledged"
        if (why := stop()) is not None:
            return self.stopped(why)
        self.report.add(
            "Not acknowledged",
            f"Nobody acknowledged after {self.level} level(s); the escalation path is"
            " exhausted. Call the people on the contact list.",
        )
        return "unacknowledged"

    def stopped(self, why: Ended) -> Ended:
        texts = {
            "acknowledged": "acknowledged on another run of this incident: no more pages",
            "superseded": "the incident was raised to a higher severity: its chain pages now",
            "approval-ended": "the runbook run no longer waits for its approval: no more pages",
        }
        if why == "acknowledged":
            ack = read_ack(self.params.incident_key)
            self.acked_by = ack.by if ack else None
        self.report.add("Stopped", texts.get(why, why))
        return why


def _incident(chain: _Chain) -> Ended:
    """Page the incident's severity (the highest raised so far) and own its ack wait."""
    params, config, report = chain.params, chain.config, chain.report
    key, me = params.incident_key, _run_id()
    severity = raise_severity(key, params.severity, me or None)
    if severity != params.severity:
        report.add(
            "Severity",
            f"Asked for {params.severity.value}; the incident is already"
            f" **{severity.value}** (the highest raised): paged as {severity.value}.",
        )
    params = params.model_copy(update={"severity": severity})
    chain.params = params
    policy = config.severities[severity]
    body = _body(params, policy.deadline_s, policy.action)
    chain.page(
        config.first_level(severity, params.topic), severity.value, _subject(params, 1), body
    )
    if not policy.ack_required:
        return "notified"
    if not params.wait_for_ack:
        return "not-waited"
    if read_ack(key) is not None:
        return chain.stopped("acknowledged")
    holder = claim_waiter(key, severity.value, me)
    if holder is not None:
        report.add("Joined", f"Run {holder} waits for the ack of this incident: not waited twice.")
        return "joined"

    def stop() -> Ended | None:
        if read_ack(key) is not None:
            return "acknowledged"
        now = current_severity(key) or severity
        if now != severity and config.severities[now].ack_required:
            return "superseded"
        return None

    return chain.wait(
        severity.value,
        policy.next_levels,
        policy.deadline_s,
        body,
        stop,
        lambda level: _subject(params, level),
    )


def _approval(chain: _Chain) -> Ended:
    """Re-page the on-call chain while the runbook run still waits for its approval."""
    params, config = chain.params, chain.config
    key, policy = params.incident_key, config.approval
    watched = _as_uuid(key)

    def stop() -> Ended | None:
        if read_ack(key) is not None:
            return "acknowledged"
        if not _watched_run_waits(watched):
            return "approval-ended"
        return None

    if (why := stop()) is not None:
        return chain.stopped(why)
    # The incident key of an approval wait is the paused run's id: link straight to it.
    where = run_link(watched) if watched else f"(run {key})"
    body = (
        f"{params.summary or 'A runbook run waits for an approval.'}\n"
        f"Its allowed approvers got their own Approve and Refuse links; the run: {where}."
        f" Acknowledge this page to stop the reminders. Next reminder in"
        f" {policy.repage_after_s} s."
    )

    def subject(level: int) -> str:
        again = f" (reminder, level {level})" if level > 1 else ""
        return f"[APPROVAL {params.severity.value.upper()}] {params.topic}: {key}{again}"[:250]

    chain.page(list(dict.fromkeys(policy.notify)), "approval", subject(1), body)
    if claim_waiter(key, "approval", _run_id()) is not None:
        return "joined"
    return chain.wait("approval", policy.next_levels, policy.repage_after_s, body, stop, subject)


def _update(chain: _Chain) -> Ended:
    """A follow-up on an incident: the first level of its severity (the highest raised so
    far, or this one), once per reason (stage `update:<reason>`), never waiting for an ack.

    The incident's first page (stage `critical`) already reached these contacts, and a
    second one at that stage would reach nobody; a new reason is news, so it has a stage
    of its own, deduplicated like every page (retries and re-runs send it once).
    """
    params, config = chain.params, chain.config
    if not params.update:
        raise ValueError("an update names its reason (`update`)")
    raised = current_severity(params.incident_key)
    severity = highest(params.severity, raised) if raised else params.severity
    policy = config.severities[severity]
    subject = (
        f"[{severity.value.upper()} UPDATE] {params.topic}: {params.update}: {params.incident_key}"
    )[:250]
    body = (
        f"{params.summary or 'No summary given.'}\nUpdate ({params.update}) on incident"
        f" {params.incident_key}, severity {severity.value}: {policy.action}."
    )
    chain.page(config.first_level(severity, params.topic), f"update:{params.update}", subject, body)
    return "notified"


SPEC: RunbookSpec[Any] = RunbookSpec(
    name=RUNBOOK,
    title="Escalation",
    severity=None,
    dry_run_field=None,
)


@runbook_flow(SPEC)
def escalate(params: EscalateParams) -> EscalationOutcome:
    """Notify the contacts of an incident's severity once; re-page until acknowledged."""
    tag_run(RUNBOOK)
    _tag_incident(params.incident_key)
    settings = EscalationSettings()
    config = load_config(settings)
    kind = {"approval": "approval wait", "update": f"update {params.update}"}.get(
        params.reason, params.severity.value
    )
    report = Report(RUNBOOK, f"Escalation ({kind}, {params.topic})")
    chain = _Chain(params, config, report, settings.poll_interval_s)
    outcome: list[EscalationOutcome] = []

    def summary() -> str:
        ended = outcome[0].ended if outcome else "stopped"
        return f"{RUNBOOK} {kind}/{params.topic}: {ended}"

    with publish_on_exit(report, summary):
        policy = config.severities[params.severity]
        report.add(
            "Incident",
            f"Key **{md_escape(params.incident_key)}**, severity **{params.severity.value}**"
            f" ({md_escape(policy.action)}; deadline {policy.deadline_s} s), topic"
            f" **{md_escape(params.topic)}**, reason **{params.reason}**."
            f"\n\n{md_escape(params.summary)}",
        )
        try:
            flows = {"approval": _approval, "update": _update, "incident": _incident}
            ended = flows[params.reason](chain)
        finally:
            report.add("Notifications", _deliveries_md(chain.deliveries))
        deliveries = chain.deliveries
        confirmed = {d.contact for d in deliveries if d.confirmed}
        unreached = [c for c in dict.fromkeys(d.contact for d in deliveries) if c not in confirmed]
        result = EscalationOutcome(
            severity=chain.params.severity,
            incident_key=params.incident_key,
            deliveries=deliveries,
            unreached=unreached,
            acknowledged_by=chain.acked_by,
            levels_paged=chain.level,
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
    same key, so its own `escalate` run pages nobody twice. Where the severity needs an ack,
    a deployed `escalate` run is started to wait for it (`_start_ack_waiter`), whoever ends
    the runbook how. A failure to notify is logged and in the subflow's artifact; the
    runbook goes on.
    """
    params = EscalateParams(
        severity=Severity(severity),
        topic=topic,
        incident_key=_incident_key(incident_key, "escalate_incident"),
        summary=summary[:2000],
        wait_for_ack=False,
    )
    state = escalate(params, return_state=True)
    _start_ack_waiter(params)
    return _outcome_of(state, f"escalation {params.severity.value}/{topic}")


def escalate_update(
    reason: str,
    topic: str,
    summary: str,
    severity: Severity | str = Severity.CRITICAL,
    incident_key: str | None = None,
) -> EscalationOutcome | None:
    """A follow-up on this run's incident (the one `escalate_incident` paged): the first level
    of its severity hears about `reason` (`rto-at-risk`, `gateway-down`, ...) once, whatever
    the retries and re-runs; a new reason pages again. A subflow that never waits or raises.
    """
    params = EscalateParams(
        severity=Severity(severity),
        topic=topic,
        incident_key=_incident_key(incident_key, "escalate_update"),
        summary=summary[:2000],
        wait_for_ack=False,
        reason="update",
        update=reason,
    )
    return _outcome_of(escalate(params, return_state=True), f"escalation update {reason}/{topic}")


def _incident_key(given: str | None, caller: str) -> str:
    """The incident: the key given, else the calling run's id."""
    ctx = FlowRunContext.get()
    key = given or (str(ctx.flow_run.id) if ctx and ctx.flow_run else None)
    if key is None:
        raise ValueError(f"{caller} needs an incident_key outside a flow run")
    return key


def _outcome_of(state: State[Any], what: str) -> EscalationOutcome | None:
    """The escalate subflow's outcome; a failed one is logged, never raised."""
    if state.is_completed():
        result = state.result()
        assert isinstance(result, EscalationOutcome)
        return result
    get_run_logger().error("%s: %s", what, state.message)
    return None


def _start_ack_waiter(params: EscalateParams) -> str | None:
    """For a severity that needs an ack, start a deployed `escalate` run that waits for it.

    The runbook's own call never waits; this run (same incident key, `wait_for_ack`) pages
    nobody twice and re-pages per the policy, even when the runbook then ends Completed. If
    the failure automation's run came first, one of the two ends `joined`. Not deployed
    (tests, a script): the failure automation's run waits instead. Its id, or None.
    """
    logger = get_run_logger()
    try:
        if not load_config().severities[params.severity].ack_required:
            return None
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(SPEC.deployment)
            waiter_run = client.create_flow_run_from_deployment(
                deployment.id,
                parameters={
                    "params": params.model_copy(update={"wait_for_ack": True}).model_dump(
                        mode="json"
                    )
                },
                # A retried or rerun runbook starts one waiter per incident and severity.
                idempotency_key=f"escalate-waiter:{params.incident_key}:{params.severity.value}",
            )
    except ObjectNotFound:
        logger.info("escalate is not deployed: the failure automation's run waits for the ack")
        return None
    except Exception as exc:  # noqa: BLE001 - never fail the runbook for its escalation
        logger.error("could not start the ack waiter (%s)", type(exc).__name__)
        return None
    logger.info("escalation ack waiter: run %s", waiter_run.id)
    return str(waiter_run.id)
