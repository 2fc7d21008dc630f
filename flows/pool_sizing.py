"""db-pool-exhausted's "Pool sizing" section and its optional pool-size raise.

The section is computed in every run (read only); Kubernetes unreachable or not configured
makes it say "not available: why", never fails the run. The raise (`RaisePoolSize`, planned
by `plan_raise`) is one action of the runbook's plan, approval `always`: it sets the
backend's pool-size env var to a value at most the formula's cap, is planned again under the
lock (cap and entry read again), records the exact previous entry (the undo) and restarts
the backend like `kubectl rollout restart`.
"""

from __future__ import annotations

import json

from pydantic import BaseModel

from flows.common import Report, md_code, md_escape, table
from flows.spec import Action, ActionRecord, ApprovalPolicy, Outcome
from tasks.clients import kube_configured
from tasks.errors import SafetyViolation
from tasks.kubernetes import RestartResult, restart_rollout
from tasks.kubernetes.env import (
    EnvChange,
    EnvChangeResult,
    apply_env_value,
    describe_entry,
    plan_env_value,
)
from tasks.locks import kube_lock_target
from tasks.pool_sizing import (
    BackendPool,
    PoolSizing,
    PoolSizingSettings,
    other_clients,
    read_backend_pool,
    size_pool,
)
from tasks.postgres import PoolUsage
from tasks.settings import KubernetesSettings


class SizingView(BaseModel):
    """The sizing check as shown in the report, or why it is not available."""

    backend: BackendPool | None = None
    sizing: PoolSizing | None = None
    unavailable: str | None = None
    other_note: str = ""


class PoolSizeAction(BaseModel):
    """What became of the pool-size raise (the run's words: acted, refused, skipped, ...)."""

    outcome: Outcome
    note: str
    cap_before: int | None = None
    cap_after_approval: int | None = None
    change: EnvChangeResult | None = None
    restart: RestartResult | None = None


def measure_sizing(usage: PoolUsage, *, retry: bool = True) -> SizingView:
    """Read the backend's pods and pool size; count the other clients; compute the check.

    `retry=False` (the report): one attempt, so an unreachable Kubernetes API costs the
    incident one request timeout, not the retry policy's backoff.
    """
    if not kube_configured():
        # Not an error: many installations size the pool by hand. No task run, no traceback.
        return SizingView(
            unavailable="not available: no Kubernetes configuration (RUNBOOKS_K8S_KUBECONFIG,"
            " in-cluster, $KUBECONFIG or ~/.kube/config)"
        )
    settings = PoolSizingSettings()
    read = read_backend_pool if retry else read_backend_pool.with_options(retries=0)
    backend_state = read(sizing=settings, return_state=True)
    if not backend_state.is_completed():
        return SizingView(unavailable=f"not available: {backend_state.message}")
    backend: BackendPool = backend_state.result()
    other, note = 0, ""
    if settings.db_role is None:
        # Without the backend's role, its own connections cannot be told from the others'.
        note = "other clients not measured: RUNBOOKS_BACKEND_POOL_DB_ROLE is not set"
    else:
        other = other_clients(usage, settings.db_role)
    sizing = size_pool(
        max_connections=usage.max_connections,
        reserved=usage.superuser_reserved + usage.reserved,
        other_clients=other,
        headroom=settings.headroom,
        pods=backend.pods,
        pool_size=backend.pool_size,
    )
    return SizingView(backend=backend, sizing=sizing, other_note=note)


def sizing_md(view: SizingView) -> str:
    """The "Pool sizing" section body."""
    if view.unavailable or view.backend is None or view.sizing is None:
        return md_escape(view.unavailable or "not available")
    b, s = view.backend, view.sizing
    verdict = {
        True: "**OVER-SUBSCRIBED**: full pools on every pod would take more connections than"
        " the server has left for them",
        False: "fits",
        None: "pool size unknown: cannot check",
    }[s.oversubscribed]
    pods = (
        f"{b.pods} (spec {b.spec_replicas}, status {b.status_replicas},"
        f" updated {b.updated_replicas})"
    )
    rows: list[list[object]] = [
        [f"pods of {b.namespace}/{b.deployment}", pods],
        [
            "pool size per pod",
            f"{s.pool_size if s.pool_size is not None else '?'} ({b.source})",
        ],
        ["demand = pods x pool", s.demand if s.demand is not None else "?"],
        ["max_connections", s.max_connections],
        ["reserved", s.reserved],
        ["other clients", s.other_clients],
        ["headroom", s.headroom],
        ["budget = max - reserved - other - headroom", s.budget],
    ]
    return (
        "pods x pool size + other clients + headroom <= max_connections - reserved: "
        f"{verdict}.\n\n"
        + table(["", "value"], rows)
        + f"\n\nRecommended pool size per pod (the cap for a raise): **{s.recommended}**"
        f" = floor({s.budget} / {max(s.pods, 1)}), at least 1."
        + (f"\n\n_{md_escape(view.other_note)}_" if view.other_note else "")
    )


def pool_sizing_report(report: Report, usage: PoolUsage) -> SizingView:
    """Add the "Pool sizing" section (read only); never raises for Kubernetes trouble."""
    view = measure_sizing(usage, retry=False)
    report.add("Pool sizing", sizing_md(view))
    return view


def _undo_md(change: EnvChange | EnvChangeResult) -> str:
    patch = json.dumps(change.undo_patch, separators=(",", ":"))
    return md_code(
        f"kubectl -n {change.namespace} patch deployment {change.deployment} "
        f"--type strategic -p '{patch}'"
    )


def backend_workload() -> str:
    """The lock target of the backend Deployment (high-error-rate's rollbacks take it too)."""
    settings = KubernetesSettings()
    return kube_lock_target(settings.namespace, settings.backend_deployment).key


class RaisePoolSize(Action):
    """Set the backend's pool-size env var (at most the sizing cap) and restart the backend.

    `possible` False: listed with the reason (above the cap, sizing not available, a paused
    Deployment); `already_set`: the entry is the literal value already (no action planned).
    """

    kind: str = "raise-pool-size"
    approval: ApprovalPolicy = "always"
    value: int
    cap: int | None = None
    change: EnvChange | None = None
    already_set: bool = False
    #: Filled by `apply`.
    result: EnvChangeResult | None = None
    restart: RestartResult | None = None

    def _planned(self) -> EnvChange:
        if self.change is None:
            raise SafetyViolation(f"the pool-size raise is not possible: {self.summary}")
        return self.change

    def try_dry_run(self) -> str:
        return apply_env_value(self._planned(), dry_run=True).message

    def undo(self) -> str:
        change = self._planned()
        return (
            f"{md_escape(change.env)} was {md_escape(describe_entry(change.previous))}. Undo"
            f" (the exact previous entry, then restart again): {_undo_md(change)}"
        )

    def same_as(self, approved: Action) -> bool:
        """The same write: same Deployment, same value, and the entry it replaces unchanged."""
        return (
            isinstance(approved, RaisePoolSize)
            and super().same_as(approved)
            and self.value == approved.value
            and self.change is not None
            and approved.change is not None
            and self.change.previous == approved.change.previous
        )

    def apply(self) -> ActionRecord:
        change = apply_env_value(self._planned())
        self.result = change
        # The env var is changed already when a restart fails: the undo is in the report
        # (recorded before the write), the run fails with the restart's error.
        self.restart = restart_rollout(change.deployment, change.namespace)
        return ActionRecord(
            kind=self.kind,
            target=self.target,
            before=change.before,
            after=change.after,
            message=f"{change.env} {change.before} -> {change.after} (cap {self.cap});"
            f" {self.restart.message}",
        )


def raise_md(action: RaisePoolSize) -> str:
    """The "Pool size action" section after the write: before, after and the undo."""
    change = action.result
    if change is None:
        return "not applied"
    return (
        f"**set**: {md_escape(change.env)} {md_escape(change.before)} ->"
        f" {md_escape(change.after)} (cap {action.cap})"
        + (f"; {md_escape(action.restart.message)}" if action.restart else "")
        + f".\n\nBefore: {md_escape(change.before)}; after: {md_escape(change.after)}."
        f"\n\nUndo (the exact previous entry, then restart again): {_undo_md(change)}"
    )


def plan_raise(value: int, view: SizingView) -> RaisePoolSize:
    """The raise as an action pinned by a read of the entry it replaces, or why it cannot run."""
    settings = PoolSizingSettings()

    def impossible(reason: str, target: str = "k8s:backend", **kw: object) -> RaisePoolSize:
        return RaisePoolSize.model_validate(
            {"target": target, "summary": reason, "possible": False, "value": value, **kw}
        )

    if view.sizing is None or view.backend is None:
        return impossible(f"pool sizing {view.unavailable}")
    backend, cap = view.backend, view.sizing.recommended
    workload = kube_lock_target(backend.namespace, backend.deployment).key
    if value > cap:
        return impossible(
            f"{value} is above the cap of {cap} (pool sizing formula)", workload, cap=cap
        )
    try:
        plan = plan_env_value(
            backend.deployment, backend.namespace, backend.container, settings.env, value, cap
        )
    except SafetyViolation as exc:
        return impossible(str(exc), workload, cap=cap)
    before = describe_entry(plan.previous)
    if plan.previous == plan.target_entry:
        # An empty plan asks nobody: the value is already set, a restart would change nothing.
        return impossible(
            f"{settings.env} is already {value}", workload, cap=cap, change=plan, already_set=True
        )
    return RaisePoolSize(
        target=workload,
        summary=f"set {settings.env} from {before} to {value} (cap {cap}) and restart it",
        value=value,
        cap=cap,
        change=plan,
    )
