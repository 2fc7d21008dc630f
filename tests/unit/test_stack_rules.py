"""`make run`'s start-up rules: restart backoff, no exposed Prefect API, a sane zombie window."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from deployments.cli import ExposureRefused, _serve_cmd, check_exposure, default_pool_size, main
from deployments.settings import POSTGRES_POOL_SIZE, ReceiverSettings, StackSettings
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


def test_join_needs_the_servers_api_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(SystemExit) as exited:
        main(["join"])
    assert exited.value.code == 2
    assert "set PREFECT_API_URL" in capsys.readouterr().err


def test_join_against_a_server_that_does_not_answer_starts_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # discard port: refused
    monkeypatch.setenv("RUNBOOKS_STACK_HOME", str(tmp_path))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert main(["join"]) == 1
    finally:  # the CLI ignores both signals on its way out: give pytest its Ctrl-C back
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert "does not answer" in caplog.text
    assert "started" not in caplog.text


def test_join_serves_without_touching_the_automations_run_applies_them() -> None:
    receiver = ReceiverSettings()
    stack = StackSettings()
    assert "--no-automations" in _serve_cmd(stack, receiver, None, automations=False)
    assert "--no-automations" not in _serve_cmd(stack, receiver, None, automations=True)


@pytest.mark.parametrize(
    ("db", "given", "environ", "expected"),
    [
        ("sqlite", None, {}, None),  # the receiver's own default (4)
        ("postgres", None, {}, POSTGRES_POOL_SIZE),
        ("postgres", 2, {}, 2),  # --pool-size wins
        ("postgres", None, {"RUNBOOKS_RECEIVER_POOL_SIZE": "3"}, None),  # the operator's wins
    ],
)
def test_the_warm_pool_is_larger_on_postgresql_unless_set(
    db: str, given: int | None, environ: dict[str, str], expected: int | None
) -> None:
    stack = StackSettings(prefect_db=db)
    assert default_pool_size(stack, given, environ) == expected
