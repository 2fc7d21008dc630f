"""The short grace promises an idle warm process: concurrent alerts never share one."""

from __future__ import annotations

from typing import Any, cast
from uuid import UUID

from fastapi.testclient import TestClient

from deployments.journal import Journal
from deployments.receiver import create_app
from deployments.warm_pool import WarmPool
from tests.fixtures.stub_runbooks import STUB_RUNBOOKS
from tests.fixtures.triggers import (
    RecordingRuns,
    alert,
    bearer,
    payload,
    receiver_settings,
    stub_table,
)

API = "http://prefect.invalid/api"


class OneIdleProcess:
    """A warm pool with `idle` processes free; later runs wait in its queue."""

    def __init__(self, idle: int) -> None:
        self.free = idle
        self.sent: list[UUID] = []
        self.queued: list[UUID] = []

    def accepting(self) -> bool:
        return True

    def idle(self) -> int:
        return self.free

    def handles(self, deployment: str) -> bool:
        return True

    def try_submit(self, run_id: UUID, deployment: str) -> bool:
        if self.free:
            self.free -= 1
            self.sent.append(run_id)
        else:
            self.queued.append(run_id)
        return True


def app_with(pool: OneIdleProcess, runs: RecordingRuns) -> Any:
    return create_app(
        receiver_settings(grace_s=2.0, queue_grace_s=120.0, sync_wait_s=5.0),
        stub_table(),
        STUB_RUNBOOKS,
        api_url=API,
        pool=cast(WarmPool, pool),
        runs=runs,
        journal=Journal(None),
    )


def graces(idle: int, alerts: int, recording_runs: RecordingRuns) -> list[float]:
    pool = OneIdleProcess(idle)
    app = app_with(pool, recording_runs)
    batch = [alert(namespace=f"ns{i}", fingerprint=f"grace{i}") for i in range(alerts)]
    with TestClient(app) as client:
        r = client.post("/alerts", json=payload(*batch), headers=bearer())
    assert [a["outcome"] for a in r.json()["alerts"]] == ["started"] * alerts
    assert len(pool.sent) == idle and len(pool.queued) == alerts - idle
    return sorted(float(call["grace_s"]) for call in recording_runs.calls)


def test_concurrent_alerts_share_no_idle_process(recording_runs: RecordingRuns) -> None:
    """One idle process, four alerts at once: one run due in 2 s, three wait in the queue
    with the queue's grace (the Runner would otherwise start them 2 s later, cold)."""
    assert graces(1, 4, recording_runs) == [2.0, 120.0, 120.0, 120.0]


def test_each_idle_process_gets_one_short_grace(recording_runs: RecordingRuns) -> None:
    assert graces(3, 4, recording_runs) == [2.0, 2.0, 2.0, 120.0]


def test_promises_are_released_once_handed_over(recording_runs: RecordingRuns) -> None:
    pool = OneIdleProcess(1)
    with TestClient(app_with(pool, recording_runs)) as client:
        for i in range(3):
            pool.free = 1  # the process finished the previous run
            client.post("/alerts", json=payload(alert(namespace=f"n{i}")), headers=bearer())
    assert [float(c["grace_s"]) for c in recording_runs.calls] == [2.0, 2.0, 2.0]
