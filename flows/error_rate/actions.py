"""The actions of `high-error-rate`, one typed object per scenario, each pinned by a read.

Each one sends its write as a server-side dry run (`try_dry_run`), records what it replaces
before the write (`undo`) and applies it, then waits for the rollout (`apply`). The driver
(`flows.driver`) decides whether and when.
"""

from __future__ import annotations

from flows.cache_clear import CacheClear
from flows.common import md_escape
from flows.error_rate.params import Scenario
from flows.restart import DeploymentRestart
from flows.spec import Action, ActionRecord, ApprovalPolicy
from tasks.kubernetes import (
    RollbackPlan,
    StatefulSetRestartPlan,
    apply_rollback,
    apply_statefulset_restart,
    wait_for_rollout,
    wait_for_statefulset,
)

#: Why a revision just rolled back from is never the target of a rollback.
NOT_BACK = "never a rollback target: it is the release just undone"


class ErrorRateAction(Action):
    """An action for one scenario; as such (not a subclass) it is listed but never possible:
    the evidence ruled it out, or it could not be planned (the reason in `summary`)."""

    scenario: Scenario

    def describe(self) -> str:
        """The scenario first: the approval form lists several."""
        return f"{self.scenario}: {super().describe()}"


class RollbackAction(ErrorRateAction):
    """D: `kubectl rollout undo` of the backend to the revision pinned when planned."""

    kind: str = "rollback"
    rollback: RollbackPlan
    rollout_timeout_s: float

    def try_dry_run(self) -> str:
        return apply_rollback(self.rollback, dry_run=True).message

    def undo(self) -> str:
        rb = self.rollback
        return (
            f"{md_escape(self.target)}: revision **{rb.from_revision}**, images "
            f"{md_escape(', '.join(rb.images_before))} (undo: roll back to revision "
            f"{rb.from_revision})."
        )

    def same_as(self, approved: Action) -> bool:
        """Only the revision and images a human approved, never a newer "previous", and
        never back onto a revision just undone."""
        if not isinstance(approved, RollbackAction) or not super().same_as(approved):
            return False
        now, then = self.rollback, approved.rollback
        return now.target_undone is None and (now.to_revision, now.images_after) == (
            then.to_revision,
            then.images_after,
        )

    def apply(self) -> ActionRecord:
        rb = self.rollback
        result = apply_rollback(rb)
        status = wait_for_rollout(rb.deployment, rb.namespace, timeout_s=self.rollout_timeout_s)
        return ActionRecord(
            kind=self.kind,
            target=self.target,
            before=f"revision {result.from_revision}: {', '.join(result.images_before)}",
            after=f"revision {status.revision} (template of {result.to_revision}): "
            f"{', '.join(result.images_after)}",
            message=f"{result.message}; {status.message}",
        )


class RestartAction(ErrorRateAction, DeploymentRestart):
    """B: `kubectl rollout restart` of the backend Deployment."""

    kind: str = "restart"


class DatabaseRestartAction(ErrorRateAction):
    """A: `kubectl rollout restart` of the database StatefulSet; always asks a human."""

    kind: str = "database-restart"
    approval: ApprovalPolicy = "always"
    database: StatefulSetRestartPlan
    rollout_timeout_s: float

    def try_dry_run(self) -> str:
        return apply_statefulset_restart(self.database, dry_run=True).message

    def undo(self) -> str:
        was = self.database.previous_restarted_at or "never set"
        return f"{md_escape(self.target)}: restartedAt was {md_escape(was)}."

    def apply(self) -> ActionRecord:
        sp = self.database
        done = apply_statefulset_restart(sp)
        status = wait_for_statefulset(
            sp.statefulset, sp.namespace, timeout_s=self.rollout_timeout_s
        )
        return ActionRecord(
            kind=self.kind,
            target=self.target,
            before=f"restartedAt {sp.previous_restarted_at or 'never'}",
            after=f"restartedAt {done.restarted_at}",
            message=f"{done.message}; {status.message}",
        )


class CacheClearAction(ErrorRateAction, CacheClear):
    """C: the guarded cache clear (SCAN + UNLINK of the cache key pattern, never FLUSHALL)."""

    kind: str = "cache-clear"
