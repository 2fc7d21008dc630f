"""db-pool-exhausted's "Pool sizing" section and its optional, approved pool-size raise.

The section is computed in every run (read only); Kubernetes unreachable or not configured
makes it say "not available: why", never fails the run. The action (`raise_pool_size`) sets
the backend's pool-size env var to a value at most the formula's cap, only with dry_run off
and approval required, re-checks everything after the approval, records the exact previous
value (the undo) and restarts the backend like `kubectl rollout restart`.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel

from flows.common import Report, md_code, md_escape, request_approval, table
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
from tasks.locks import LOCK_TIMEOUT_S, kube_lock_target, target_lock
from tasks.pool_sizing import (
    BackendPool,
    PoolSizing,
    PoolSizingSettings,
    other_clients,
    read_backend_pool,
    size_pool,
)
from tasks.postgres import PoolUsage, measure_pool_usage


class SizingView(BaseModel):
    """The sizing check as shown in the report, or why it is not available."""

    backend: BackendPool | None = None
    sizing: PoolSizing | None = None
    unavailable: str | None = None
    other_note: str = ""


class PoolSizeAction(BaseModel):
    """What the pool-size action did."""

    action: Literal["none", "set", "refused"]
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


def raise_pool_size(
    target: int,
    *,
    dry_run: bool,
    require_approval: bool,
    approval_timeout_s: int,
    report: Report,
) -> PoolSizeAction:
    """Set the backend's pool-size env var (<= the cap), after approval, then restart it."""

    def done(action: Literal["none", "set", "refused"], note: str, **kw: object) -> PoolSizeAction:
        report.add("Pool size action", f"**{action}**: {md_escape(note)}" + str(kw.pop("md", "")))
        return PoolSizeAction.model_validate({"action": action, "note": note, **kw})

    if dry_run or not require_approval:
        return done(
            "refused",
            f"raising the pool size to {target} needs dry_run off and require_approval on;"
            " nothing changed.",
        )
    view = measure_sizing(measure_pool_usage())
    if view.sizing is None or view.backend is None:
        return done("refused", f"pool sizing {view.unavailable}; nothing changed.")
    cap = view.sizing.recommended
    if target > cap:
        return done(
            "refused",
            f"{target} is above the cap of {cap} (pool sizing formula); nothing changed.",
            cap_before=cap,
        )
    backend, settings = view.backend, PoolSizingSettings()
    try:
        plan = plan_env_value(
            backend.deployment, backend.namespace, backend.container, settings.env, target, cap
        )
    except SafetyViolation as exc:
        return done("refused", f"{exc}; nothing changed.", cap_before=cap)
    before = describe_entry(plan.previous)
    if plan.previous == plan.target_entry:
        # An empty plan asks nobody: the value is already set, a restart would change nothing.
        return done(
            "none",
            f"nothing to do: {settings.env} is already {target}; nothing changed.",
            cap_before=cap,
        )
    decision = request_approval(
        f"Set {settings.env} of {backend.namespace}/{backend.deployment} from {before} to "
        f"{target} (cap {cap}) and restart it",
        approval_timeout_s,
    )
    report.add("Pool size approval", decision.line())
    if not decision.approved:
        return done("refused", "not approved: nothing changed.", cap_before=cap)
    # One change to the backend at a time (high-error-rate's rollbacks take the same lock).
    workload = kube_lock_target(backend.namespace, backend.deployment).key
    with target_lock(workload, timeout_s=LOCK_TIMEOUT_S) as waited:
        report.add("Pool size lock", f"Held {md_escape(workload)} (waited {waited:.1f} s).")
        # The wait may have been long: replicas, pool and other clients are read again.
        again = measure_sizing(measure_pool_usage())
        if again.sizing is None or again.backend is None:
            return done(
                "refused", f"after approval, pool sizing {again.unavailable}; nothing changed."
            )
        new_cap = again.sizing.recommended
        if target > new_cap:
            return done(
                "refused",
                f"after approval the cap is {new_cap} (was {cap}): {target} is above it;"
                " nothing changed.",
                cap_before=cap,
                cap_after_approval=new_cap,
            )
        try:
            fresh = plan_env_value(
                backend.deployment,
                backend.namespace,
                backend.container,
                settings.env,
                target,
                new_cap,
            )
            if fresh.previous != plan.previous:
                raise SafetyViolation(
                    f"{settings.env} changed while waiting for approval ({before} -> "
                    f"{describe_entry(fresh.previous)})"
                )
            change = apply_env_value(fresh)
        except SafetyViolation as exc:
            return done(
                "refused", f"{exc}; nothing changed.", cap_before=cap, cap_after_approval=new_cap
            )
        try:
            restart = restart_rollout(backend.deployment, backend.namespace)
        except Exception:
            # The env var is changed already: the audit must show it and its undo.
            report.add(
                "Pool size action",
                f"**set, restart failed**: {md_escape(settings.env)} {md_escape(change.before)} ->"
                f" {md_escape(change.after)}; the restart failed (see the run's error)."
                f"\n\nUndo (the exact previous entry, then restart): {_undo_md(change)}",
            )
            raise
        return done(
            "set",
            f"{settings.env} {change.before} -> {change.after} (cap {new_cap}); {restart.message}.",
            cap_before=cap,
            cap_after_approval=new_cap,
            change=change,
            restart=restart,
            md=f"\n\nBefore: {md_escape(change.before)}; after: {md_escape(change.after)}."
            f"\n\nUndo (the exact previous entry, then restart again): {_undo_md(change)}",
        )
