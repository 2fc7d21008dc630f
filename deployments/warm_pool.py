"""A pool of pre-started processes that already imported the runbooks and Prefect.

Why: the Runner starts every flow run in a fresh subprocess (~2 s of imports here) after
polling for it (10 s by default). An alert should not wait for either. The receiver creates
a normal deployment flow run (state Scheduled, a short grace ahead) and hands its id to an
idle warm process, which claims it by proposing Pending through Prefect's orchestration and
executes it in-process with Prefect's own engine (`prefect.flow_engine.run_flow`), exactly as
`prefect flow-run execute` would. The run stays a deployment run: same UI page, logs, tags,
artifacts, deployment concurrency limit (applied on the Pending transition).

No alert is lost: if the pool is down, or the claim is refused (the Runner got it first, or
the concurrency limit is full), the run simply stays Scheduled and the Runner starts it.
Orchestration lets exactly one claimer move Scheduled -> Pending.

When every process is busy, a run waits in the pool's queue (up to `max_queue`) and goes to
the next process that frees up. Why not hand it to the Runner at once: under an alert storm
the Runner starts one fresh subprocess per run, each paying seconds of imports on the same
cores, so 100 runs took minutes; warm processes reuse their imports and drain the queue in
seconds. The Runner remains the fallback: a queued run still unclaimed when its scheduled
time (the receiver's grace) has passed is the Runner's to take, and the atomic claim
decides who runs it.

A process executes one run at a time and is reused (importing Prefect and the runbooks costs
several CPU-seconds, which a busy incident machine should not pay per alert); it is replaced
after `MAX_RUNS_PER_PROCESS` runs (200). A process that dies mid-run gets its run marked Crashed
and is replaced; a run cancelled in the UI gets its process terminated, the run marked
Cancelled, and a fresh process started.

The pool calls Prefect internals (the engine's `run_flow`, `propose_state_sync`, ...). At
start it checks they exist with the parameters it passes (`missing_internals`); if a Prefect
upgrade changed them, it logs why and stays disabled: the Runner executes every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import inspect
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any
from uuid import UUID

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

log = logging.getLogger("runbooks.warm_pool")

_CANCEL_CHECK_S = 2.0
#: Recycle a process after this many runs: bounds any slow leak of module state. Measured:
#: a process holds 112 MiB once ready and grows ~0.3 MiB per db-pool-exhausted run after the
#: first few, so 200 runs cost ~70 MiB; a storm of 100 alerts on 4 processes recycles none
#: (a recycle costs seconds of imports on the cores the storm needs).
MAX_RUNS_PER_PROCESS = 200


#: The Prefect internals a warm process calls: (module, attribute, keyword names it passes).
#: Private or semi-private in Prefect, so checked at start-up (`missing_internals`).
INTERNALS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("prefect.flow_engine", "run_flow", ("flow", "flow_run", "return_type", "error_logger")),
    ("prefect.utilities.engine", "propose_state_sync", ("client", "state", "flow_run_id")),
    ("prefect.logging.loggers", "flow_run_logger", ("flow_run",)),
    ("prefect.exceptions", "Abort", ()),
    ("prefect.states", "Pending", ("state_details",)),
    ("prefect.client.orchestration", "get_client", ("sync_client",)),
    ("deployments.catalog", "_load_flow", ("entrypoint",)),
)


def missing_internals() -> list[str]:
    """What the warm processes rely on and this Prefect lacks; empty when all is there."""
    problems = []
    for module_name, attr, keywords in INTERNALS:
        where = f"{module_name}.{attr}"
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{where} is missing ({type(exc).__name__})")
            continue
        if not keywords:
            continue
        try:
            params = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            problems.append(f"{where} has no inspectable signature")
            continue
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        absent = [k for k in keywords if k not in params and not takes_any]
        if absent:
            problems.append(f"{where} no longer takes {', '.join(absent)}")
    try:
        from prefect.client.schemas.objects import StateDetails

        if "scheduled_time" not in StateDetails.model_fields:
            problems.append("StateDetails.scheduled_time is missing (the claim relies on it)")
    except ImportError:
        problems.append("prefect.client.schemas.objects.StateDetails is missing")
    return problems


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    ready: bool = False
    run_id: UUID | None = None
    #: Set when the run was cancelled and the process terminated on purpose.
    finished: bool = False
    #: Runs handed to it: it exits after the pool's `max_runs`, so it gets no more.
    runs: int = 0


class WarmPool:
    """`size` warm processes; `try_submit` never blocks and says whether one took the run."""

    def __init__(
        self,
        entrypoints: dict[str, str],
        size: int,
        env: dict[str, str] | None = None,
        max_queue: int = 500,
        max_runs: int = MAX_RUNS_PER_PROCESS,
    ) -> None:
        self._entrypoints = dict(entrypoints)  # deployment name -> flow entrypoint
        self._size = size
        self._max_queue = max_queue
        self._max_runs = max_runs
        self._queue: deque[tuple[UUID, str]] = deque()
        self._env = dict(env or {})
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._monitor: threading.Thread | None = None
        self._last_cancel_check = 0.0
        self._client: SyncPrefectClient | None = None
        #: Why the pool refused to start (Prefect internals changed); None when it runs.
        self.disabled_reason: str | None = None

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Check Prefect's internals, start the processes and the monitor (returns at once)."""
        problems = missing_internals()
        if problems:
            # A Prefect upgrade changed what the warm processes call: executing runs with it
            # could fail mid-remediation. The Runner starts every run instead (slower, safe).
            self.disabled_reason = "; ".join(problems)
            log.error("warm pool disabled, the Runner executes every run: %s", self.disabled_reason)
            self._closing.set()
            return
        with self._lock:
            for _ in range(self._size):
                self._workers.append(self._spawn())
        self._monitor = threading.Thread(target=self._watch, name="warm-pool", daemon=True)
        self._monitor.start()

    def wait_ready(self, timeout: float) -> bool:
        """Block until every process finished importing (tests and benches)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.idle() >= self._size:
                return True
            time.sleep(0.05)
        return False

    def close(self, timeout: float = 10.0) -> None:
        """Stop idle processes; running remediations get SIGTERM then, after `timeout`, KILL."""
        self._closing.set()
        with self._lock:
            workers = list(self._workers)
        for w in workers:
            if w.run_id is None:
                with contextlib.suppress(OSError):
                    w.conn.send(None)
        deadline = time.monotonic() + timeout
        for w in workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.terminate()
                w.process.join(2)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(1)
        if self._monitor is not None:
            self._monitor.join(2)

    # -- dispatch --------------------------------------------------------------------
    def idle(self) -> int:
        with self._lock:
            return sum(1 for w in self._workers if self._free(w))

    def _free(self, w: _Worker) -> bool:
        """Ready, not running anything, and under its run limit (so it will take a run)."""
        return w.ready and w.run_id is None and w.runs < self._max_runs

    def handles(self, deployment: str) -> bool:
        return deployment in self._entrypoints

    def accepting(self) -> bool:
        """Whether runs handed over now will be executed here (idle, or queued)."""
        if self._closing.is_set():
            return False
        with self._lock:
            alive = any(w.process.is_alive() for w in self._workers)
            return alive and len(self._queue) < self._max_queue

    def try_submit(self, run_id: UUID, deployment: str) -> bool:
        """Hand the run to an idle process, or queue it; False = leave it to the Runner."""
        entrypoint = self._entrypoints.get(deployment)
        if entrypoint is None or self._closing.is_set():
            return False
        with self._lock:
            if self._send_to_idle(run_id, entrypoint):
                return True
            alive = any(w.process.is_alive() for w in self._workers)
            if not alive or len(self._queue) >= self._max_queue:
                return False
            self._queue.append((run_id, entrypoint))
            return True

    def _send_to_idle(self, run_id: UUID, entrypoint: str) -> bool:
        """With the lock held: give the run to an idle process, if there is one."""
        for w in self._workers:
            if self._free(w) and w.process.is_alive():
                try:
                    w.conn.send((str(run_id), entrypoint))
                except OSError:
                    w.ready = False
                    continue
                w.run_id = run_id
                w.runs += 1
                return True
        return False

    def _dispatch(self) -> None:
        """Queued runs to processes that are idle now (after a run ended, or a process is new)."""
        with self._lock:
            while self._queue and not self._closing.is_set():
                run_id, entrypoint = self._queue[0]
                if not self._send_to_idle(run_id, entrypoint):
                    return
                self._queue.popleft()

    # -- monitor ---------------------------------------------------------------------
    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(
            target=worker_main,
            args=(child, sorted(set(self._entrypoints.values())), self._env, self._max_runs),
            name="runbooks-warm",
            daemon=False,
        )
        process.start()
        child.close()
        return _Worker(process=process, conn=parent)

    def _watch(self) -> None:
        while not (self._closing.is_set() and not self._alive()):
            with self._lock:
                conns = {w.conn: w for w in self._workers}
                sentinels = {w.process.sentinel: w for w in self._workers}
            ready = wait([*conns, *sentinels], timeout=0.5) if conns else []
            for obj in ready:
                if obj in conns:
                    self._receive(conns[obj])
                else:
                    self._reap(sentinels[obj])  # type: ignore[index]
            if time.monotonic() - self._last_cancel_check > _CANCEL_CHECK_S:
                self._last_cancel_check = time.monotonic()
                self._check_cancellations()
            if self._closing.is_set() and not ready:
                time.sleep(0.05)

    def _alive(self) -> bool:
        with self._lock:
            return any(w.process.is_alive() for w in self._workers)

    def _receive(self, w: _Worker) -> None:
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            self._reap(w)
            return
        if msg == "ready":
            with self._lock:
                w.ready = True
            self._dispatch()
        elif isinstance(msg, tuple) and msg[0] == "done":
            log.info("warm run %s finished: %s", msg[1], msg[2])
            with self._lock:
                if not w.finished:  # not cancelled meanwhile: the process takes the next run
                    w.run_id = None
            self._dispatch()

    def _reap(self, w: _Worker) -> None:
        with self._lock:
            if w not in self._workers:
                return
            self._workers.remove(w)
        w.process.join(1)
        try:
            while w.conn.poll():  # a "done" may sit in the pipe behind the exit
                msg = w.conn.recv()
                if isinstance(msg, tuple) and msg[0] == "done":
                    w.run_id = None
        except (EOFError, OSError):
            pass
        w.conn.close()
        if w.run_id is not None and not w.finished:
            log.error("warm process for run %s exited (%s)", w.run_id, w.process.exitcode)
            _mark_crashed(w.run_id, f"warm process exited with code {w.process.exitcode}")
        if not self._closing.is_set():
            with self._lock:
                self._workers.append(self._spawn())

    def _check_cancellations(self) -> None:
        with self._lock:
            busy = {w.run_id: w for w in self._workers if w.run_id is not None and not w.finished}
        if not busy:
            return
        try:
            if self._client is None:
                # One client for the thread's life: building one costs ~0.1-0.3 s of CPU under
                # the GIL, which stalled the receiver's event loop at every check.
                from prefect.client.orchestration import get_client

                self._client = get_client(sync_client=True)
                self._client.__enter__()
            cancelling = _cancelling_runs(self._client, [r for r in busy if r is not None])
        except Exception:
            log.warning("could not check for cancelled runs", exc_info=True)
            return
        for run_id in cancelling:
            w = busy[run_id]
            log.warning("run %s cancelled in Prefect: terminating its process", run_id)
            w.finished = True
            w.process.terminate()
            _mark_cancelled(run_id)


def _cancelling_runs(client: SyncPrefectClient, run_ids: list[UUID]) -> list[UUID]:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=run_ids),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.CANCELLING])),
        )
    )
    return [r.id for r in runs]


def _mark_crashed(run_id: UUID, message: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(run_id)
            if run.state is None or not run.state.is_final():
                client.set_flow_run_state(run_id, Crashed(message=message), force=True)
    except Exception:
        log.exception("could not mark run %s crashed", run_id)


def _mark_cancelled(run_id: UUID) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    try:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(
                run_id, Cancelled(message="cancelled; warm process terminated"), force=True
            )
    except Exception:
        log.exception("could not mark run %s cancelled", run_id)


# -- inside a warm process -----------------------------------------------------------
def worker_main(
    conn: Connection,
    entrypoints: list[str],
    env: dict[str, str],
    max_runs: int = MAX_RUNS_PER_PROCESS,
) -> None:
    """Import everything, say ready, then execute up to `max_runs` runs, one at a time."""
    os.environ.update(env)
    # Ctrl-C in a terminal reaches the whole process group; the parent decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from deployments.catalog import _load_flow

    flows = {ep: _load_flow(ep) for ep in entrypoints}
    # Warm the rest of the engine path (imports, settings, HTTP client) before "ready".
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow  # noqa: F401
    from prefect.task_engine import run_task  # noqa: F401 - imported lazily at first task
    from prefect.utilities import visualization  # noqa: F401

    with get_client(sync_client=True) as client:
        client.api_healthcheck()
    gc.collect()
    gc.freeze()  # long-lived imports out of the cyclic GC (see deployments.cli)
    conn.send("ready")
    for _ in range(max_runs):
        try:
            msg = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if msg is None:
            return
        run_id, entrypoint = msg
        try:
            outcome = execute(UUID(run_id), flows[entrypoint])
        except Exception as exc:  # noqa: BLE001 - the engine recorded the final state
            outcome = f"engine error: {type(exc).__name__}"
        try:
            conn.send(("done", run_id, outcome))
        except OSError:
            return


def execute(run_id: UUID, flow: Any) -> str:
    """Claim the run (Scheduled -> Pending) and run it with Prefect's engine."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import State, StateDetails
    from prefect.exceptions import Abort
    from prefect.flow_engine import run_flow
    from prefect.logging.loggers import flow_run_logger
    from prefect.states import Pending
    from prefect.utilities.engine import propose_state_sync

    with get_client(sync_client=True) as client:
        # A scheduled time on the Pending state replaces the Scheduled one (Prefect's
        # CopyScheduledTime rule), so the engine's Running is not held until the grace ends.
        claim: State[Any] = Pending(state_details=StateDetails(scheduled_time=datetime.now(UTC)))
        try:
            state = propose_state_sync(client, claim, flow_run_id=run_id)
        except Abort as exc:
            return f"not claimed: {exc}"
        if not state.is_pending():
            # e.g. AwaitingConcurrencySlot: the Runner starts it when a slot frees up.
            return f"not claimed: server answered {state.type.value} {state.name}"
        flow_run = client.read_flow_run(run_id)
    run_logger = flow_run_logger(flow_run).logger
    result = run_flow(flow, flow_run=flow_run, return_type="state", error_logger=run_logger)
    if asyncio.iscoroutine(result):
        result = asyncio.run(result)
    return f"{getattr(result, 'type', 'unknown')}"
