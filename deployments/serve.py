"""Serve every runbook of the catalog as a deployment, with its schedule, on this machine.

`python -m deployments.serve` (started by `deployments.cli run`). Schedules are not paused
when this process stops (`pause_on_shutdown=False`): a restart must not silently switch off
the daily certificate scan. At start it creates or updates the project's automations
(`deployments/automations.py`: runs whose process died are marked Crashed).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any
from uuid import UUID

from prefect import serve
from prefect.deployments.runner import RunnerDeployment

from deployments.catalog import Runbook, load_catalog

log = logging.getLogger("runbooks.serve")


def to_deployments(runbooks: tuple[Runbook, ...]) -> list[RunnerDeployment]:
    """One `RunnerDeployment` per runbook, named `<flow-name>/<flow-name>`."""
    deployments = []
    for rb in runbooks:
        flow = rb.load()
        if flow.name != rb.name:
            raise ValueError(f"{rb.entrypoint}: flow is named {flow.name!r}, catalog {rb.name!r}")
        schedule: dict[str, Any] = {}
        if rb.interval_s is not None:
            schedule["interval"] = rb.interval_s
        if rb.cron is not None:
            schedule["cron"] = rb.cron
        deployment = flow.to_deployment(
            name=rb.name,
            description=rb.description,
            tags=list(rb.tags),
            concurrency_limit=rb.concurrency_limit,
            **schedule,
        )
        assert isinstance(deployment, RunnerDeployment)  # sync call: never a coroutine
        deployments.append(deployment)
    return deployments


def apply_automations(
    runbooks: tuple[Runbook, ...] = (), deployments: list[RunnerDeployment] | None = None
) -> None:
    """Create or update the project's automations; a failure is logged, never fatal."""
    from deployments.automations import ESCALATION_PREFIXES, apply, declared
    from deployments.settings import StackSettings

    escalate_id: UUID | None = None
    escalate = next((d for d in deployments or [] if d.name == "escalate"), None)
    try:
        # The escalation automations name the escalate deployment by id: register it first
        # (serve() registers it again, by name: the same deployment).
        applied = escalate.apply() if escalate is not None else None
        assert applied is None or isinstance(applied, UUID)  # sync call: never a coroutine
        escalate_id = applied
    except Exception:
        log.exception("could not register escalate: failed runs are not escalated")
    try:
        prune = ESCALATION_PREFIXES if escalate_id is not None else ()
        apply(declared(StackSettings().zombie_after_s, escalate_id, runbooks), prune)
    except Exception:
        # Serving the runbooks matters more than crash detection: run without it, loudly.
        log.exception("could not apply the automations: runs of dead processes stay Running")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--catalog", default=None, help="module:attr of a runbook catalog")
    parser.add_argument(
        "--prefetch-s",
        type=float,
        default=None,
        help="Runner prefetch; 0 leaves alert runs (scheduled a grace ahead) to the warm pool",
    )
    parser.add_argument("--limit", type=int, default=None, help="max concurrent runs")
    parser.add_argument(
        "--no-automations",
        action="store_true",
        help="leave the automations alone (a joined node: the server's node applies them)",
    )
    args = parser.parse_args(argv)
    # Prefect's logging config owns the root logger (WARNING): let our INFO lines through.
    logging.getLogger("runbooks").setLevel(logging.INFO)
    runbooks = load_catalog(args.catalog)
    deployments = to_deployments(runbooks)
    if not args.no_automations:
        apply_automations(runbooks, deployments)
    runner_kwargs: dict[str, Any] = {}
    if args.prefetch_s is not None:
        runner_kwargs["prefetch_seconds"] = args.prefetch_s
    serve(
        *deployments,
        pause_on_shutdown=False,
        limit=args.limit,
        **runner_kwargs,
    )


if __name__ == "__main__":
    main()
