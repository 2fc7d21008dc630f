"""`make run`: the Prefect server, every runbook served, and the alert receiver, in one command.

    python -m deployments.cli run        # all three; Ctrl-C / SIGTERM stops them in order
    python -m deployments.cli join       # one more machine: Runner + receiver, no server
    python -m deployments.cli receiver   # the receiver alone (PREFECT_API_URL must be set)

`run` starts, each in its own process group:

1. `prefect server start` on SQLite under a project-local PREFECT_HOME (`.prefect/`), with
   telemetry off. `RUNBOOKS_PREFECT_DB=postgres` puts it on PostgreSQL instead (the database
   of `RUNBOOKS_PREFECT_PG_DSN`, created when missing: `deployments/prefect_db.py`); an
   explicit `PREFECT_API_DATABASE_CONNECTION_URL` wins over both.
   `PREFECT_SERVER_API_AUTH_STRING` (user:password), when set, protects the API and the UI
   and is handed to the other processes as `PREFECT_API_AUTH_STRING`; a server bound off
   loopback without it is refused;
2. `python -m deployments.serve`: the deployments and their schedules (Runner poll 1 s);
   it also creates or updates the project's automations (`deployments/automations.py`);
3. the receiver (uvicorn) with its warm pool.

Once all three answer, `python -m deployments.blocks check` compares the escalation config's
contacts with the notification blocks saved in the server: it logs the contacts nobody can
reach and leaves the `escalation-contacts` artifact (UI: Artifacts). Never fatal.

Supervision: a part that dies during start-up stops everything (a configuration problem
should not loop). After start-up, a part that exits is logged and restarted alone, after a
backoff that doubles per crash (1 s, 2 s, 4 s, ... capped at 60 s) and starts over once a
part ran 60 s before crashing. The Prefect server is restarted too: the receiver keeps
accepting alerts into its journal meanwhile, and the Runner (which exits when it loses the
API) and any other crashed part are restarted only once the server answers again. Flow
runs a crashed Runner or receiver left behind keep running and reporting; runs whose
process died are marked Crashed by the heartbeat automation.

Shutdown: receiver first (no new alerts), then the Runner, then the server; SIGTERM to each
process group, SIGKILL after a timeout, so no child outlives `make run`.

`join` runs the same Runner and receiver (own journal, token and warm pool under its own
`RUNBOOKS_STACK_HOME`) against the server at `PREFECT_API_URL`, supervised the same way; it
leaves the automations to the node that runs the server (docs/scale-out.md).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import ipaddress
import logging
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import FrameType

from pydantic import SecretStr

from deployments.prefect_db import PREFECT_DB_URL, PrefectDatabaseError, prefect_database
from deployments.prefect_runs import api_headers
from deployments.settings import POSTGRES_POOL_SIZE, ROOT, ReceiverSettings, StackSettings
from deployments.supervisor import RECEIVER, RUNNER, SERVER, Supervisor, wait_healthy

log = logging.getLogger("runbooks.cli")


def base_env(stack: StackSettings, api_url: str | None = None) -> dict[str, str]:
    """Environment shared by the processes; `api_url`: another node's server (`join`)."""
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_HOME": str(stack.home),
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_URL": api_url or f"http://{stack.host}:{stack.prefect_port}/api",
            "PREFECT_RUNNER_POLL_FREQUENCY": str(stack.poll_frequency_s),
            # Runs (Runner subprocesses and warm processes) prove they are alive this often;
            # the `crash-zombie-runs` automation marks a silent one Crashed.
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(stack.heartbeat_s),
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
    return secret_file(home / "receiver-token").read_text().strip()


def secret_file(path: Path, nbytes: int = 32) -> Path:
    """`path`, holding a random secret written once (0600, created exclusively)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):  # another process made it first: use theirs
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(nbytes) + "\n")
    return path


def approval_env(env: dict[str, str], home: Path, receiver_url: str) -> None:
    """Signed approval links for every part: a key file made once (0600), the receiver's URL.

    An operator's own `RUNBOOKS_APPROVAL_SIGNING_KEY[_FILE]` and `..._BASE_URL` win.
    """
    if not env.get("RUNBOOKS_APPROVAL_SIGNING_KEY") and not env.get(
        "RUNBOOKS_APPROVAL_SIGNING_KEY_FILE"
    ):
        env["RUNBOOKS_APPROVAL_SIGNING_KEY_FILE"] = str(
            secret_file(home / "approval-signing-key", nbytes=48)
        )
    env.setdefault("RUNBOOKS_APPROVAL_BASE_URL", receiver_url)
    where = env.get("RUNBOOKS_APPROVAL_SIGNING_KEY_FILE") or "RUNBOOKS_APPROVAL_SIGNING_KEY"
    log.info("approval links: signed with the key in %s, pointing at %s", where, receiver_url)


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything, so it counts as exposed
        return False


def check_exposure(host: str, env: Mapping[str, str]) -> None:
    """Refuse a Prefect server reachable from the network without API credentials."""
    if is_loopback(host) or env.get("PREFECT_SERVER_API_AUTH_STRING"):
        return
    raise ExposureRefused(
        f"refusing to start: the Prefect server would listen on {host!r}, which is not "
        "loopback, without PREFECT_SERVER_API_AUTH_STRING. Anyone reaching it could start, "
        "approve or cancel runbook runs. Set PREFECT_SERVER_API_AUTH_STRING='user:password' "
        "(a long random password), or keep RUNBOOKS_STACK_HOST=127.0.0.1."
    )


class ExposureRefused(RuntimeError):
    """The stack's configuration would expose the Prefect API without credentials."""


def report_contacts(env: Mapping[str, str], timeout_s: float = 120.0) -> int | None:
    """Start-up check: which escalation contacts have no saved block (log + artifact).

    Its exit code (1: some contact cannot be reached), None when it could not run. A fresh
    install has no block: better said now than found out during an incident.
    """
    cmd = [sys.executable, "-m", "deployments.blocks", "check"]
    try:
        done = subprocess.run(cmd, env=dict(env), timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("escalation contact check did not run (%s)", type(exc).__name__)
        return None
    if done.returncode:
        log.warning(
            "some escalation contacts cannot be reached: see the escalation-contacts artifact"
            " and `python -m deployments.blocks --help`"
        )
    return done.returncode


def _stack_env(
    stack: StackSettings,
    receiver: ReceiverSettings,
    pool_size: int | None,
    api_url: str | None = None,
) -> tuple[dict[str, str], str]:
    """The environment of the stack's processes, and the host runs reach the receiver at."""
    env = base_env(stack, api_url)
    env["RUNBOOKS_RECEIVER_TOKEN"] = receiver_token(stack.home)
    if stack.catalog:
        env["RUNBOOKS_RECEIVER_CATALOG"] = stack.catalog
    if pool_size is not None:
        env["RUNBOOKS_RECEIVER_POOL_SIZE"] = str(pool_size)
    # Runs ask the receiver whether their alert still fires before acting (tasks.alerts),
    # unless the operator pointed them at Alertmanager or elsewhere.
    rec_host = receiver.host
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(rec_host).is_unspecified:  # listening everywhere
            rec_host = "127.0.0.1"
    env.setdefault("RUNBOOKS_ALERTS_RECEIVER_URL", f"http://{rec_host}:{receiver.port}")
    env.setdefault("RUNBOOKS_ALERTS_RECEIVER_TOKEN", env["RUNBOOKS_RECEIVER_TOKEN"])
    approval_env(env, stack.home, f"http://{rec_host}:{receiver.port}")
    return env, rec_host


def _serve_cmd(
    stack: StackSettings, receiver: ReceiverSettings, pool_size: int | None, automations: bool
) -> list[str]:
    """The Runner's command: every deployment served; no prefetch while a warm pool runs."""
    serve_cmd = [sys.executable, "-m", "deployments.serve", "--limit", str(stack.runner_limit)]
    if stack.catalog:
        serve_cmd += ["--catalog", stack.catalog]
    if (pool_size if pool_size is not None else receiver.pool_size) > 0:
        serve_cmd += ["--prefetch-s", "0"]
    if not automations:
        serve_cmd += ["--no-automations"]
    return serve_cmd


def _database_env(stack: StackSettings, env: dict[str, str]) -> None:
    """Point the server at its database (RUNBOOKS_PREFECT_DB) and say which, password-free."""
    db = prefect_database(
        stack.prefect_db, stack.prefect_pg_dsn.get_secret_value(), env, str(stack.home)
    )
    if db.url is not None:
        env[PREFECT_DB_URL] = db.url
    log.info("Prefect database: %s", db.shown)


def default_pool_size(
    stack: StackSettings, pool_size: int | None, environ: Mapping[str, str]
) -> int | None:
    """The warm pool's size: `--pool-size`, else the operator's setting, else more
    processes on PostgreSQL, which takes their writes at once (`POSTGRES_POOL_SIZE`)."""
    if pool_size is not None or "RUNBOOKS_RECEIVER_POOL_SIZE" in environ:
        return pool_size
    return POSTGRES_POOL_SIZE if stack.prefect_db == "postgres" else None


def run_stack(
    stack: StackSettings,
    receiver: ReceiverSettings,
    pool_size: int | None,
    join_api_url: str | None = None,
) -> int:
    """Start server, Runner and receiver; restart a crashed one; stop all on a signal.

    With `join_api_url` (`join`): no server here, the Runner and the receiver use that one.
    """
    try:
        if join_api_url is None:
            check_exposure(stack.host, os.environ)
    except ExposureRefused as exc:
        log.error("%s", exc)
        return 2
    stack.home.mkdir(parents=True, exist_ok=True)
    pool_size = default_pool_size(stack, pool_size, os.environ)
    env, rec_host = _stack_env(stack, receiver, pool_size, join_api_url)
    if join_api_url is None:
        try:
            _database_env(stack, env)
        except PrefectDatabaseError as exc:
            log.error("%s", exc)
            return 2
    api_url = env["PREFECT_API_URL"]
    sup = Supervisor(stack, env)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        sup.stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    try:
        if join_api_url is None:
            server = sup.add(
                SERVER,
                [
                    sys.executable, "-m", "prefect", "server", "start",
                    "--host", stack.host, "--port", str(stack.prefect_port),
                ],
            )  # fmt: skip
            assert server.proc is not None
            api_headers_ = api_headers(env.get("PREFECT_API_AUTH_STRING"))
            if not wait_healthy(
                f"{api_url}/health",
                api_headers_,
                stack.startup_timeout_s,
                server.proc,
                "Prefect server",
                lambda: sup.stopping,
            ):
                return 0
            log.info("Prefect UI: http://%s:%d", stack.host, stack.prefect_port)
        elif not sup.server_healthy():
            log.error("the Prefect server at %s does not answer: stopping", api_url)
            return 1
        # The automations are the server node's: two nodes writing them at once could
        # create one twice (they are matched by name).
        serve_cmd = _serve_cmd(stack, receiver, pool_size, automations=join_api_url is None)
        # The receiver must answer Alertmanager within its timeout even while a burst of runs
        # imports and executes: the Runner and its run subprocesses yield the CPU to it.
        runner = sup.add(RUNNER, ["nice", "-n", str(stack.runner_nice), *serve_cmd])
        rec = sup.add(RECEIVER, [sys.executable, "-m", "deployments.cli", "receiver"])
        assert rec.proc is not None and runner.proc is not None
        # Start-up: a part that dies now has a configuration problem (bad routing table,
        # port in use): say so and stop, rather than restart it in a loop.
        if not wait_healthy(
            f"http://{rec_host}:{receiver.port}/healthz",
            {},
            stack.startup_timeout_s,
            rec.proc,
            "receiver",
            lambda: sup.stopping,
        ):
            return 0
        if runner.proc.poll() is not None:
            raise RuntimeError(f"runner exited with code {runner.proc.returncode} during start-up")
        log.info(
            "alert receiver: http://%s:%d/alerts (bearer token in %s or RUNBOOKS_RECEIVER_TOKEN)",
            receiver.host,
            receiver.port,
            stack.home / "receiver-token",
        )
        report_contacts(env)
        sup.watch()
        return 0
    except RuntimeError as exc:
        log.error("%s: stopping everything", exc)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sup.stop_all()


def run_receiver(settings: ReceiverSettings) -> None:
    """The receiver process: validate the routing table, start the warm pool, serve."""
    import uvicorn
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

    from deployments.approval_links import install_redaction
    from deployments.catalog import by_name, load_catalog
    from deployments.receiver import create_app
    from deployments.routing import load_routing
    from deployments.warm_pool import WarmPool

    runbooks = load_catalog(settings.catalog)
    table = load_routing(settings.routing_file, runbooks)  # raises: start-up refused
    api_url = PREFECT_API_URL.value()
    if not api_url:
        raise SystemExit("PREFECT_API_URL is not set")
    index = by_name(runbooks)
    routed = {index[r.runbook].deployment: index[r.runbook].entrypoint for r in table.routes}
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
    # The access log is off, but an operator may turn it on (or run us under `uvicorn`):
    # its lines print each path, and `/approvals/<token>` must not reach a log.
    install_redaction()
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
    join = sub.add_parser("join", help="Runner + receiver against PREFECT_API_URL's server")
    join.add_argument("--pool-size", type=int, default=None, help="warm processes (0 = none)")
    sub.add_parser("receiver", help="the webhook receiver only")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run_stack(StackSettings(), ReceiverSettings(), args.pool_size)
    if args.command == "join":
        api_url = os.environ.get("PREFECT_API_URL")
        if not api_url:
            parser.error("join: set PREFECT_API_URL to the Prefect server's API")
        return run_stack(StackSettings(), ReceiverSettings(), args.pool_size, api_url)
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
