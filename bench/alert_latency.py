"""Alert POST -> first remediation task running: this repo's stack vs stock `serve()`.

Both configurations run here, one after the other, on loopback, with the stand-in runbook
(`tests/fixtures/stub_runbooks.py`: one task, no side effects):

* ours:  receiver + warm pool (2 processes) + Runner polling every 1 s as fallback;
* stock: the same receiver creating the same deployment runs, executed by a plain
         `serve()` Runner with Prefect's defaults (poll 10 s, a subprocess per run).

Latency = the first task run's `start_time` (Prefect server clock) minus the moment the
webhook POST was sent (same machine). Alerts are spaced `--gap` seconds apart, as incident
alerts are; each run finishes before the next alert. Bounded: every wait has a timeout.

    .venv/bin/python bench/alert_latency.py [--samples 20] [--stock-samples 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.stack import Stack, running_stack
from tests.fixtures.triggers import alert, payload


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def first_task_start(stack: Stack, run_id: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    body = {"flow_runs": {"id": {"any_": [run_id]}}}
    while time.monotonic() < deadline:
        r = httpx.post(f"{stack.api_url}/task_runs/filter", json=body, timeout=5)
        starts = [t["start_time"] for t in r.json() if t.get("start_time")]
        if starts:
            return min(datetime.fromisoformat(s).timestamp() for s in starts)
        time.sleep(0.05)
    raise TimeoutError(f"no task of run {run_id} started within {timeout} s")


def find_run(stack: Stack, fingerprint: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    body = {"flow_runs": {"tags": {"all_": [f"alert:{fingerprint}"]}}}
    while time.monotonic() < deadline:
        runs = httpx.post(f"{stack.api_url}/flow_runs/filter", json=body, timeout=5).json()
        if runs:
            return str(runs[0]["id"])
        time.sleep(0.02)
    raise TimeoutError(f"no run for alert {fingerprint}")


def executed_by(stack: Stack, run_id: str) -> str:
    """From the receiver's dispatch log line: `... run <id> [warm]` or `[runner]`."""
    return "warm" if f"run {run_id} [warm]" in stack.log() else "runner"


def wait_final(stack: Stack, run_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = httpx.get(f"{stack.api_url}/flow_runs/{run_id}", timeout=5).json()["state"]
        if state and state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return str(state["type"])
        time.sleep(0.1)
    raise TimeoutError(f"run {run_id} did not finish")


def measure(stack: Stack, samples: int, gap: float, label: str) -> tuple[list[float], list[str]]:
    latencies: list[float] = []
    executors: list[str] = []
    headers = {"Authorization": f"Bearer {stack.token}"}
    with httpx.Client(timeout=10) as client:
        for i in range(samples):
            body = payload(alert(namespace=f"bench{i}", fingerprint=uuid.uuid4().hex[:16]))
            sent = time.time()
            r = client.post(f"{stack.receiver_url}/alerts", json=body, headers=headers)
            r.raise_for_status()
            # The receiver answers once the alert is journaled; the run follows.
            run_id = find_run(stack, body["alerts"][0]["fingerprint"], timeout=30)
            started = first_task_start(stack, run_id, timeout=60)
            latencies.append(started - sent)
            wait_final(stack, run_id, timeout=60)
            executor = executed_by(stack, run_id)
            executors.append(executor)
            print(f"  {label} #{i + 1}: {latencies[-1]:.3f} s ({executor})", flush=True)
            time.sleep(gap)
    return latencies, executors


def summary(name: str, values: list[float], executors: list[str]) -> str:
    warm = executors.count("warm")
    return (
        f"{name:6s} n={len(values):3d}  p50={percentile(values, 50):6.3f} s  "
        f"p95={percentile(values, 95):6.3f} s  mean={statistics.mean(values):6.3f} s  "
        f"max={max(values):6.3f} s  warm={warm}/{len(executors)}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--stock-samples", type=int, default=8)
    parser.add_argument("--gap", type=float, default=4.0, help="seconds between alerts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        home = Path(tmp) / "prefect"
        print("starting stack: ours (warm pool 2, runner poll 1 s)", flush=True)
        with running_stack(home, pool_size=2, poll_s=1.0) as stack:
            ours, ours_exec = measure(stack, args.samples, args.gap, "ours")
        print("starting stack: stock serve() (no pool, runner poll 10 s)", flush=True)
        # Stock: Prefect's defaults everywhere, the Runner not niced.
        stock_env = {"RUNBOOKS_STACK_RUNNER_NICE": "0"}
        with running_stack(home, pool_size=0, poll_s=10.0, extra_env=stock_env) as stack:
            stock, stock_exec = measure(stack, args.stock_samples, 0.5, "stock")
    print()
    print("alert POST -> first remediation task running")
    print(summary("ours", ours, ours_exec))
    print(summary("stock", stock, stock_exec))
    speedup = statistics.mean(stock) / statistics.mean(ours)
    print(f"speed-up (mean): {speedup:.1f}x")
    ok = percentile(ours, 50) <= 1.0 and percentile(ours, 95) <= 2.0 and speedup >= 3
    print("targets (p50 <= 1 s, p95 <= 2 s, >= 3x stock):", "MET" if ok else "NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
