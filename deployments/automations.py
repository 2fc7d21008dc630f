"""Prefect Automations this project relies on, declared in code and applied by `make run`.

`crash-zombie-runs`: a flow run whose process died (SIGKILL, OOM, a crashed Runner or warm
process, a lost machine) stays Running for ever: nothing is left to report its end. Prefect's
engine emits a `prefect.flow-run.heartbeat` event every `PREFECT_FLOWS_HEARTBEAT_FREQUENCY`
seconds while a run executes (Runner subprocesses and warm processes alike, paused approval
waits included); this proactive trigger expects, after each heartbeat, another one or a final
state within `within_s`, else sets the run Crashed (Prefect's "detect zombie flows" recipe).

`escalate-failed-<runbook>`: a run of a runbook with a `severity` in the catalog that ends
Failed or Crashed starts the `escalate` deployment with that severity and topic; the
incident key is the run's id, the key `escalate_incident` uses inside the runbook, so a page
the runbook already sent is not sent twice, a higher severity the runbook raised is kept,
and one escalate run of the incident waits for the ack.

`escalate-paused-<runbook>`: a run of such a runbook that stays Paused (waiting for an
approval) longer than the approval re-page interval (`approval.repage_after_s`, 300 s)
reminds the on-call chain: the escalate deployment runs with the same incident key (the
run's id) and `reason: approval`; it stops at an ack or when the run stops waiting.

`escalate-watch`: an `escalate` run that fails or crashes (its config did not load, no
contact confirmed, killed during its ack wait) pages the last-resort block
(`RUNBOOKS_ESCALATION_LAST_RESORT_BLOCK`) with Prefect's own send-notification action, so
no escalation ends silently. Skipped, loudly, while that block is not saved.

    python -m deployments.automations     # create or update them (PREFECT_API_URL)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import timedelta
from uuid import UUID

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState, RunDeployment, SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

from deployments.catalog import Runbook
from tasks.contacts import EscalationSettings, load_config

log = logging.getLogger("runbooks.automations")

ZOMBIE_AUTOMATION = "crash-zombie-runs"


def zombie_runs(within_s: int) -> Automation:
    """Mark a flow run Crashed when neither a heartbeat nor a final state came in `within_s`."""
    return Automation(
        name=ZOMBIE_AUTOMATION,
        description=(
            "A flow run that stopped sending heartbeats (its process died) is marked Crashed. "
            "Declared in deployments/automations.py; `make run` creates or updates it."
        ),
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[
            # Not forced: orchestration refuses to move a run out of a final state, so a run
            # that ended while its last event was in flight keeps its real outcome.
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"No heartbeat for {within_s} s: the process running it died.",
            )
        ],
    )


ESCALATE_FAILED = "escalate-failed-"
ESCALATE_PAUSED = "escalate-paused-"
ESCALATE_WATCH = "escalate-watch"
#: Prefect's minimum window for a proactive trigger.
MIN_WITHIN_S = 10
_RUN = ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]})
_FINAL_OR_RUNNING = {
    "prefect.flow-run.Running",
    "prefect.flow-run.Completed",
    "prefect.flow-run.Failed",
    "prefect.flow-run.Cancelling",
    "prefect.flow-run.Cancelled",
    "prefect.flow-run.Crashed",
}


def _flow(rb: Runbook) -> ResourceSpecification:
    return ResourceSpecification(
        {"prefect.resource.role": "flow", "prefect.resource.name": rb.name}
    )


#: One runbook run = one incident: every automation names it by the run's id.
#: `string`: a lone expression is rendered through JSON, which has no UUID.
RUN_KEY = "{{ flow_run.id | string }}"


def _escalate(
    rb: Runbook, deployment_id: UUID, summary: str, reason: str = "incident"
) -> RunDeployment:
    # Jinja in the parameters is rendered by the server from the triggering event's run.
    return RunDeployment(
        source="selected",
        deployment_id=deployment_id,
        parameters={
            "params": {
                "severity": rb.severity,
                "topic": rb.topic,
                "incident_key": RUN_KEY,
                "summary": summary,
                "wait_for_ack": True,
                "reason": reason,
            }
        },
    )


def escalate_failed(rb: Runbook, deployment_id: UUID) -> Automation:
    """A run of `rb` that ends Failed or Crashed starts `escalate` with its severity."""
    return Automation(
        name=ESCALATE_FAILED + rb.name,
        description=f"A {rb.name} run that fails or crashes escalates ({rb.severity}, "
        f"{rb.topic}). Declared in deployments/automations.py.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            match=_RUN,
            match_related=_flow(rb),
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[
            _escalate(
                rb,
                deployment_id,
                f"{rb.name} run {{{{ flow_run.name }}}} ended {{{{ flow_run.state.name }}}}: "
                "{{ (flow_run.state.message or '') | truncate(1500) }}",
            )
        ],
    )


def escalate_paused(rb: Runbook, deployment_id: UUID, repage_after_s: int) -> Automation:
    """A run of `rb` paused (for approval) longer than `repage_after_s` reminds the on-call."""
    within = max(repage_after_s, MIN_WITHIN_S)
    return Automation(
        name=ESCALATE_PAUSED + rb.name,
        description=f"A {rb.name} run waiting for approval longer than {within} s reminds "
        f"the on-call chain ({rb.topic}). Declared in deployments/automations.py.",
        trigger=EventTrigger(
            after={"prefect.flow-run.Paused"},
            expect=_FINAL_OR_RUNNING,
            match=_RUN,
            match_related=_flow(rb),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within),
        ),
        actions=[
            _escalate(
                rb,
                deployment_id,
                f"{rb.name} run {{{{ flow_run.name }}}} has waited for approval longer than "
                f"{within} s",
                reason="approval",
            )
        ],
    )


def escalation_watch(block_document_id: UUID, block_ref: str) -> Automation:
    """An `escalate` run that fails or crashes pages the last-resort block (Prefect's action)."""
    return Automation(
        name=ESCALATE_WATCH,
        description=f"An escalate run that fails or crashes pages {block_ref}: no escalation "
        "ends silently. Declared in deployments/automations.py.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            match=_RUN,
            match_related=ResourceSpecification(
                {"prefect.resource.role": "flow", "prefect.resource.name": "escalate"}
            ),
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[
            SendNotification(
                block_document_id=block_document_id,
                subject="ESCALATION FAILED: {{ flow_run.name }} {{ flow_run.state.name }}",
                body=(
                    "An escalation run ended {{ flow_run.state.name }}: its pages may not have"
                    " reached anyone. Incident: {{ flow_run.parameters.params.incident_key }}"
                    " ({{ flow_run.parameters.params.severity }},"
                    " {{ flow_run.parameters.params.topic }}). Run {{ flow_run.id }}:"
                    " {{ (flow_run.state.message or '') | truncate(500) }}"
                ),
            )
        ],
    )


def last_resort_block_id(block_ref: str) -> UUID | None:
    """The id of the saved last-resort block, None when it is not saved."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    slug, name = block_ref.split("/", 1)
    with get_client(sync_client=True) as client:
        try:
            return client.read_block_document_by_name(name, slug, include_secrets=False).id
        except ObjectNotFound:
            return None


def escalations(runbooks: Sequence[Runbook], deployment_id: UUID) -> list[Automation]:
    """The two escalation automations of every runbook that has a severity, and the watch."""
    settings = EscalationSettings()
    config = load_config(settings)
    out: list[Automation] = []
    for rb in runbooks:
        if rb.severity is None:
            continue
        out += [
            escalate_failed(rb, deployment_id),
            escalate_paused(rb, deployment_id, config.approval.repage_after_s),
        ]
    block_id = last_resort_block_id(settings.last_resort_block)
    if block_id is None:
        log.warning(
            "last-resort block %s is not saved: a failed escalation pages nobody"
            " (python -m deployments.blocks --help)",
            settings.last_resort_block,
        )
    else:
        out.append(escalation_watch(block_id, settings.last_resort_block))
    return out


def declared(
    zombie_after_s: int,
    escalate_deployment_id: UUID | None = None,
    runbooks: Sequence[Runbook] = (),
) -> list[Automation]:
    """Every automation of the project (escalations only once `escalate` is deployed)."""
    out = [zombie_runs(zombie_after_s)]
    if escalate_deployment_id is not None:
        out += escalations(runbooks, escalate_deployment_id)
    return out


async def aprune(keep: list[Automation], prefixes: tuple[str, ...]) -> list[str]:
    """Delete automations named with one of `prefixes` that `keep` no longer declares."""
    from prefect.client.orchestration import get_client

    wanted = {a.name for a in keep}
    deleted = []
    async with get_client() as client:
        for found in await client.read_automations():
            if found.name.startswith(prefixes) and found.name not in wanted:
                await client.delete_automation(found.id)
                log.info("automation %r deleted (its runbook lost its severity)", found.name)
                deleted.append(found.name)
    return deleted


async def aapply(
    automations: list[Automation], prune_prefixes: tuple[str, ...] = ()
) -> list[Automation]:
    """Create each automation, or update the one of the same name (idempotent); then
    delete those named with `prune_prefixes` that are no longer declared."""
    applied = []
    for wanted in automations:
        try:
            existing = await Automation.aread(name=wanted.name)
        except ValueError:  # Prefect's "not found"
            created = await wanted.acreate()
            log.info("automation %r created (%s)", wanted.name, created.id)
            applied.append(created)
            continue
        wanted.id = existing.id
        await wanted.aupdate()
        log.info("automation %r updated (%s)", wanted.name, wanted.id)
        applied.append(wanted)
    if prune_prefixes:
        await aprune(automations, prune_prefixes)
    return applied


def apply(automations: list[Automation], prune_prefixes: tuple[str, ...] = ()) -> list[Automation]:
    """`aapply` from synchronous code (no event loop running)."""
    return asyncio.run(aapply(automations, prune_prefixes))


#: What `make run` prunes once escalate is deployed: a runbook that lost its severity (or
#: left the catalog) stops escalating.
ESCALATION_PREFIXES = (ESCALATE_FAILED, ESCALATE_PAUSED, ESCALATE_WATCH)


async def _escalate_deployment_id() -> UUID | None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            return (await client.read_deployment_by_name("escalate/escalate")).id
        except ObjectNotFound:
            return None


def main() -> None:
    from deployments.catalog import RUNBOOKS
    from deployments.settings import StackSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    escalate_id = asyncio.run(_escalate_deployment_id())
    if escalate_id is None:
        log.warning("deployment escalate/escalate not found: escalation automations skipped")
    prune = ESCALATION_PREFIXES if escalate_id is not None else ()
    apply(declared(StackSettings().zombie_after_s, escalate_id, RUNBOOKS), prune)


if __name__ == "__main__":
    main()
