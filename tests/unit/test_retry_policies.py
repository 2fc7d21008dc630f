"""Every task's retries come from one of the two named policies, or there are none.

A retry that repeats a non-idempotent write (a session kill, a Secret swap, an ACME order, a
delete) is how a runbook makes an incident worse, so the rule is checked over every `@task`
in `tasks/` and `flows/` rather than trusted to review. What each policy does on a real
failure is tested in tests/integration/test_retry_policy.py and, with answers dropped after
the write landed, in the Kubernetes and PostgreSQL retry tests.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import pytest
from prefect import Task

import flows
import tasks
from tasks.retry import RETRY_IDEMPOTENT_WRITE, RETRY_READ, retry_only_transient


def _all_tasks() -> dict[str, Task[..., Any]]:
    """Every Prefect task defined in a module of `tasks` or `flows`, by dotted name."""
    found: dict[str, Task[..., Any]] = {}
    for package in (tasks, flows):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            module = importlib.import_module(info.name)
            for attr, value in vars(module).items():
                if isinstance(value, Task) and value.fn.__module__ == module.__name__:
                    found[f"{module.__name__}.{attr}"] = value
    return found


TASKS = _all_tasks()

#: Writes that are not idempotent by construction: never retried automatically.
NEVER_RETRIED = [
    "tasks.postgres.terminations.terminate_sessions",
    "tasks.tls.secrets.replace_tls_secret",
    "tasks.acme.issue_to_staged_secret",
    "flows.audit_retention.export_and_delete",
]

#: Writes whose target was decided in an earlier read step (the revision, the timestamp, the
#: previous value, the idempotency key): a retry finds the change made and does nothing.
IDEMPOTENT_WRITES = [
    "tasks.postgres.timeouts.set_idle_in_transaction_timeout",
    "tasks.kubernetes.rollout.apply_rollback",
    "tasks.kubernetes.rollout.apply_restart",
    "tasks.kubernetes.scale.scale",
    "tasks.kubernetes.statefulset.apply_statefulset_restart",
    "tasks.kubernetes.resources.apply_memory_limit",
    "tasks.kubernetes.env.apply_env_value",
    "tasks.redis.clear_cache",
    "tasks.notify.send_notification",
]


def test_the_scan_finds_the_tasks() -> None:
    assert len(TASKS) >= 30
    assert set(NEVER_RETRIED + IDEMPOTENT_WRITES) <= set(TASKS)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_a_retried_task_uses_a_named_policy(name: str) -> None:
    task = TASKS[name]
    if task.retries:
        # Only the policies of tasks/retry.py set retries, and both retry only a
        # TransientError with their configured attempts.
        assert task.retries == RETRY_READ["retries"] == RETRY_IDEMPOTENT_WRITE["retries"]
        assert task.retry_condition_fn is retry_only_transient


@pytest.mark.parametrize("name", NEVER_RETRIED)
def test_a_write_that_is_not_idempotent_is_never_retried(name: str) -> None:
    assert TASKS[name].retries == 0


@pytest.mark.parametrize("name", IDEMPOTENT_WRITES)
def test_an_idempotent_write_is_retried_on_transient_errors(name: str) -> None:
    assert TASKS[name].retries == RETRY_IDEMPOTENT_WRITE["retries"]
    assert TASKS[name].retry_condition_fn is retry_only_transient
