"""The pool never hands a run to a process that reached its run limit (it would exit)."""

from __future__ import annotations

from typing import Any, cast
from uuid import UUID

from deployments.warm_pool import WarmPool, _Worker


class FakeProcess:
    def is_alive(self) -> bool:
        return True


class FakeConn:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, msg: Any) -> None:
        self.sent.append(msg)


def pool_with_one_ready_process(max_runs: int) -> tuple[WarmPool, _Worker]:
    pool = WarmPool({"d/d": "m:f"}, size=1, max_runs=max_runs)
    worker = _Worker(process=cast(Any, FakeProcess()), conn=cast(Any, FakeConn()), ready=True)
    pool._workers.append(worker)
    return pool, worker


def finish(worker: _Worker) -> None:
    worker.run_id = None  # what the monitor does on the process's "done"


def test_the_run_after_the_limit_waits_for_a_fresh_process() -> None:
    pool, worker = pool_with_one_ready_process(max_runs=2)
    assert pool.try_submit(UUID(int=1), "d/d")
    finish(worker)
    assert pool.idle() == 1
    assert pool.try_submit(UUID(int=2), "d/d")
    finish(worker)
    assert pool.idle() == 0  # two runs done: this process exits, it takes no more
    assert pool.try_submit(UUID(int=3), "d/d")  # accepted: it waits in the queue
    sent = cast(FakeConn, worker.conn).sent
    assert [m[0] for m in sent] == [str(UUID(int=1)), str(UUID(int=2))]
    fresh = _Worker(process=cast(Any, FakeProcess()), conn=cast(Any, FakeConn()), ready=True)
    pool._workers = [fresh]  # what `_reap` does when the old process exits
    pool._dispatch()
    assert [m[0] for m in cast(FakeConn, fresh.conn).sent] == [str(UUID(int=3))]


def test_a_busy_process_queues_runs_in_order() -> None:
    pool, worker = pool_with_one_ready_process(max_runs=200)
    for n in (1, 2, 3):
        assert pool.try_submit(UUID(int=n), "d/d")
    for _ in range(2):
        finish(worker)
        pool._dispatch()
    sent = cast(FakeConn, worker.conn).sent
    assert [m[0] for m in sent] == [str(UUID(int=n)) for n in (1, 2, 3)]
