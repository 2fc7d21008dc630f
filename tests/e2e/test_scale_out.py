"""Two receivers and two Runners against one Prefect API on PostgreSQL (issue 25).

One stack (`deployments.cli run`, its Prefect server on PostgreSQL) and one joined node
(`deployments.cli join`: its own Runner, warm pool, receiver and journal) share the module:
stacks take ~35 s each to start. What is proven:

- a storm of duplicate deliveries spread over both receivers makes exactly one run per alert
  (Prefect's idempotency key), and both nodes' warm pools execute runs;
- alerts of many fingerprints for one target, spread over both receivers, give at most one
  handler per receiver, and exactly one of them acts (the target lock, a Prefect global
  concurrency limit, is shared; the second handler re-measures under it and skips);
- a resolved notification reaching the receiver that never saw the alert cancels that
  occurrence's still-scheduled run, found in Prefect by the occurrence's key;
- with the Prefect server killed (the stack's supervisor restarts it), the joined node's
  receiver still accepts an alert into its journal, and its run is created once after.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.prefect_runs import PrefectRuns
from tasks.run_tags import ALERT_SOURCE, alert_tags, runbook_tag
from tests.fixtures.stack import Stack, joined_node, running_stack
from tests.fixtures.stub_runbooks import STUB_TARGETS_ENV
from tests.fixtures.triggers import alert, bearer, payload

pytestmark = pytest.mark.e2e

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class Nodes:
    """The stack (node A: server, Runner, receiver) and the node joined to it (B)."""

    a: Stack
    b: Stack
    targets: Path


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    base = tmp_path_factory.mktemp("scale-out")
    targets = base / "targets"
    targets.mkdir()
    # Answers carry the run id and where it went (warm/runner) when it comes within 5 s.
    env = {STUB_TARGETS_ENV: str(targets), "RUNBOOKS_RECEIVER_SYNC_WAIT_S": "5"}
    with (
        running_stack(base / "a", pool_size=2, prefect_db="postgres", extra_env=env) as a,
        joined_node(a, base / "b", pool_size=2, extra_env=env) as b,
    ):
        yield Nodes(a, b, targets)


def deliver(node: Stack, *alerts: dict[str, Any], status: str = "firing") -> httpx.Response:
    """POST one webhook to `node`'s receiver, as Alertmanager does."""
    return httpx.post(
        f"{node.receiver_url}/alerts",
        json=payload(*alerts, status=status),
        headers=bearer(node.token),
        timeout=60,
    )


def runs_tagged(stack: Stack, tag: str) -> list[dict[str, Any]]:
    """Every flow run carrying `tag`, read from the shared Prefect API."""
    body = {"flow_runs": {"tags": {"all_": [tag]}}, "limit": 200}
    r = httpx.post(f"{stack.api_url}/flow_runs/filter", json=body, timeout=30)
    r.raise_for_status()
    return list(r.json())


def state_of(stack: Stack, run_id: str) -> str:
    r = httpx.get(f"{stack.api_url}/flow_runs/{run_id}", timeout=30)
    r.raise_for_status()
    return str(r.json()["state"]["type"])


def wait_until(what: str, check: Callable[[], bool], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f} s"
        time.sleep(0.5)


def all_final(stack: Stack, fingerprints: list[str], each: int = 1) -> bool:
    """Every alert has `each` runs and all of them are final."""
    for fp in fingerprints:
        runs = runs_tagged(stack, f"alert:{fp}")
        if len(runs) < each or any(r["state"]["type"] not in FINAL for r in runs):
            return False
    return True


def test_duplicate_deliveries_over_both_receivers_make_one_run_per_alert(nodes: Nodes) -> None:
    alerts = [alert("StubAuto", namespace=f"dup-{i}") for i in range(30)]
    # Each alert 3 times to each receiver, interleaved, 16 deliveries in flight at a time.
    jobs = [(node, a) for a in alerts for _ in range(3) for node in (nodes.a, nodes.b)]
    with ThreadPoolExecutor(16) as threads:
        answers = list(threads.map(lambda job: (job[0], deliver(*job)), jobs))
    assert [r.status_code for _, r in answers] == [200] * len(jobs)
    outcomes = Counter(r.json()["alerts"][0]["outcome"] for _, r in answers)
    assert set(outcomes) <= {"started", "accepted", "deduplicated"}, outcomes
    fps = [a["fingerprint"] for a in alerts]
    wait_until("every alert's run final", lambda: all_final(nodes.a, fps))
    for fp in fps:
        (run,) = runs_tagged(nodes.a, f"alert:{fp}")  # exactly one, however delivered
        assert run["state"]["type"] == "COMPLETED", run["state"]
    # Which node's executor took each new run: the receiver that created it says so.
    started = Counter(
        (node.receiver_url, body["executor"])
        for node, r in answers
        for body in r.json()["alerts"]
        if body["outcome"] == "started"
    )
    print(f"outcomes {dict(outcomes)}; started by (receiver, executor): {dict(started)}")
    assert {url for url, executor in started if executor == "warm"} == {
        nodes.a.receiver_url,
        nodes.b.receiver_url,
    }, started


def test_one_target_over_both_receivers_has_one_acting_run(nodes: Nodes) -> None:
    storm = [alert("StubStorm", namespace="one-target", mode="act") for _ in range(20)]
    jobs = [(nodes.a if i % 2 else nodes.b, a) for i, a in enumerate(storm)]
    with ThreadPoolExecutor(8) as threads:
        answers = list(threads.map(lambda job: deliver(*job), jobs))
    assert [r.status_code for r in answers] == [200] * len(storm)
    fps = [a["fingerprint"] for a in storm]
    wait_until("every storm run final", lambda: all_final(nodes.a, fps))
    runs = [run for fp in fps for run in runs_tagged(nodes.a, f"alert:{fp}")]
    assert len(runs) == len(storm)
    handlers = [r for r in runs if r["state"]["name"] != "Covered"]
    acted = sorted(nodes.targets.glob("one-target.acted.*"))
    skipped = sorted(nodes.targets.glob("one-target.skipped.*"))
    print(f"handlers {len(handlers)} (one per receiver at most); acted {len(acted)}")
    # Coalescing is decided in each receiver's own journal: one handler per receiver.
    assert 1 <= len(handlers) <= 2
    assert all(r["state"]["type"] == "COMPLETED" for r in runs)
    # The target lock is shared in Prefect: the second handler re-measured and skipped.
    assert len(acted) == 1
    assert len(acted) + len(skipped) == len(handlers)
    assert {p.name.rsplit(".", 1)[1] for p in acted + skipped} == {r["id"] for r in handlers}


def created_like_the_receiver(stack: Stack, a: dict[str, Any], grace_s: float) -> str:
    """A run of `a` created exactly as a receiver's intake creates it, `grace_s` ahead."""

    async def create() -> str:
        runs = PrefectRuns(stack.api_url, None, retry_s=10)
        try:
            run = await runs.create_run(
                "stub-remediate/stub-remediate",
                name=f"stubauto-{a['fingerprint']}",
                parameters={"params": {"namespace": a["labels"]["namespace"]}},
                tags=[
                    ALERT_SOURCE,
                    runbook_tag("stub-remediate"),
                    *alert_tags(a["fingerprint"], "StubAuto"),
                    "auto",
                ],
                idempotency_key=f"{a['fingerprint']}:{a['startsAt']}",
                grace_s=grace_s,
            )
        finally:
            await runs.aclose()
        return str(run.id)

    return asyncio.run(create())


def test_a_resolve_at_the_other_receiver_cancels_the_scheduled_run(nodes: Nodes) -> None:
    """Node A's run of an occurrence is still Scheduled; its resolve reaches node B, which
    never saw the alert. The run is made as A's intake makes it, but an hour ahead: with warm
    pools on both nodes no route's run stays Scheduled long enough to be resolved."""
    one = alert("StubAuto", namespace="resolve", starts_at="2026-11-27T03:00:00Z")
    two = {**one, "startsAt": "2026-11-27T03:30:00Z"}  # a later occurrence: left alone
    run_one = created_like_the_receiver(nodes.a, one, grace_s=3600)
    run_two = created_like_the_receiver(nodes.a, two, grace_s=3600)
    fired = deliver(nodes.a, one).json()["alerts"][0]  # A journals the run it finds
    assert (fired["outcome"], fired["flow_run_id"]) == ("deduplicated", run_one)
    try:
        resolved = {**one, "status": "resolved", "endsAt": "2026-11-27T03:10:00Z"}
        answer = deliver(nodes.b, resolved, status="resolved").json()["alerts"][0]
        assert answer["outcome"] == "cancelled", answer
        assert answer["flow_run_id"] == run_one
        assert state_of(nodes.a, run_one) == "CANCELLED"
        assert state_of(nodes.a, run_two) == "SCHEDULED"
    finally:  # leave nothing due for the Runners in an hour
        httpx.post(
            f"{nodes.a.api_url}/flow_runs/{run_two}/set_state",
            json={"state": {"type": "CANCELLED", "name": "Cancelled"}, "force": True},
            timeout=30,
        )


def test_the_joined_receiver_holds_alerts_while_the_server_is_down(nodes: Nodes) -> None:
    """Last in the module: it kills the Prefect server (node A's supervisor restarts it)."""
    (server, *_) = reversed(nodes.a.pids("prefect server"))
    held = alert("StubAuto", namespace="outage")
    os.kill(server, signal.SIGKILL)
    wait_until("the server gone", lambda: not answers(f"{nodes.a.api_url}/health"), 30)
    first = deliver(nodes.b, held).json()["alerts"][0]
    again = deliver(nodes.b, held).json()["alerts"][0]
    down_after = not answers(f"{nodes.a.api_url}/health")
    assert first["outcome"] == "accepted", first  # journaled; the run follows
    assert again["outcome"] == "deduplicated", again
    assert down_after, "the server came back within the delivery: nothing shown"
    wait_until(
        "the server restarted", lambda: len(nodes.a.pids("prefect server")) == 2, timeout=120
    )
    wait_until("server healthy", lambda: answers(f"{nodes.a.api_url}/health"), timeout=180)
    fp = held["fingerprint"]
    wait_until("the held alert's run created", lambda: bool(runs_tagged(nodes.a, f"alert:{fp}")))
    later = deliver(nodes.a, held).json()["alerts"][0]  # the other receiver: Prefect's key
    assert later["outcome"] == "deduplicated", later
    wait_until("its run final", lambda: all_final(nodes.a, [fp]), timeout=240)
    (run,) = runs_tagged(nodes.a, f"alert:{fp}")
    assert run["state"]["type"] == "COMPLETED", run["state"]


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False
