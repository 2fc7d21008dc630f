"""The one retry policy: transient errors are retried with backoff, the others are not."""

from __future__ import annotations

import pytest
from prefect import flow, task

from tasks.errors import PermanentError, SafetyViolation, TransientError
from tasks.retry import RETRY_TRANSIENT
from tasks.settings import RetrySettings

pytestmark = pytest.mark.usefixtures("prefect_api")


def make_task(errors: list[Exception]):
    calls: list[int] = []

    @task(**RETRY_TRANSIENT)
    def flaky() -> int:
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return len(calls)

    @flow
    def run() -> int:
        return flaky()

    return run, calls


def test_transient_errors_are_retried_until_success() -> None:
    run, calls = make_task([TransientError("refused"), TransientError("timeout")])
    assert run() == 3
    assert len(calls) == 3


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


def test_policy_shape() -> None:
    assert RETRY_TRANSIENT["retries"] == RetrySettings().attempts
    delays = RETRY_TRANSIENT["retry_delay_seconds"](3)
    assert delays == [RetrySettings().backoff_s * 2**i for i in range(3)]
