"""The error types every task raises, in one place.

    RunbookError
     ├── TransientError   retrying later may help: connection refused, timeout, 5xx,
     │                    lock timeout, 503 from the Prefect API
     ├── PermanentError   retrying is useless: bad credentials, 4xx, missing object,
     │                    invalid input
     └── SafetyViolation  a guard refused the action; nothing was changed

Only `TransientError` is retried (see `tasks.retry`). Messages never carry secrets:
they name the target (host, deployment, role), not the credentials used to reach it.
"""

from __future__ import annotations


class RunbookError(Exception):
    """Base of every error a runbook task raises on purpose."""


class TransientError(RunbookError):
    """The target did not answer well this time; a later attempt may succeed."""


class PermanentError(RunbookError):
    """The request cannot succeed as made; retrying would only repeat the failure."""


class SafetyViolation(RunbookError):
    """A safety guard refused the action; nothing was changed."""
