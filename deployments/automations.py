"""Prefect Automations this project relies on, declared in code and applied by `make run`.

`crash-zombie-runs`: a flow run whose process died (SIGKILL, OOM, a crashed Runner or warm
process, a lost machine) stays Running for ever: nothing is left to report its end. Prefect's
engine emits a `prefect.flow-run.heartbeat` event every `PREFECT_FLOWS_HEARTBEAT_FREQUENCY`
seconds while a run executes (Runner subprocesses and warm processes alike, paused approval
waits included); this proactive trigger expects, after each heartbeat, another one or a final
state within `within_s`, else sets the run Crashed (Prefect's "detect zombie flows" recipe).

    python -m deployments.automations     # create or update them (PREFECT_API_URL)
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification

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


def declared(zombie_after_s: int) -> list[Automation]:
    """Every automation of the project."""
    return [zombie_runs(zombie_after_s)]


async def aapply(automations: list[Automation]) -> list[Automation]:
    """Create each automation, or update the one of the same name (idempotent)."""
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
    return applied


def apply(automations: list[Automation]) -> list[Automation]:
    """`aapply` from synchronous code (no event loop running)."""
    return asyncio.run(aapply(automations))


def main() -> None:
    from deployments.settings import StackSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    apply(declared(StackSettings().zombie_after_s))


if __name__ == "__main__":
    main()
