"""`make run`'s supervisor with real processes: a crashed part comes back, Ctrl-C stops all.

The CLI (`python -m deployments.cli run`) on free loopback ports, stand-in runbooks, with the
Prefect server on SQLite and on PostgreSQL (`RUNBOOKS_PREFECT_DB`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.fixtures.stack import Stack, running_stack

RECEIVER, RUNNER, SERVER = "receiver", "runner", "prefect server"


def alive(pid: int) -> bool:
    """Running (a reaped pid is gone; a zombie counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def processes_of(home: Path) -> list[int]:
    """Every live process started for this stack (they all inherit RUNBOOKS_STACK_HOME)."""
    marker = f"RUNBOOKS_STACK_HOME={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
        if marker in env and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def wait_for(what: str, check: Callable[[], bool], stack: Stack, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if stack.proc.poll() is not None:
            pytest.fail(f"the CLI exited ({stack.proc.returncode}) waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout:.0f} s\n{stack.log()[-3000:]}")
        time.sleep(0.2)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def restarted(stack: Stack, part: str, old: int) -> int:
    """Wait for `part` to be started again; its new pid."""
    wait_for(f"{part} restarted", lambda: stack.pids(part)[-1] != old, stack)
    return stack.pids(part)[-1]


@pytest.mark.parametrize("prefect_db", ["sqlite", "postgres"])
def test_crashed_parts_are_restarted_alone_and_ctrl_c_stops_all_in_order(
    tmp_path: Path, prefect_db: str
) -> None:
    home = tmp_path / "stack"
    with running_stack(home, pool_size=1, prefect_db=prefect_db) as stack:
        (server,), (runner,), (receiver,) = (stack.pids(p) for p in (SERVER, RUNNER, RECEIVER))

        os.kill(receiver, signal.SIGKILL)
        receiver2 = restarted(stack, RECEIVER, receiver)
        wait_for("receiver healthy again", lambda: answers(f"{stack.receiver_url}/healthz"), stack)
        assert not alive(receiver)
        assert alive(receiver2)
        assert stack.pids(SERVER) == [server]
        assert stack.pids(RUNNER) == [runner]
        assert alive(server)
        assert alive(runner)
        assert f"receiver (pid {receiver}) exited with code -9" in stack.log()

        os.kill(runner, signal.SIGKILL)
        runner2 = restarted(stack, RUNNER, runner)
        assert not alive(runner)
        assert alive(runner2)
        assert stack.pids(SERVER) == [server]
        assert stack.pids(RECEIVER) == [receiver, receiver2]
        assert alive(receiver2)
        assert f"runner (pid {runner}) exited with code -9" in stack.log()

        # The restarted Runner reached the server (it re-applied the automation by name).
        wait_for(
            "the new Runner applied the automation",
            lambda: "automation 'crash-zombie-runs' updated" in stack.log(),
            stack,
        )
        assert stack.log().count("automation 'crash-zombie-runs' created") == 1

        # The server is restarted too. The receiver rides out its absence (its journal keeps
        # alerts); a Runner that gives up meanwhile is restarted once the server answers.
        os.kill(server, signal.SIGKILL)
        server2 = restarted(stack, SERVER, server)
        wait_for("server healthy again", lambda: answers(f"{stack.api_url}/health"), stack)
        assert stack.pids(RECEIVER) == [receiver, receiver2]
        assert alive(receiver2)
        wait_for("a Runner is running", lambda: alive(stack.pids(RUNNER)[-1]), stack)

        os.killpg(stack.proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        assert stack.proc.wait(120) == 0
        log = stack.log()
        stops = [
            log.index(f"stopping {part} (pid {pid})")
            for part, pid in (
                (RECEIVER, receiver2),
                (RUNNER, stack.pids(RUNNER)[-1]),
                (SERVER, server2),
            )
        ]
        assert stops == sorted(stops)
    assert processes_of(home) == []


def test_cli_refuses_an_exposed_server_before_starting_anything(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_SERVER_API_AUTH")}
    exposed = "0.0.0.0"  # noqa: S104 - the CLI must refuse it before binding anything
    env.update({"RUNBOOKS_STACK_HOST": exposed, "RUNBOOKS_STACK_HOME": str(tmp_path)})
    done = subprocess.run(
        [sys.executable, "-m", "deployments.cli", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "PREFECT_SERVER_API_AUTH_STRING" in done.stderr
    assert "started" not in done.stderr
