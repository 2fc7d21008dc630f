"""The two retry policies: one for reads, one for writes that are idempotent by construction.

Retries live on `@task` and nowhere else: clients are built with their own retry layers
switched off (see `tasks.clients`) so attempts never multiply. Both policies retry only a
`TransientError`, with exponential backoff and jitter.

- `RETRY_READ`: a task that only reads. Repeating it changes nothing.
- `RETRY_IDEMPOTENT_WRITE`: a write whose target was decided before, in a read step (the
  revision, the timestamp, the previous value, the idempotency key) and passed in, so a
  retry finds the change already made and does nothing. A write that is not idempotent by
  construction gets neither policy: it is never retried automatically.
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


#: Spread into `@task(**RETRY_READ, ...)` on every task that only reads a system.
RETRY_READ: dict[str, Any] = _policy()

#: Spread into `@task(**RETRY_IDEMPOTENT_WRITE, ...)` on a write that no-ops when it finds
#: its (pre-decided) target already reached. Same mechanics as `RETRY_READ`; the separate
#: name is the claim a reviewer checks.
RETRY_IDEMPOTENT_WRITE: dict[str, Any] = _policy()
