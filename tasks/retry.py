"""The one retry policy: exponential backoff with jitter, transient errors only.

Retries live on `@task` and nowhere else: clients are built with their own retry
layers switched off (see `tasks.clients`) so attempts never multiply.
"""

from __future__ import annotations

from typing import Any

from prefect.client.schemas.objects import State, TaskRun
from prefect.tasks import Task, exponential_backoff

from tasks.errors import TransientError
from tasks.settings import RetrySettings


def retry_only_transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry a failed task run only when it failed with a `TransientError`."""
    try:
        state.result()
    except TransientError:
        return True
    except BaseException:  # noqa: BLE001 - any other failure is final
        return False
    return False


def _policy() -> dict[str, Any]:
    settings = RetrySettings()
    return {
        "retries": settings.attempts,
        "retry_delay_seconds": exponential_backoff(backoff_factor=settings.backoff_s),
        "retry_jitter_factor": settings.jitter_factor,
        "retry_condition_fn": retry_only_transient,
    }


#: Spread into `@task(**RETRY_TRANSIENT, ...)` on every task that talks to a system.
RETRY_TRANSIENT: dict[str, Any] = _policy()
