"""The changing steps of `security-breach`, each a small `Runbook` driven by `drive()`.

Each step gets the whole skeleton: dry run (the plan, nothing changed), its own approval
(`always`: a route or `auto_approve` never skips it; who and why recorded), the target lock
`security:<namespace>`, a fresh read and re-plan under the lock (only what was approved and
still holds is done), act, report. A refusal or a timeout ends that step `refused`, with
nothing changed; the flow goes on to offer the next step.

The plans and writes are the contain tasks (`tasks/kubernetes/netpol.py`,
`tasks/kubernetes/secret_rotation.py`, `tasks/security/sessions.py`,
`tasks/security/passwords.py`); this module only turns them into actions. No secret value
ever passes through here: the rotation task keeps old and new values to itself.
"""

from __future__ import annotations

from typing import Any, ClassVar

from flows.common import Report, md_escape
from flows.driver import Runbook
from flows.security.params import SPEC, SecurityBreachParams
from flows.spec import Action, ActionRecord, ApprovalPolicy
from tasks.kubernetes.netpol import (
    CORDONED_FOR,
    INCIDENT_LABEL,
    MANAGED_BY,
    OURS,
    IsolationPlan,
    apply_isolation,
    plan_isolation,
)
from tasks.kubernetes.secret_rotation import (
    RotationPlan,
    RotationResult,
    apply_rotation,
    plan_rotation,
)
from tasks.security.passwords import force_password_reset
from tasks.security.sessions import revoke_sessions

SHOWN = 10


def _names(items: Any) -> str:
    """The first names of a list, counted beyond `SHOWN` ("none" when empty)."""
    names = [str(i) for i in (items or [])]
    if not names:
        return "none"
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


# ----------------------------------------------------------------------------- actions


class IsolateAction(Action):
    """A deny-all ingress+egress NetworkPolicy on the affected pods (optional cordon)."""

    kind: str = "isolate"
    approval: ApprovalPolicy = "always"
    isolation: IsolationPlan

    def try_dry_run(self) -> str:
        result = apply_isolation(self.isolation, dry_run=True)
        return f"server dry run: policy {result.policy_name} accepted; nothing written"

    def undo(self) -> str:
        plan = self.isolation
        # The commands an on-call runs (nothing here needs Python): exactly our policies of
        # this incident, and only the nodes this step cordons (never one cordoned before).
        text = (
            f"`kubectl -n {plan.namespace} delete networkpolicy"
            f" -l {MANAGED_BY}={OURS},{INCIDENT_LABEL}={plan.slug}`"
        )
        cordoned = [n for n in plan.nodes if n not in plan.nodes_already_unschedulable]
        if plan.cordon and cordoned:
            nodes = " ".join(cordoned)
            text += (
                f", then `kubectl uncordon {nodes}` and"
                f" `kubectl annotate node {nodes} {CORDONED_FOR}-`"
            )
        return text + " (the task `undo_isolation(incident)` does the same)"

    def same_as(self, approved: Action) -> bool:
        """The same policy on the same pods: pods replaced since the approval were not seen
        by the approver (the run ends skipped; run again to isolate the new ones)."""
        return (
            isinstance(approved, IsolateAction)
            and super().same_as(approved)
            and set(self.isolation.pods) == set(approved.isolation.pods)
            and self.isolation.nodes == approved.isolation.nodes
        )

    def apply(self) -> ActionRecord:
        result = apply_isolation(self.isolation)
        return ActionRecord(
            kind=self.kind,
            target=self.target,
            before="no isolation policy of this incident",
            after=f"NetworkPolicy {result.policy_name}",
            message=("created" if result.created else "already there")
            + f"; pods selected: {_names(result.pods)}"
            + (f"; cordoned: {_names(result.cordoned)}" if result.cordoned else ""),
        )


class RotateAction(Action):
    """New random values for the named Secrets, each backed up first; restart their users."""

    kind: str = "rotate-secrets"
    approval: ApprovalPolicy = "always"
    rotation: RotationPlan

    def try_dry_run(self) -> str:
        result = apply_rotation(self.rotation, dry_run=True)
        return "server dry run: " + _rotation_text(result) + "; nothing written"

    def undo(self) -> str:
        backups = ", ".join(s.backup_name for s in self.rotation.secrets if not s.already_rotated)
        return (
            f"the old values stay in the backup Secret(s) {backups} (created before each"
            " write): restore them from there and restart the same users"
        )

    def same_as(self, approved: Action) -> bool:
        """The same Secrets still to rotate (one rotated meanwhile is not rotated again)."""
        return (
            isinstance(approved, RotateAction)
            and super().same_as(approved)
            and _todo(self.rotation) == _todo(approved.rotation)
        )

    def apply(self) -> ActionRecord:
        result = apply_rotation(self.rotation)
        return ActionRecord(
            kind=self.kind,
            target=self.target,
            before="values as read (never recorded)",
            after="new random values (never recorded)",
            message=_rotation_text(result),
        )


class ResetAction(Action):
    """A forced password reset for all users, through the backend's endpoint."""

    kind: str = "force-password-reset"
    approval: ApprovalPolicy = "always"

    def try_dry_run(self) -> str:
        return "nothing sent: " + self.summary

    def undo(self) -> str:
        return "none: users set a new password at their next login"

    def apply(self) -> ActionRecord:
        result = force_password_reset(dry_run=False)
        return ActionRecord(
            kind=self.kind,
            target=self.target,
            before=f"{result.must_reset - result.flagged} of {result.users} user(s) flagged",
            after=f"{result.must_reset} of {result.users} user(s) must reset",
            message=f"{result.flagged} user(s) newly flagged",
        )


class RevokeAction(Action):
    """Delete the login sessions in Redis (SCAN + UNLINK of the configured key pattern)."""

    kind: str = "revoke-sessions"
    approval: ApprovalPolicy = "always"

    def try_dry_run(self) -> str:
        return "nothing deleted: " + self.summary

    def undo(self) -> str:
        return "none: users log in again"

    def apply(self) -> ActionRecord:
        result = revoke_sessions(dry_run=False)
        return ActionRecord(
            kind=self.kind,
            target=self.target,
            before=f"{result.matched} session key(s) matching `{result.pattern}`",
            after=f"{result.revoked} deleted",
            message=f"{result.revoked} session(s) revoked on {result.target}",
        )


def _todo(plan: RotationPlan) -> list[str]:
    """What a plan still does: the Secrets not yet rotated for the incident, the restarts."""
    return sorted(s.name for s in plan.secrets if not s.already_rotated) + sorted(
        f"restart {r.kind}/{r.name}" for r in plan.restarts
    )


def _rotation_text(result: RotationResult) -> str:
    """Per Secret what happened, then the restarts (names only: values never leave the task)."""
    secrets = "; ".join(f"{s.name}: {s.outcome} (backup {s.backup_name})" for s in result.secrets)
    restarts = ", ".join(f"{r.kind}/{r.name}" for r in result.restarts) or "none"
    return f"{secrets or 'no Secret'}; restarted: {restarts}"


# ----------------------------------------------------------------------------- steps


class Step(Runbook[SecurityBreachParams, None]):
    """One changing step; `plan` reads (again under the lock), `act` is the driver's."""

    spec = SPEC
    name: ClassVar[str]

    def __init__(self, incident: str, namespace: str) -> None:
        self.incident = incident
        self.namespace = namespace
        self.planned: list[Action] = []

    def title(self, params: SecurityBreachParams) -> str:
        return f"{self.spec.title}: {self.name} (incident {self.incident})"

    def check(self, params: SecurityBreachParams, report: Report) -> None:
        report.add("Step", f"{md_escape(self.name)}, incident {md_escape(self.incident)}")

    def remeasure(self, params: SecurityBreachParams, report: Report) -> None:
        """Nothing to gather: `plan` reads again under the lock."""

    def plan(self, params: SecurityBreachParams, findings: None) -> list[Action]:
        self.planned = self.make_plan(params)
        return self.planned

    def make_plan(self, params: SecurityBreachParams) -> list[Action]:
        raise NotImplementedError


class IsolateStep(Step):
    """Step 2: the deny-all NetworkPolicy on the pods the selector picks now."""

    name = "isolate"

    def make_plan(self, params: SecurityBreachParams) -> list[Action]:
        plan = plan_isolation(
            self.incident, params.selector, namespace=self.namespace, cordon=params.cordon
        )
        summary = (
            f"deny-all ingress+egress NetworkPolicy {plan.policy_name} on {len(plan.pods)}"
            f" pod(s) selected by `{params.selector}`: {_names(plan.pods)}"
            + (f"; cordon node(s) {_names(plan.nodes)}" if plan.cordon else "; no cordon")
            + "; no pod deleted, restarted or scaled"
            + (
                f"; WARNING: the selector picks EVERY pod of namespace {plan.namespace}"
                if plan.selects_all_pods
                else ""
            )
        )
        return [
            IsolateAction(
                target=f"k8s:{plan.namespace}/networkpolicy/{plan.policy_name}",
                summary=("already in place: " if plan.policy_exists else "") + summary,
                possible=not plan.policy_exists,
                isolation=plan,
            )
        ]


class RotateStep(Step):
    """Step 5a: rotate the named Secrets (backup first) and restart exactly their users."""

    name = "rotate secrets"

    def __init__(self, incident: str, namespace: str, unkept: dict[str, str] | None = None) -> None:
        super().__init__(incident, namespace)
        #: Pods whose logs the evidence bundle could not keep, with their workloads.
        self.unkept = unkept or {}

    def make_plan(self, params: SecurityBreachParams) -> list[Action]:
        plan = plan_rotation(self.incident, params.secrets, namespace=self.namespace)
        restarted = {f"{r.kind}/{r.name}" for r in plan.restarts}
        lost = sorted(pod for pod, workload in self.unkept.items() if workload in restarted)
        if lost:
            # A restart replaces the pod and its container logs with it: the evidence the
            # bundle could not read would be gone for good.
            return [
                RotateAction(
                    target=f"k8s:{plan.namespace}/secrets/{','.join(params.secrets)}",
                    summary=(
                        f"not now: the restarts would replace pod(s) {_names(lost)}, whose logs"
                        " the evidence bundle could not keep (see its capture errors); run"
                        " again for this incident to capture them, then rotate"
                    ),
                    possible=False,
                    rotation=plan,
                )
            ]
        parts = [
            f"{s.name} (keys {_names(s.key_names)}; users"
            f" {_names([f'{u.kind}/{u.name}' for u in s.users])})"
            + (": already rotated for this incident, skipped" if s.already_rotated else "")
            for s in plan.secrets
        ]
        todo = [s for s in plan.secrets if not s.already_rotated]
        restarts = _names([f"{r.kind}/{r.name}" for r in plan.restarts])
        summary = (
            f"rotate {'; '.join(parts) or 'no Secret'}; each backed up first"
            f" (`<name>-backup-<incident>`), then restart exactly {restarts}"
        )
        if not todo:
            # Rotated for this incident already: only restarts still owed (a run stopped
            # between the write and the restarts) are left to do; never a second rotation.
            summary = (
                "restarts still owed: " if plan.restarts else "nothing to rotate: "
            ) + summary
        return [
            RotateAction(
                target=f"k8s:{plan.namespace}/secrets/{','.join(params.secrets)}",
                summary=summary,
                possible=bool(todo or plan.restarts),
                rotation=plan,
            )
        ]


class ResetStep(Step):
    """Step 5b: force every user to set a new password."""

    name = "force password reset"

    def make_plan(self, params: SecurityBreachParams) -> list[Action]:
        counted = force_password_reset(dry_run=True)
        return [
            ResetAction(
                target=f"backend:{counted.endpoint}",
                summary=f"force a password reset for all {counted.users} user(s)"
                f" ({counted.must_reset} already flagged)",
            )
        ]


class RevokeStep(Step):
    """Step 5c: delete the login sessions (configured key pattern) in Redis."""

    name = "revoke sessions"

    def make_plan(self, params: SecurityBreachParams) -> list[Action]:
        counted = revoke_sessions(dry_run=True)
        return [
            RevokeAction(
                target=f"redis:{counted.target}/{counted.pattern}",
                summary=f"delete {counted.matched} session key(s) matching `{counted.pattern}`",
                possible=counted.matched > 0,
            )
        ]
