"""`make run`'s supervision: start the parts, restart a crashed one with backoff, stop all.

A part that exits after start-up is restarted alone, after a backoff that doubles per crash
and starts over once it ran `restart_stable_s`; the Runner and the receiver wait for the
Prefect server to answer before they restart. Shutdown stops each process group with
SIGTERM, then SIGKILL after a timeout, so no child outlives `make run`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from deployments.prefect_runs import api_headers
from deployments.settings import ROOT, StackSettings

log = logging.getLogger("runbooks.cli")

STOP_TIMEOUT_S = 20.0


def wait_healthy(
    url: str,
    headers: dict[str, str],
    timeout_s: float,
    proc: subprocess.Popen[bytes],
    name: str,
    should_stop: Callable[[], bool] = lambda: False,
) -> bool:
    """Poll `url` until it answers 200; False if asked to stop; fail early if `proc` exited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if should_stop():
            return False
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode} during start-up")
        try:
            r = httpx.get(url, headers=headers, timeout=2)
            if r.status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{name} not healthy after {timeout_s:.0f} s")


def stop(proc: subprocess.Popen[bytes], name: str, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the child's process group, then SIGKILL it if it does not go."""
    if proc.poll() is None:
        log.info("stopping %s (pid %d)", name, proc.pid)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s: killing", name, timeout_s)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # Grandchildren (flow runs, warm processes) may remain in the group: end them too.
    stop_group(proc.pid, name, timeout_s)


def stop_group(pgid: int, name: str, timeout_s: float) -> None:
    """End what is left in a process group: flow runs and warm processes of a part."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)  # raises ProcessLookupError once the group is empty
            time.sleep(0.1)
        log.warning("processes left by %s did not stop in %.0f s: killing", name, timeout_s)
        os.killpg(pgid, signal.SIGKILL)


def group_alive(pgid: int) -> bool:
    """True while any process of the group exists."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else: not ours any more
        return False
    return True


def restart_delay(crashes: int, first_s: float, max_s: float) -> float:
    """Exponential backoff: first_s, 2*first_s, 4*first_s, ... capped at max_s."""
    return float(min(max_s, first_s * 2 ** max(0, crashes - 1)))


@dataclass
class Part:
    """One supervised process of `make run` and its crash history."""

    name: str
    cmd: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    #: Crashes in a row, each within `restart_stable_s` of its start; drives the backoff.
    crashes: int = 0
    restart_at: float = 0.0
    #: Due for a restart but waiting for the Prefect server.
    waiting: bool = False
    #: Process groups of earlier incarnations whose runs were left to finish.
    leftovers: list[int] = field(default_factory=list)


class Supervisor:
    """Starts the parts, restarts a crashed one with backoff, stops all in order."""

    def __init__(self, stack: StackSettings, env: dict[str, str]) -> None:
        self.stack = stack
        self.env = env
        self.parts: list[Part] = []
        self.stopping = False
        self.health_url = f"{env['PREFECT_API_URL']}/health"
        self.headers = api_headers(env.get("PREFECT_API_AUTH_STRING"))

    def server_healthy(self) -> bool:
        try:
            return httpx.get(self.health_url, headers=self.headers, timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def launch(self, part: Part) -> None:
        part.proc = subprocess.Popen(part.cmd, env=self.env, cwd=ROOT, start_new_session=True)
        part.started_at = time.monotonic()
        log.info("started %s (pid %d)", part.name, part.proc.pid)

    def add(self, name: str, cmd: list[str]) -> Part:
        part = Part(name, cmd)
        self.parts.append(part)
        self.launch(part)
        return part

    def on_exit(self, part: Part, now: float) -> None:
        """Log a crash and schedule the restart."""
        assert part.proc is not None
        proc, ran_s = part.proc, now - part.started_at
        # A part that ran stably before crashing starts over at the shortest delay.
        part.crashes = 1 if ran_s >= self.stack.restart_stable_s else part.crashes + 1
        delay = restart_delay(
            part.crashes, self.stack.restart_backoff_s, self.stack.restart_backoff_max_s
        )
        log.error(
            "%s (pid %d) exited with code %s after %.1f s: restarting in %.1f s "
            "(crash %d in a row)",
            part.name, proc.pid, proc.returncode, ran_s, delay, part.crashes,
        )  # fmt: skip
        if part.name == SERVER:
            # A surviving server child would hold the port and the database: end the group.
            stop_group(proc.pid, part.name, STOP_TIMEOUT_S)
        else:
            # Flow runs it started are separate processes that report to Prefect and keep
            # their heartbeats: let them finish rather than cut a remediation in half. They are
            # stopped with everything else on Ctrl-C.
            part.leftovers.append(proc.pid)
        part.proc = None
        part.restart_at = now + delay

    def watch(self) -> None:
        """Until a signal: restart every part that exits, after its backoff."""
        while not self.stopping:
            now = time.monotonic()
            for part in self.parts:
                # Forget emptied groups at once: their number could be reused by a stranger.
                part.leftovers = [g for g in part.leftovers if group_alive(g)]
                if part.proc is not None and part.proc.poll() is not None:
                    self.on_exit(part, now)
                if part.proc is None and now >= part.restart_at and not self.stopping:
                    # The Runner and the receiver need the API at start: while the server is
                    # down, starting them would only crash them again.
                    if part.name != SERVER and not self.server_healthy():
                        if not part.waiting:
                            log.warning("%s waits for the Prefect server to restart", part.name)
                            part.waiting = True
                        continue
                    part.waiting = False
                    self.launch(part)
            time.sleep(0.2)

    def stop_all(self) -> None:
        """Receiver first (no new alerts), then the Runner, then the server; leftovers too."""
        for part in reversed(self.parts):
            if part.proc is not None:
                stop(part.proc, part.name)
            for pgid in part.leftovers:
                stop_group(pgid, f"an earlier {part.name}", STOP_TIMEOUT_S)


SERVER, RUNNER, RECEIVER = "prefect server", "runner", "receiver"
