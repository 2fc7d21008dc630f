"""`make run`'s start-up rules: restart backoff, no exposed Prefect API, a sane zombie window."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from deployments.cli import ExposureRefused, check_exposure
from deployments.settings import StackSettings
from deployments.supervisor import Part, Supervisor, restart_delay

ANY_ADDRESS = "0.0.0.0"  # noqa: S104 - the exposure under test, never bound here


def test_restart_backoff_doubles_and_is_capped() -> None:
    delays = [restart_delay(n, 1.0, 30.0) for n in range(1, 8)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


@pytest.mark.parametrize("host", [ANY_ADDRESS, "::", "192.168.1.20", "prefect.internal"])
def test_server_off_loopback_without_api_auth_is_refused(host: str) -> None:
    with pytest.raises(ExposureRefused, match="PREFECT_SERVER_API_AUTH_STRING"):
        check_exposure(host, {})


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_loopback_server_needs_no_api_auth(host: str) -> None:
    check_exposure(host, {})


def test_server_off_loopback_with_api_auth_starts() -> None:
    check_exposure(ANY_ADDRESS, {"PREFECT_SERVER_API_AUTH_STRING": "admin:long-random"})


def test_zombie_window_must_span_two_heartbeats() -> None:
    with pytest.raises(ValueError, match="at least twice"):
        StackSettings(heartbeat_s=30, zombie_after_s=45)


def test_supervisor_backs_off_per_crash_in_a_row_and_starts_over_after_a_stable_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stack = StackSettings(
        home=tmp_path, restart_backoff_s=1, restart_backoff_max_s=4, restart_stable_s=30
    )
    sup = Supervisor(stack, {"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    part = Part("receiver", [sys.executable, "-c", "raise SystemExit(3)"])
    delays = []
    for ran_s in (0.1, 0.1, 0.1, 0.1, 31.0, 0.1):  # how long each incarnation "ran"
        sup.launch(part)
        assert part.proc is not None
        part.proc.wait(30)
        now = part.started_at + ran_s
        sup.on_exit(part, now)
        delays.append(part.restart_at - now)
    assert delays == [1.0, 2.0, 4.0, 4.0, 1.0, 2.0]
    assert part.proc is None
    assert "receiver (pid" in caplog.text
    assert "exited with code 3" in caplog.text
