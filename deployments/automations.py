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
the runbook already sent is not sent twice, and the escalate run waits for the ack.

`escalate-paused-<runbook>`: a run of such a runbook that stays Paused (waiting for an
approval) longer than its severity's deadline re-pages: the escalate deployment runs with the
incident key `approval-wait:<run id>`.

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
from prefect.events.actions import ChangeFlowRunState, RunDeployment
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

from deployments.catalog import Runbook
from tasks.contacts import Severity, load_config

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


def _escalate(rb: Runbook, deployment_id: UUID, key: str, summary: str) -> RunDeployment:
    # Jinja in the parameters is rendered by the server from the triggering event's run.
    return RunDeployment(
        source="selected",
        deployment_id=deployment_id,
        parameters={
            "params": {
                "severity": rb.severity,
                "topic": rb.topic,
                "incident_key": key,
                "summary": summary,
                "wait_for_ack": True,
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
                # `string`: a lone expression is rendered through JSON, which has no UUID.
                "{{ flow_run.id | string }}",
                f"{rb.name} run {{{{ flow_run.name }}}} ended {{{{ flow_run.state.name }}}}: "
                "{{ (flow_run.state.message or '') | truncate(1500) }}",
            )
        ],
    )


def escalate_paused(rb: Runbook, deployment_id: UUID, deadline_s: int) -> Automation:
    """A run of `rb` paused (for approval) longer than `deadline_s` re-pages."""
    within = max(deadline_s, MIN_WITHIN_S)
    return Automation(
        name=ESCALATE_PAUSED + rb.name,
        description=f"A {rb.name} run waiting for approval longer than {within} s re-pages "
        f"({rb.severity}, {rb.topic}). Declared in deployments/automations.py.",
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
                "approval-wait:{{ flow_run.id }}",
                f"{rb.name} run {{{{ flow_run.name }}}} has waited for approval longer than "
                f"{within} s",
            )
        ],
    )


def escalations(runbooks: Sequence[Runbook], deployment_id: UUID) -> list[Automation]:
    """The two escalation automations of every runbook that has a severity."""
    config = load_config()
    out: list[Automation] = []
    for rb in runbooks:
        if rb.severity is None:
            continue
        deadline = config.severities[Severity(rb.severity)].deadline_s
        out += [escalate_failed(rb, deployment_id), escalate_paused(rb, deployment_id, deadline)]
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
ESCALATION_PREFIXES = (ESCALATE_FAILED, ESCALATE_PAUSED)


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
