"""Scheduled check `pool-threshold`: PostgreSQL connection usage against a warning threshold.

Trigger: every 5 minutes (the schedule is in `deployments/catalog.py`), or by hand. The
on-call runbook's prevention item "Add monitoring alert at 70% threshold", as a check that
leaves a record every run.

May change: nothing by itself. When `start_remediation` is on and usage is over the
threshold, it starts the `db-pool-exhausted` deployment (dry-run unless told otherwise;
acting, it asks for approval unless `remediation.auto_approve`), whose own guards apply,
tagged with this run's own source (and, for an alert, its alert).

Safety limits: read-only; the started run is a separate, audited deployment run.
Undo: nothing to undo.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.client.schemas.objects import FlowRun
from prefect.context import FlowRunContext
from prefect.deployments import run_deployment
from pydantic import BaseModel, Field

from flows.common import Report, publish_on_exit, table, tag_run
from flows.db_pool_exhausted import RUNBOOK as REMEDIATION
from flows.db_pool_exhausted import DbPoolParams
from flows.db_pool_exhausted import target_of as remediation_target
from flows.spec import LockTarget, RunbookSpec, runbook_flow
from tasks.postgres import PoolUsage, measure_pool_usage
from tasks.run_tags import is_alert_identity, runbook_tag, source_tag

RUNBOOK = "pool-threshold"
REMEDIATION_DEPLOYMENT = f"{REMEDIATION}/{REMEDIATION}"


class PoolThresholdParams(BaseModel):
    """Parameters of the scheduled pool-usage check."""

    threshold_percent: float = Field(
        70.0, gt=0, le=100, description="Usage at or above this percent fails the check."
    )
    start_remediation: bool = Field(
        False, description="Over the threshold, start the db-pool-exhausted runbook."
    )
    remediation: DbPoolParams = Field(
        default_factory=DbPoolParams,
        description="Parameters for that runbook (dry run unless switched off there; an"
        " acting run asks for approval unless `auto_approve` is set there).",
    )


def target_of(params: PoolThresholdParams) -> str:
    """Its remediation's target: alerts about one database coalesce into one check."""
    return remediation_target(params.remediation)


def remediation_tags(source: str) -> list[str]:
    """Tags of the db-pool-exhausted run it starts: this run's own source (schedule, ui,
    alert, local) and, for an alert, the alert's tags, so that run checks the alert still
    fires before acting and belongs to the same incident."""
    ctx = FlowRunContext.get()
    own = ctx.flow_run.tags or [] if ctx and ctx.flow_run else []
    alert = [t for t in own if is_alert_identity(t)] if source == "alert" else []
    return [source_tag(source), runbook_tag(REMEDIATION), *alert]


class PoolThresholdExceeded(Exception):
    """The check failed: connection usage is at or above the threshold."""


class PoolCheck(BaseModel):
    """The check's measurement and whether it passed."""

    usage: PoolUsage
    threshold_percent: float
    passed: bool
    remediation_run: str | None = Field(description="Id of the started db-pool-exhausted run.")


SPEC: RunbookSpec[Any] = RunbookSpec(
    name=RUNBOOK,
    title="PostgreSQL pool threshold",
    severity="high",
    topic="database",
    dry_run_field="remediation.dry_run",
    lock=lambda p: LockTarget(target_of(p)),
)


@runbook_flow(SPEC, log_prints=None)
def pool_threshold(params: PoolThresholdParams = PoolThresholdParams()) -> PoolCheck:  # noqa: B008
    """Fail (with an artifact) when connection usage reaches the threshold."""
    logger = get_run_logger()
    source = tag_run(RUNBOOK)
    report = Report(RUNBOOK, "Connection usage")
    line: list[str] = []
    # Written however the run ends, a failed measurement included.
    with publish_on_exit(report, lambda: line[0] if line else f"{RUNBOOK}: no measurement"):
        usage = measure_pool_usage()
        report.title = f"Connection usage on {usage.target}"
        passed = usage.percent_used < params.threshold_percent
        line.append(f"pool usage {usage.percent_used:.1f}% on {usage.target}")
        report.add(
            "Usage",
            f"**{usage.percent_used:.1f}%** ({usage.client_connections}/{usage.max_connections}),"
            f" threshold {params.threshold_percent:g}%: **{'OK' if passed else 'OVER'}**.\n\n"
            + table(["database", "n"], [[c.key, c.count] for c in usage.by_database])
            + "\n\n"
            + table(["role", "n"], [[c.key, c.count] for c in usage.by_user]),
        )
        if not passed and params.start_remediation:
            run: FlowRun = run_deployment(  # type: ignore[assignment]
                REMEDIATION_DEPLOYMENT,
                parameters={"params": params.remediation.model_dump(mode="json")},
                timeout=0,
                tags=remediation_tags(source),
            )
            report.add(
                "Remediation",
                f"Started `{REMEDIATION_DEPLOYMENT}` run `{run.name}` ({run.id}), "
                f"dry run: {params.remediation.dry_run}.",
            )
        if not passed:
            logger.error("%s: usage %.1f%% over threshold", usage.target, usage.percent_used)
            raise PoolThresholdExceeded(
                f"{usage.target}: {usage.percent_used:.1f}% of max_connections in use "
                f"(threshold {params.threshold_percent:g}%)"
            )
        return PoolCheck(
            usage=usage,
            threshold_percent=params.threshold_percent,
            passed=True,
            remediation_run=None,
        )
