"""Runbook `high-error-rate`: the on-call runbook's "High Error Rate" (5xx) runbook.

Trigger: alert `HighErrorRate` (> 5 % of /api answered 5xx over 1 min; route `mode: approve`:
the alert's own run plans, pauses for an approval in the UI, then re-measures and acts), or
by hand from the Prefect UI.

Check (all at once, a source that fails is a row "unavailable", never a crash): the backend
Deployment's log tail (5xx / error lines, those naming the database or the cache), backend
health, pod restarts and OOMKilled, Prometheus' 5xx ratio by route and when it began,
PostgreSQL activity and pool usage, Redis (memory vs maxmemory, evictions, hit rate), and
the rollout history (when the current revision rolled out, whether a previous one exists).
The parts: `flows/error_rate/` (params, evidence, actions, plan, verify).

Classify with evidence (more than one may hold): A database, B memory, C cache, D code
(the 5xx began within `rollout_window_minutes` after the current revision became current,
dated by `tasks.kubernetes.revisions.became_current`, not by its ReplicaSet's creation). D
is never claimed, and no rollback planned, when the previous revision is the one the
current revision rolled back from (an undo): that would roll forward onto it.

May change, one action per scenario that holds:
- D: `kubectl rollout undo` of the backend Deployment to the revision pinned when planned
  (at most one undo per run), then waits for the rollout and verifies with Prometheus;
- B: `kubectl rollout restart` of the backend Deployment (skipped when D rolls it back);
- C: the guarded cache clear (SCAN + UNLINK of `RUNBOOKS_REDIS_CACHE_KEY_PATTERN`, never
  FLUSHALL);
- A: a `kubectl rollout restart` of the database StatefulSet (`database_statefulset`).

Safety limits (the driver's sequence, `flows.driver`): dry run by default (every action is
planned, Kubernetes writes are sent as server-side dry runs, nothing changes); otherwise an
approval in the UI, which `auto_approve` skips for B, C and D (`unless-auto`) but never for
A (`always`). Whoever approved, the evidence is measured again and the plan made again under
the target lock and the remediation lock; only actions both approved and still justified
are taken (none when the 5xx ratio fell below the threshold while the run waited), and a
rollback only to the approved revision. The target lock is held through the verification.
A database restart (A) ends the advisory lock's session: expected, released quietly, then
verified. The cooldown between runs is the alert route's.

Verify: after any action, Prometheus' 5xx ratio must fall below `error_rate_max` within
`verify_timeout_s` (`verify_recovery`); otherwise the run pages critical (topic platform)
and fails with `ErrorRateNotRecovered`.

Undo: the artifact records every previous value before the write that replaces it: the
revision and images before the rollback (undo = roll forward to that revision), the
previous `restartedAt` annotations; a cleared cache refills from the database.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime

from prefect import get_run_logger
from pydantic import BaseModel, Field, SerializeAsAny

from flows.common import Report, failure_text, md_escape
from flows.driver import Held, NotFixed, Runbook, RunResult, Stop, Verification, checks_md, drive
from flows.error_rate.actions import (
    NOT_BACK,
    CacheClearAction,
    DatabaseRestartAction,
    ErrorRateAction,
    RestartAction,
    RollbackAction,
)
from flows.error_rate.evidence import (
    Findings,
    Probe,
    ScenarioVerdict,
    classify,
    count_log_errors,
    error_onset,
    evidence_checks,
    gather,
    scenarios_md,
)
from flows.error_rate.params import RUNBOOK, SCENARIO_NAMES, HighErrorRateParams, Scenario, pct
from flows.error_rate.plan import make_plan
from flows.error_rate.verify import VerifyResult, errors_ended, verify_recovery
from flows.spec import Action, ActionRecord, Check, LockTarget, Outcome, RunbookSpec, runbook_flow
from tasks.errors import TransientError
from tasks.locks import kube_lock_target
from tasks.postgres import AdvisoryLock, remediation_lock
from tasks.settings import KubernetesSettings

__all__ = [
    "NOT_BACK",
    "RUNBOOK",
    "SCENARIO_NAMES",
    "SPEC",
    "CacheClearAction",
    "DatabaseRestartAction",
    "ErrorRateAction",
    "ErrorRateNotRecovered",
    "Findings",
    "HighErrorRate",
    "HighErrorRateOutcome",
    "HighErrorRateParams",
    "Probe",
    "RestartAction",
    "RollbackAction",
    "Scenario",
    "ScenarioVerdict",
    "VerifyResult",
    "classify",
    "count_log_errors",
    "error_onset",
    "errors_ended",
    "evidence_checks",
    "gather",
    "high_error_rate",
    "make_plan",
    "target_of",
    "verify_recovery",
]


def target_of(params: HighErrorRateParams) -> str:
    """What the runbook changes: the backend Deployment, `k8s:<namespace>/<deployment>`."""
    k8s = KubernetesSettings()
    return kube_lock_target(k8s.namespace, k8s.backend_deployment).key


SPEC: RunbookSpec[HighErrorRateParams] = RunbookSpec(
    name=RUNBOOK,
    title="High error rate (5xx)",
    severity="critical",
    topic="platform",
    lock=lambda p: LockTarget(target_of(p)),
    lock_timeout_s=600.0,
)


class ErrorRateNotRecovered(NotFixed):
    """Verification failed: the 5xx ratio is still above the threshold; escalated."""


class HighErrorRateOutcome(BaseModel):
    """What the run found and did."""

    outcome: Outcome
    note: str
    checks: list[Check]
    scenarios: list[ScenarioVerdict]
    plan: list[SerializeAsAny[ErrorRateAction]]
    actions: list[ActionRecord] = Field(default_factory=list)
    approval: str | None = None
    error_rate_before: float | None = None
    error_rate_after: float | None = None
    verify: VerifyResult | None = None


def _advisory(held: Held) -> AdvisoryLock | None:
    found = held.extra.get("database")
    return found if isinstance(found, AdvisoryLock) else None


class HighErrorRate(Runbook[HighErrorRateParams, Findings]):
    """Evidence at once, scenarios A-D, one action per scenario, verified by Prometheus."""

    spec = SPEC
    not_fixed = ErrorRateNotRecovered

    def check(self, params: HighErrorRateParams, report: Report) -> Findings:
        return self._measure(params, report, "")

    def remeasure(self, params: HighErrorRateParams, report: Report) -> Findings:
        return self._measure(params, report, " (re-measured under the lock)")

    def _measure(self, params: HighErrorRateParams, report: Report, when: str) -> Findings:
        found = classify(params, gather(params), datetime.now(UTC))
        report.add("Evidence" + when, checks_md(found.checks))
        report.add("Scenarios" + when, scenarios_md(found.scenarios))
        get_run_logger().info(
            "5xx ratio %s; scenarios: %s",
            pct(found.error_rate),
            [s.scenario for s in found.scenarios] or "none",
        )
        return found

    def plan(self, params: HighErrorRateParams, findings: Findings) -> list[Action]:
        return list(make_plan(params, findings.scenarios, findings.withheld))

    def still_valid(
        self,
        params: HighErrorRateParams,
        approved: list[Action],
        fresh: list[Action],
        findings: Findings,
        now: Findings,
    ) -> list[Action] | Stop:
        """Nothing when the errors ended while the run waited; else what was approved and
        still holds (a rollback only to the approved revision: `RollbackAction.same_as`)."""
        recent = errors_ended(params, findings.error_rate)
        if recent is not None:
            return Stop(
                "skipped",
                f"the 5xx ratio is now {pct(recent)} over {params.verify_window} (it was "
                f"{pct(findings.error_rate)} when planned), under {params.error_rate_max:.0%}: "
                "the errors ended while this run waited, another run's remediation or their "
                "own end; nothing changed.",
            )
        return super().still_valid(params, approved, fresh, findings, now)

    @contextmanager
    def hold(self, params: HighErrorRateParams, report: Report) -> Iterator[Held]:
        """The backend's target lock, then the PostgreSQL advisory lock the other runbooks
        take. With PostgreSQL itself unreachable (scenario A) the advisory lock cannot be
        taken: the run says so and relies on the target lock, rather than never being able
        to restart a dead database. Another run holding it refuses (SafetyViolation)."""
        with super().hold(params, report) as held, ExitStack() as stack:
            try:
                held.extra["database"] = stack.enter_context(remediation_lock(RUNBOOK))
            except TransientError as exc:
                report.add(
                    "Remediation lock",
                    f"not taken, PostgreSQL unreachable ({failure_text(exc)}); relying on "
                    "the target lock.",
                )
            yield held

    def act(
        self,
        params: HighErrorRateParams,
        actions: list[Action],
        report: Report,
        held: Held,
    ) -> list[ActionRecord]:
        """Each action in order (undo recorded first); a database restart first says the
        advisory lock's session will end with it. The lock is released before verifying."""
        lock = _advisory(held)
        records: list[ActionRecord] = []
        for action in actions:
            if isinstance(action, DatabaseRestartAction) and lock is not None:
                # The advisory lock's session lives on this database: the restart ends it.
                sts = action.database.statefulset
                lock.expect_loss(f"this run's restart of statefulset/{sts}")
            records += super().act(params, [action], report, held)
        ended = lock.release() if lock is not None else "released"
        if ended != "released":
            report.add("Remediation lock", md_escape(ended))
        return records

    def verify(
        self,
        params: HighErrorRateParams,
        findings: Findings,
        records: list[ActionRecord],
        report: Report,
    ) -> Verification | None:
        if not records:
            return None  # nothing was done: nothing to verify (as before the driver)
        result = verify_recovery(params, findings.error_rate)
        report.add(
            "Verify",
            f"5xx ratio before **{pct(findings.error_rate)}** -> after **{pct(result.after)}** "
            f"({result.window} window, threshold {result.threshold:.0%}): "
            + ("**recovered**" if result.recovered else "**NOT recovered: escalate**")
            + f". {md_escape(result.reason)}",
        )
        return result

    def not_fixed_message(self, params: HighErrorRateParams, verification: Verification) -> str:
        return (
            f"5xx ratio not below {params.error_rate_max:.0%} after remediation "
            f"({verification.summary}); escalated to the on-call (see the run's artifact)"
        )


def outcome_of(result: RunResult[Findings]) -> HighErrorRateOutcome:
    """The flow's return value from the driver's result."""
    found = result.findings
    verify = result.verification if isinstance(result.verification, VerifyResult) else None
    return HighErrorRateOutcome(
        outcome=result.outcome,
        note=result.note,
        checks=found.checks,
        scenarios=found.scenarios,
        plan=[a for a in result.plan if isinstance(a, ErrorRateAction)],
        actions=result.records,
        approval=result.approval_line,
        error_rate_before=found.error_rate,
        error_rate_after=verify.after if verify else None,
        verify=verify,
    )


@runbook_flow(SPEC)
def high_error_rate(params: HighErrorRateParams = HighErrorRateParams()) -> HighErrorRateOutcome:  # noqa: B008
    """Gather evidence, classify the 5xx (A-D), plan, approve, remediate and verify."""
    return outcome_of(drive(HighErrorRate(), params))
