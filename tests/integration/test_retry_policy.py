"""The two retry policies: transient errors are retried with backoff, the others are not."""

from __future__ import annotations

from typing import Any

import pytest
from prefect import flow, task

from tasks.errors import PermanentError, SafetyViolation, TransientError
from tasks.retry import RETRY_IDEMPOTENT_WRITE, RETRY_READ
from tasks.settings import RetrySettings

pytestmark = pytest.mark.usefixtures("prefect_api")


def make_task(errors: list[Exception], policy: dict[str, Any] = RETRY_READ):
    calls: list[int] = []

    @task(**policy)
    def flaky() -> int:
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return len(calls)

    @flow
    def run() -> int:
        return flaky()

    return run, calls


@pytest.mark.parametrize("policy", [RETRY_READ, RETRY_IDEMPOTENT_WRITE])
def test_transient_errors_are_retried_until_success(policy: dict[str, Any]) -> None:
    run, _calls = make_task([TransientError("refused"), TransientError("timeout")], policy)
    assert run() == 3


def test_transient_errors_stop_after_the_configured_attempts() -> None:
    run, calls = make_task([TransientError(str(i)) for i in range(10)])
    with pytest.raises(TransientError):
        run()
    assert len(calls) == 1 + RetrySettings().attempts


@pytest.mark.parametrize("error", [PermanentError("403"), SafetyViolation("guard"), KeyError("x")])
def test_other_errors_are_not_retried(error: Exception) -> None:
    run, calls = make_task([error])
    with pytest.raises(type(error)):
        run()
    assert len(calls) == 1


@pytest.mark.parametrize("policy", [RETRY_READ, RETRY_IDEMPOTENT_WRITE])
def test_policy_shape(policy: dict[str, Any]) -> None:
    assert policy["retries"] == RetrySettings().attempts
    delays = policy["retry_delay_seconds"](3)
    assert delays == [RetrySettings().backoff_s * 2**i for i in range(3)]
