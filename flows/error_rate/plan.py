"""The plan of `high-error-rate`: one action per scenario that holds, each pinned by a read.

Nothing is written here. At most one rollout undo; no separate restart when the rollback
replaces every pod; never a rollback onto a revision just undone (`target_undone`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flows.common import failure_text
from flows.error_rate.actions import (
    NOT_BACK,
    CacheClearAction,
    DatabaseRestartAction,
    ErrorRateAction,
    RestartAction,
    RollbackAction,
)
from flows.error_rate.evidence import ScenarioVerdict
from flows.error_rate.params import HighErrorRateParams, Scenario
from tasks.errors import RunbookError
from tasks.kubernetes import plan_restart, plan_rollback, plan_statefulset_restart
from tasks.redis import clear_cache
from tasks.settings import KubernetesSettings


def make_plan(
    params: HighErrorRateParams,
    scenarios: list[ScenarioVerdict],
    withheld: Sequence[ErrorRateAction] = (),
) -> list[ErrorRateAction]:
    """One planned action per scenario that holds; targets pinned by reads, nothing written.

    `withheld`: actions the evidence ruled out (`Findings.withheld`), listed as not possible.
    """
    k8s = KubernetesSettings()
    backend = f"deployment/{k8s.backend_deployment} in {k8s.namespace}"
    held = {s.scenario for s in scenarios}
    plan: list[ErrorRateAction] = [a.model_copy() for a in withheld]
    if "D" in held:
        plan.append(_planned("D", "rollback", backend, lambda: _rollback(params, backend)))
    if "B" in held:
        if any(isinstance(a, RollbackAction) and a.possible for a in plan):
            plan.append(
                ErrorRateAction(
                    scenario="B",
                    kind="restart",
                    target=backend,
                    summary="no separate restart: the rollback replaces every pod",
                    possible=False,
                )
            )
        else:
            plan.append(_planned("B", "restart", backend, lambda: _restart(params, backend)))
    if "C" in held:
        plan.append(_planned("C", "cache-clear", "Redis", _cache_clear))
    if "A" in held:
        target = f"statefulset/{params.database_statefulset} in {k8s.namespace}"
        plan.append(_planned("A", "database-restart", target, lambda: _db_restart(params, target)))
    return plan


def _planned(
    scenario: Scenario, kind: str, target: str, read: Callable[[], ErrorRateAction]
) -> ErrorRateAction:
    """The action `read` plans, or one saying why it cannot be planned."""
    try:
        return read()
    except RunbookError as exc:
        return ErrorRateAction(
            scenario=scenario,
            kind=kind,
            target=target,
            summary=f"not possible: {failure_text(exc)}",
            possible=False,
        )


def _rollback(params: HighErrorRateParams, target: str) -> ErrorRateAction:
    k8s = KubernetesSettings()
    rb = plan_rollback(k8s.backend_deployment, k8s.namespace)
    summary = (
        f"roll back from revision {rb.from_revision} ({', '.join(rb.images_before)}) to "
        f"revision {rb.to_revision} ({', '.join(rb.images_after)})"
    )
    if rb.target_undone is not None:
        # The Deployment was undone after the evidence was read: the previous revision is
        # now the one just left.
        summary = f"not planned: {rb.target_undone.describe()}; {NOT_BACK}"
    return RollbackAction(
        scenario="D",
        target=target,
        summary=summary,
        possible=not rb.already_current and rb.target_undone is None,
        rollback=rb,
        rollout_timeout_s=params.rollout_timeout_s,
    )


def _restart(params: HighErrorRateParams, target: str) -> ErrorRateAction:
    k8s = KubernetesSettings()
    rs = plan_restart(k8s.backend_deployment, k8s.namespace)
    return RestartAction(
        scenario="B",
        target=target,
        summary=f"rollout restart (restartedAt {rs.restarted_at}; "
        f"was {rs.previous_restarted_at or 'never'})",
        restart=rs,
        rollout_timeout_s=params.rollout_timeout_s,
    )


def _cache_clear() -> ErrorRateAction:
    cc = clear_cache(dry_run=True)
    return CacheClearAction(
        scenario="C",
        target=cc.target,
        summary=f"remove {cc.matched} key(s) matching {cc.pattern!r} ({cc.method})",
        possible=cc.matched > 0,
        planned=cc,
    )


def _db_restart(params: HighErrorRateParams, target: str) -> ErrorRateAction:
    sp = plan_statefulset_restart(params.database_statefulset, KubernetesSettings().namespace)
    return DatabaseRestartAction(
        scenario="A",
        target=target,
        summary=f"rollout restart of the database pods (restartedAt {sp.restarted_at}; "
        f"was {sp.previous_restarted_at or 'never'}; updateStrategy {sp.update_strategy}); "
        "always needs an approval",
        database=sp,
        rollout_timeout_s=params.rollout_timeout_s,
    )
