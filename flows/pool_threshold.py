"""Scheduled check `pool-threshold`: PostgreSQL connection usage against a warning threshold.

Trigger: every 5 minutes (the schedule is in `deployments/catalog.py`), or by hand. The
on-call runbook's prevention item "Add monitoring alert at 70% threshold", as a check that
leaves a record every run.

May change: nothing by itself. When `start_remediation` is on and usage is over the
threshold, it starts the `db-pool-exhausted` deployment (dry-run unless told otherwise;
acting, it asks for approval unless `remediation.auto_approve`), whose own guards apply,
tagged with this run's own source (and, for an alert, its alert).

On the driver (`flows/driver.py`): the check is usage against the threshold; the plan is
one action, `start-run` (approval `never`: the run it starts plans, or asks for its own
approval, by itself), when usage is over the threshold and `start_remediation` is on; before
starting it the run measures again (nothing over the threshold any more: `skipped`) and, when
an alert started it, checks the alert still fires. The verification is the same verdict:
over the threshold the run fails (`PoolThresholdExceeded`, outcome `failed`), whether or not
it started a remediation; it pages nobody from inside the run (the failed-run automation
escalates, high/database). Under the threshold: `nothing to do`.

Safety limits: read-only; the started run is a separate, audited deployment run.
Undo: nothing to undo.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import get_run_logger
from prefect.client.schemas.objects import FlowRun
from prefect.context import FlowRunContext
from prefect.deployments import run_deployment
from pydantic import BaseModel, Field

from flows.common import Report, run_source, table
from flows.db_pool_exhausted import SPEC as REMEDIATION_SPEC
from flows.db_pool_exhausted import DbPoolParams
from flows.db_pool_exhausted import target_of as remediation_target
from flows.driver import Held, NotFixed, Runbook, Verification, checks_md, drive
from flows.spec import (
    Action,
    ActionRecord,
    Check,
    LockTarget,
    Outcome,
    RequestParams,
    RunbookSpec,
    Severity,
    Verdict,
    runbook_flow,
)
from tasks.postgres import PoolUsage, measure_pool_usage
from tasks.run_tags import is_alert_identity, runbook_tag, source_tag

RUNBOOK = "pool-threshold"
REMEDIATION = REMEDIATION_SPEC.name
REMEDIATION_DEPLOYMENT = REMEDIATION_SPEC.deployment


class PoolThresholdParams(RequestParams):
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


class PoolThresholdExceeded(NotFixed):
    """The check failed: connection usage is at or above the threshold."""


class PoolCheck(BaseModel):
    """The check's measurement and whether it passed."""

    outcome: Outcome = Field(description="nothing to do, acted (a remediation started), ...")
    usage: PoolUsage
    threshold_percent: float
    passed: bool
    remediation_run: str | None = Field(description="Id of the started db-pool-exhausted run.")


class Measured(BaseModel):
    """One measurement against the threshold."""

    usage: PoolUsage
    passed: bool


SPEC: RunbookSpec[PoolThresholdParams] = RunbookSpec(
    name=RUNBOOK,
    title="PostgreSQL pool threshold",
    severity="high",
    topic="database",
    dry_run_field="remediation.dry_run",
    lock=lambda p: LockTarget(target_of(p)),
)


class StartRemediation(Action):
    """Start a `db-pool-exhausted` deployment run; it plans, or asks, by its own guards."""

    parameters: dict[str, Any]
    dry_run: bool

    def apply(self) -> ActionRecord:
        run: FlowRun = run_deployment(  # type: ignore[assignment]
            REMEDIATION_DEPLOYMENT,
            parameters={"params": self.parameters},
            timeout=0,
            tags=remediation_tags(run_source()),
        )
        return ActionRecord(
            kind=self.kind,
            target=self.target,
            before="-",
            after=str(run.id),
            message=f"started run {run.name}, dry run: {self.dry_run}",
        )


class PoolThreshold(Runbook[PoolThresholdParams, Measured]):
    """Measure usage; over the threshold, maybe start the remediation; the verdict fails it."""

    spec = SPEC
    not_fixed = PoolThresholdExceeded

    def title(self, params: PoolThresholdParams) -> str:
        return "Connection usage"

    def check(self, params: PoolThresholdParams, report: Report) -> Measured:
        usage = measure_pool_usage()
        report.title = f"Connection usage on {usage.target}"
        passed = usage.percent_used < params.threshold_percent
        row = Check(
            item=f"connection usage on {usage.target}",
            threshold=f"< {params.threshold_percent:g}%",
            observed=f"{usage.percent_used:.1f}% "
            f"({usage.client_connections}/{usage.max_connections})",
            verdict=Verdict.PASS if passed else Verdict.FAIL,
        )
        report.add(
            "Usage",
            f"**{usage.percent_used:.1f}%** ({usage.client_connections}/{usage.max_connections}),"
            f" threshold {params.threshold_percent:g}%: **{'OK' if passed else 'OVER'}**.\n\n"
            + checks_md([row])
            + "\n\n"
            + table(["database", "n"], [[c.key, c.count] for c in usage.by_database])
            + "\n\n"
            + table(["role", "n"], [[c.key, c.count] for c in usage.by_user]),
        )
        return Measured(usage=usage, passed=passed)

    def plan(self, params: PoolThresholdParams, findings: Measured) -> list[Action]:
        if findings.passed or not params.start_remediation:
            return []
        dry_run = params.remediation.dry_run
        return [
            StartRemediation(
                kind="start-run",
                target=REMEDIATION_DEPLOYMENT,
                summary=f"start a {REMEDIATION} run (dry run: {dry_run}); its own guards apply",
                # The run it starts plans, or asks for its own approval, by itself.
                approval="never",
                parameters=params.remediation.model_dump(mode="json"),
                dry_run=dry_run,
            )
        ]

    @contextmanager
    def hold(self, params: PoolThresholdParams, report: Report) -> Iterator[Held]:
        # No lock: starting a run changes nothing here; the started run takes the target
        # lock itself (the spec's lock makes alerts about one database coalesce).
        yield Held()

    def verify(
        self,
        params: PoolThresholdParams,
        findings: Measured,
        records: list[ActionRecord],
        report: Report,
    ) -> Verification:
        usage = findings.usage
        if findings.passed:
            return Verification(healthy=True, summary=f"pool usage {usage.percent_used:.1f}%")
        get_run_logger().error("%s: usage %.1f%% over threshold", usage.target, usage.percent_used)
        return Verification(
            healthy=False,
            summary=f"{usage.target}: {usage.percent_used:.1f}% of max_connections in use "
            f"(threshold {params.threshold_percent:g}%)",
        )

    def not_fixed_message(self, params: PoolThresholdParams, verification: Verification) -> str:
        return verification.summary

    def escalation_severity(
        self, params: PoolThresholdParams, verification: Verification
    ) -> Severity | None:
        # A check over its threshold fails; the failed-run automation pages (high, database).
        return None


@runbook_flow(SPEC, log_prints=None)
def pool_threshold(params: PoolThresholdParams = PoolThresholdParams()) -> PoolCheck:  # noqa: B008
    """Fail (with an artifact) when connection usage reaches the threshold."""
    result = drive(PoolThreshold(), params)
    measured = result.fresh or result.findings
    return PoolCheck(
        outcome=result.outcome,
        usage=measured.usage,
        threshold_percent=params.threshold_percent,
        passed=measured.passed,
        remediation_run=result.records[0].after if result.records else None,
    )
