"""`make run`: the Prefect server, every runbook served, and the alert receiver, in one command.

    python -m deployments.cli run        # all three; Ctrl-C / SIGTERM stops them in order
    python -m deployments.cli receiver   # the receiver alone (PREFECT_API_URL must be set)

`run` starts, each in its own process group:

1. `prefect server start` on SQLite under a project-local PREFECT_HOME (`.prefect/`), with
   telemetry off. A Postgres-backed server is one setting away: export
   `PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://user:pw@host:5432/prefect`.
   `PREFECT_SERVER_API_AUTH_STRING` (user:password), when set, protects the API and the UI
   and is handed to the other processes as `PREFECT_API_AUTH_STRING`;
2. `python -m deployments.serve`: the deployments and their schedules (Runner poll 1 s);
3. the receiver (uvicorn) with its warm pool.

Shutdown: receiver first (no new alerts), then the Runner, then the server; SIGTERM to each
process group, SIGKILL after a timeout, so no child outlives `make run`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import httpx
from pydantic import SecretStr

from deployments.intake import api_headers
from deployments.settings import ROOT, ReceiverSettings, StackSettings

log = logging.getLogger("runbooks.cli")

STOP_TIMEOUT_S = 20.0


def base_env(stack: StackSettings) -> dict[str, str]:
    """Environment shared by the three processes."""
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_HOME": str(stack.home),
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": f"http://{stack.host}:{stack.prefect_port}/api",
            "PREFECT_RUNNER_POLL_FREQUENCY": str(stack.poll_frequency_s),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        }
    )
    auth = env.get("PREFECT_SERVER_API_AUTH_STRING")
    if auth:
        env["PREFECT_API_AUTH_STRING"] = auth
    return env


def receiver_token(home: Path) -> str:
    """The receiver's bearer token: RUNBOOKS_RECEIVER_TOKEN, else one generated once, 0600."""
    given = os.environ.get("RUNBOOKS_RECEIVER_TOKEN")
    if given:
        return given
    path = home / "receiver-token"
    if path.exists():
        return path.read_text().strip()
    home.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


def wait_healthy(
    api_url: str, auth: str | None, timeout_s: float, proc: subprocess.Popen[bytes]
) -> None:
    """Poll `/health` until the server answers; fail early if it exited."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Prefect server exited with code {proc.returncode}")
        try:
            r = httpx.get(f"{api_url}/health", headers=api_headers(auth), timeout=2)
            if r.status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"Prefect server not healthy after {timeout_s:.0f} s")


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
    # Grandchildren (flow runs, warm processes) may remain in the group: end them too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_stack(stack: StackSettings, receiver: ReceiverSettings, pool_size: int | None) -> int:
    """Start server, Runner and receiver; block until a signal or a child dies."""
    stack.home.mkdir(parents=True, exist_ok=True)
    env = base_env(stack)
    env["RUNBOOKS_RECEIVER_TOKEN"] = receiver_token(stack.home)
    if stack.catalog:
        env["RUNBOOKS_RECEIVER_CATALOG"] = stack.catalog
    if pool_size is not None:
        env["RUNBOOKS_RECEIVER_POOL_SIZE"] = str(pool_size)
    api_url = env["PREFECT_API_URL"]

    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        log.info("signal %d: shutting down", signum)
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True)
        children.append((name, proc))
        log.info("started %s (pid %d)", name, proc.pid)
        return proc

    try:
        server = spawn(
            "prefect server",
            [
                sys.executable, "-m", "prefect", "server", "start",
                "--host", stack.host, "--port", str(stack.prefect_port),
            ],
        )  # fmt: skip
        wait_healthy(api_url, env.get("PREFECT_API_AUTH_STRING"), stack.startup_timeout_s, server)
        log.info("Prefect UI: http://%s:%d", stack.host, stack.prefect_port)
        serve_cmd = [sys.executable, "-m", "deployments.serve", "--limit", str(stack.runner_limit)]
        if stack.catalog:
            serve_cmd += ["--catalog", stack.catalog]
        if (pool_size if pool_size is not None else receiver.pool_size) > 0:
            serve_cmd += ["--prefetch-s", "0"]
        # The receiver must answer Alertmanager within its timeout even while a burst of runs
        # imports and executes: the Runner and its run subprocesses yield the CPU to it.
        spawn("runner", ["nice", "-n", str(stack.runner_nice), *serve_cmd])
        spawn("receiver", [sys.executable, "-m", "deployments.cli", "receiver"])
        log.info(
            "alert receiver: http://%s:%d/alerts (bearer token in %s or RUNBOOKS_RECEIVER_TOKEN)",
            receiver.host,
            receiver.port,
            stack.home / "receiver-token",
        )
        while not stopping:
            for name, proc in children:
                if proc.poll() is not None:
                    log.error("%s exited with code %s: stopping everything", name, proc.returncode)
                    stopping = True
                    break
            time.sleep(0.3)
        failed = any(p.returncode not in (None, 0) for _, p in children)
        return 1 if failed else 0
    except RuntimeError as exc:
        log.error("%s", exc)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for name, proc in reversed(children):
            stop(proc, name)


def run_receiver(settings: ReceiverSettings) -> None:
    """The receiver process: validate the routing table, start the warm pool, serve."""
    import uvicorn
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

    from deployments.catalog import by_deployment, load_catalog
    from deployments.receiver import create_app
    from deployments.routing import load_routing
    from deployments.warm_pool import WarmPool

    runbooks = load_catalog(settings.catalog)
    table = load_routing(settings.routing_file, runbooks)  # raises: start-up refused
    api_url = PREFECT_API_URL.value()
    if not api_url:
        raise SystemExit("PREFECT_API_URL is not set")
    index = by_deployment(runbooks)
    routed = {r.deployment: index[r.deployment].entrypoint for r in table.routes}
    pool = None
    if settings.pool_size > 0 and routed:
        pool = WarmPool(routed, settings.pool_size, env={"PREFECT_API_URL": api_url})
        pool.start()
    app = create_app(
        settings,
        table,
        runbooks,
        api_url=api_url,
        api_auth_string=PREFECT_API_AUTH_STRING.value(),
        pool=pool,
    )
    # Everything imported so far (Prefect, FastAPI, the runbooks) lives as long as the
    # process: keep it out of the cyclic GC, whose full passes over it paused the event loop
    # for 100+ ms in the storm bench.
    gc.collect()
    gc.freeze()
    try:
        # Our own log lines record every alert's fate; per-request access lines add nothing.
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=False)
    finally:
        if pool is not None:
            pool.close()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API call otherwise
    parser = argparse.ArgumentParser(prog="deployments.cli", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="server + deployments + receiver")
    run.add_argument("--pool-size", type=int, default=None, help="warm processes (0 = none)")
    sub.add_parser("receiver", help="the webhook receiver only")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run_stack(StackSettings(), ReceiverSettings(), args.pool_size)
    settings = ReceiverSettings()
    if settings.journal_path is None:
        settings = settings.model_copy(
            update={"journal_path": StackSettings().home / "receiver-journal.sqlite3"}
        )
    if settings.token is None and not settings.basic_user:
        settings = settings.model_copy(
            update={"token": SecretStr(receiver_token(StackSettings().home))}
        )
    run_receiver(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
