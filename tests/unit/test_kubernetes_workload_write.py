"""`WorkloadWrite`: the one plan -> apply pair every Kubernetes workload write goes through."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

import pytest
from prefect import task

import tasks.kubernetes
from tasks.kubernetes.workload import (
    WorkloadWrite,
    WriteCall,
    container_patch,
    workload_write,
)
from tasks.retry import RETRY_IDEMPOTENT_WRITE, RETRY_READ, retry_only_transient
from tasks.settings import KubernetesSettings


def _writes() -> dict[str, WorkloadWrite[..., Any, Any]]:
    found: dict[str, WorkloadWrite[..., Any, Any]] = {}
    for info in pkgutil.walk_packages(tasks.kubernetes.__path__, "tasks.kubernetes."):
        for attr, value in vars(importlib.import_module(info.name)).items():
            if isinstance(value, WorkloadWrite):
                found[f"{info.name}.{attr}"] = value
    return found


WRITES = _writes()


def test_every_hand_written_pair_is_a_workload_write() -> None:
    assert set(WRITES) >= {
        "tasks.kubernetes.rollout.undo_rollout",
        "tasks.kubernetes.rollout.restart_rollout",
        "tasks.kubernetes.statefulset.restart_statefulset",
        "tasks.kubernetes.resources.raise_memory_limit",
    }


@pytest.mark.parametrize("name", sorted(WRITES))
def test_the_plan_is_a_retried_read_and_the_apply_an_idempotent_write(name: str) -> None:
    write = WRITES[name]
    assert write.plan.retries == RETRY_READ["retries"] > 0
    assert write.apply.retries == RETRY_IDEMPOTENT_WRITE["retries"] > 0
    assert write.plan.retry_condition_fn is retry_only_transient
    assert write.apply.retry_condition_fn is retry_only_transient
    # The apply step takes the plan, the dry-run flag and the settings, nothing else.
    assert list(inspect.signature(write.apply.fn).parameters) == ["plan", "dry_run", "settings"]


@pytest.mark.parametrize("name", sorted(WRITES))
def test_the_pair_keeps_its_public_signature(name: str) -> None:
    params = inspect.signature(WRITES[name]).parameters
    assert {"dry_run", "settings"} <= set(params)
    assert params["dry_run"].default is False
    assert WRITES[name].__doc__


@task
def _plan(name: str, target: int = 1, settings: KubernetesSettings | None = None) -> str:
    return f"{name}->{target}@{settings is not None}"


@task
def _apply(plan: str, dry_run: bool = False, settings: KubernetesSettings | None = None) -> str:
    return f"{plan} dry={dry_run}"


@workload_write(_plan, _apply)
def _write(
    name: str, target: int = 1, dry_run: bool = False, settings: KubernetesSettings | None = None
) -> WriteCall:
    """A test write."""
    return WriteCall({"name": name, "target": target}, dry_run, settings)


def test_fn_plans_with_the_bound_arguments_then_applies_that_plan() -> None:
    assert _write.fn("x", 3, dry_run=True) == "x->3@False dry=True"
    assert _write.fn("y", settings=KubernetesSettings()) == "y->1@True dry=False"
    assert _write.__doc__ == "A test write."


def test_a_container_patch_names_its_container() -> None:
    body = container_patch("app", {"resources": {"limits": {"memory": "1Gi"}}})
    (container,) = body["spec"]["template"]["spec"]["containers"]
    assert container == {"name": "app", "resources": {"limits": {"memory": "1Gi"}}}
