"""The Deployment restart as an action, the one both error-rate and outage runbooks plan."""

from __future__ import annotations

from datetime import UTC, datetime

from flows.common import md_escape
from flows.spec import Action, ActionRecord
from tasks.kubernetes import RestartPlan, apply_restart, wait_for_rollout


class DeploymentRestart(Action):
    """`kubectl rollout restart` of one Deployment (pinned `restartedAt`), then its rollout
    waited for; when it started and when it rolled out are kept (a stagger is measured)."""

    kind: str = "restart"
    restart: RestartPlan
    rollout_timeout_s: float
    started_at: datetime | None = None
    rolled_out_at: datetime | None = None

    def try_dry_run(self) -> str:
        return apply_restart(self.restart, dry_run=True).message

    def undo(self) -> str:
        was = self.restart.previous_restarted_at or "never set"
        return f"{md_escape(self.target)}: restartedAt was {md_escape(was)}."

    def apply(self) -> ActionRecord:
        rs = self.restart
        self.started_at = datetime.now(UTC)
        done = apply_restart(rs)
        status = wait_for_rollout(rs.deployment, rs.namespace, timeout_s=self.rollout_timeout_s)
        self.rolled_out_at = datetime.now(UTC)
        return ActionRecord(
            kind=self.kind,
            target=self.target,
            before=f"restartedAt {rs.previous_restarted_at or 'never'}",
            after=f"restartedAt {done.restarted_at}",
            message=f"{done.message}; {status.message} (started {self.started_at:%H:%M:%S.%f}"[:-3]
            + f", rolled out {self.rolled_out_at:%H:%M:%S.%f}"[:-3]
            + " UTC)",
        )
