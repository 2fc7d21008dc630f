"""Alert storms, measured until every run has finished.

`--scenario intake` (the default): 1,000 webhook deliveries of 50 distinct alerts within 10 s.
Alertmanager is at-least-once (HA peers each deliver, retries repeat): the receiver must turn
this into exactly 50 flow runs, lose none, never answer 5xx, and answer fast (p99 < 100 ms),
while the runs themselves execute on the same machine (warm pool + Runner, stand-in runbook).

`--scenario distinct`: 100 `DatabaseConnectionPoolExhausted` alerts for 100 databases (100
targets), plan-only, with the real `db-pool-exhausted` runbook on the local PostgreSQL; target:
every run finished within 60 s of the last delivery.

`--scenario one-target`: 100 alerts (100 fingerprints) for one database, on a `mode: auto`
route; target: exactly one run acts, the other 99 are covered by it, all accounted for within
30 s of the last delivery. (The acting run's guard names a role that does not exist: it acts,
and ends no session.)

Both storm scenarios also print the CPU seconds the stack's processes used, by part.

    .venv/bin/python bench/alert_storm.py [--scenario intake|distinct|one-target]
        [--deliveries 1000] [--alerts 50] [--seconds 10] [--wait-s 300]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.stack import Stack, running_stack
from tests.fixtures.triggers import alert, payload


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def storm(
    stack: Stack, deliveries: int, alerts: list[dict[str, object]], seconds: float
) -> tuple[list[float], list[float], Counter[int]]:
    """Send delivery i at start + i * seconds / deliveries, from 32 keep-alive clients."""
    headers = {"Authorization": f"Bearer {stack.token}"}
    latencies: list[float] = []
    server_side: list[float] = []
    slow: list[tuple[int, int]] = []
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    start = time.monotonic() + 0.5
    interval = seconds / deliveries
    bodies = [json.dumps(payload(alerts[i % len(alerts)])).encode() for i in range(deliveries)]
    local = threading.local()

    host, port = stack.receiver_url.removeprefix("http://").split(":")
    send_headers = {**headers, "Content-Type": "application/json"}

    def deliver(i: int) -> None:
        # http.client, not httpx: the load generator shares the 2 cores with what it measures.
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection(host, int(port), timeout=30)
        time.sleep(max(0.0, start + i * interval - time.monotonic()))
        t0 = time.monotonic()
        server = None
        try:
            conn.request("POST", "/alerts", body=bodies[i], headers=send_headers)
            r = conn.getresponse()
            r.read()
            code = r.status
            timing = r.getheader("server-timing") or ""
            server = float(timing.split("dur=")[1]) / 1000 if "dur=" in timing else None
        except (OSError, http.client.HTTPException):
            code = 0
            conn.close()
            local.conn = None
        with lock:
            statuses[code] += 1
            latencies.append(time.monotonic() - t0)
            if server is not None:
                server_side.append(server)
                if server > 0.1:
                    slow.append((i, round(server * 1000)))

    with ThreadPoolExecutor(max_workers=32) as executor:
        list(executor.map(deliver, range(deliveries)))
    if slow:
        print(f"deliveries over 100 ms (index, ms): {sorted(slow)}")
    return latencies, server_side, statuses


def count_runs(stack: Stack, fingerprints: list[str]) -> dict[str, int]:
    counts = {}
    for fp in fingerprints:
        body = {"flow_runs": {"tags": {"all_": [f"alert:{fp}"]}}}
        r = httpx.post(f"{stack.api_url}/flow_runs/filter", json=body, timeout=10)
        counts[fp] = len(r.json())
    return counts


ROUTING = """
routes:
  - alertname: DatabaseConnectionPoolExhausted
    match: {storm: act}
    runbook: db-pool-exhausted
    mode: auto
    cooldown: 10m
    params:
      guard: {database: "${datname}", username: "${usename}"}
      act_above_percent: 0
      healthy_below_percent: 100
      requested_by: bench
  - alertname: DatabaseConnectionPoolExhausted
    runbook: db-pool-exhausted
    mode: plan
    cooldown: 10m
    params:
      guard: {database: "${datname}"}
      requested_by: bench
"""

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
TICK = os.sysconf("SC_CLK_TCK")
ROLES = (
    ("prefect server", "Prefect server"),
    ("deployments.cli receiver", "receiver"),
    ("multiprocessing.spawn", "warm processes"),
    ("deployments.serve", "Runner"),
    ("prefect.engine", "Runner's run subprocesses"),
)


class CpuMeter:
    """CPU seconds the stack's processes (the CLI's descendants) use, by role.

    Sampled from /proc every 0.5 s by a thread, so a process that exits meanwhile (a
    recycled warm process, a Runner subprocess) keeps the time last seen; one born after
    `start` counts from zero.
    """

    def __init__(self, stack: Stack) -> None:
        self.root = stack.proc.pid
        self.first: dict[int, float] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self.sample()
        self.first = {pid: seconds for pid, (_, seconds) in self.last.items()}
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.wait(0.5):
            self.sample()

    def sample(self) -> None:
        procs: dict[int, tuple[int, float, str]] = {}  # pid -> (parent, CPU seconds, cmdline)
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, IndexError, ValueError):
                continue
            # field 4: parent pid; fields 14-15: utime, stime (clock ticks)
            seconds = (int(fields[11]) + int(fields[12])) / TICK
            procs[int(stat.parent.name)] = (int(fields[1]), seconds, cmdline)
        for pid, (_, seconds, cmdline) in procs.items():
            ancestor = pid
            while ancestor in procs and ancestor != self.root:
                ancestor = procs[ancestor][0]
            if ancestor == self.root:
                role = next((name for part, name in ROLES if part in cmdline), "others")
                self.last[pid] = (role, seconds)
                self.first.setdefault(pid, 0.0)  # born after `start` (start() resets `first`)

    def report(self, runs: int) -> str:
        self.stop.set()
        self.thread.join()
        self.sample()
        spent: dict[str, float] = {}
        for pid, (role, seconds) in self.last.items():
            if pid in self.first:
                spent[role] = spent.get(role, 0.0) + seconds - self.first[pid]
        total = sum(spent.values())
        parts = ", ".join(f"{r} {v:.1f}" for r, v in sorted(spent.items(), key=lambda x: -x[1]))
        return (
            f"CPU seconds from the first delivery until every run was final: {total:.1f} "
            f"({total / max(runs, 1):.2f} per run): {parts}"
        )


def runs_of(stack: Stack, tag: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    while True:
        body = {"flow_runs": {"tags": {"all_": [tag]}}, "limit": 200, "offset": len(found)}
        batch = httpx.post(f"{stack.api_url}/flow_runs/filter", json=body, timeout=30).json()
        found += batch
        if len(batch) < 200:
            return found


def count_tagged(stack: Stack, tag: str, states: set[str] | None = None) -> int:
    body: dict[str, Any] = {"flow_runs": {"tags": {"all_": [tag]}}}
    if states:
        body["flow_runs"]["state"] = {"type": {"any_": sorted(states)}}
    return int(httpx.post(f"{stack.api_url}/flow_runs/count", json=body, timeout=30).json())


def finish_times(
    stack: Stack, tag: str, expected: int, since: float, wait_s: float
) -> tuple[list[dict[str, Any]], float | None]:
    """Poll until `expected` runs tagged `tag` are final; (runs, seconds after `since`).

    Polls with two counts, not by reading the runs: the bench must not steal the CPU it
    measures (reading 100 runs every 0.5 s cost the server more than a run does).
    """
    deadline = time.monotonic() + wait_s
    while True:
        total = count_tagged(stack, tag)
        if total >= expected and count_tagged(stack, tag, FINAL) == total:
            return runs_of(stack, tag), time.monotonic() - since
        if time.monotonic() > deadline:
            return runs_of(stack, tag), None
        time.sleep(0.5)


def storm_to_finish(
    scenario: str, alerts_n: int, seconds: float, wait_s: float, pool_size: int
) -> int:
    """Deliver `alerts_n` alerts once each over `seconds`, then time until all runs end."""
    prefix = uuid.uuid4().hex[:8]
    tag = f"storm{prefix}"
    if scenario == "distinct":
        labels = [{"datname": f"storm_{prefix}_{i}"} for i in range(alerts_n)]
    else:
        labels = [{"datname": f"storm_{prefix}", "storm": "act", "usename": f"nobody_{prefix}"}]
        labels *= alerts_n
    alerts = [
        alert("DatabaseConnectionPoolExhausted", fingerprint=f"{prefix}{i:04d}", stormtag=tag, **lb)
        for i, lb in enumerate(labels)
    ]
    with (
        tempfile.TemporaryDirectory(prefix="bench-storm-") as tmp,
    ):
        routing = Path(tmp) / "routing.yaml"
        routing.write_text(ROUTING)
        with running_stack(
            Path(tmp) / "prefect",
            catalog=None,
            routing=routing,
            pool_size=pool_size,
            extra_env={k: v for k, v in os.environ.items() if k.startswith("RUNBOOKS_RECEIVER_")},
        ) as stack:
            meter = CpuMeter(stack)
            meter.start()
            _, _, statuses = storm(stack, alerts_n, alerts, seconds)
            last = time.monotonic()
            runs, took = finish_times(
                stack, "alertname:DatabaseConnectionPoolExhausted", alerts_n, last, wait_s
            )
            cpu = meter.report(len(runs))
            states = Counter((r.get("state") or {}).get("name") for r in runs)
            covered = [r for r in runs if any(t.startswith("covered-by:") for t in r["tags"])]
            handlers = [r for r in runs if r not in covered]
            acted = 0
            if scenario == "one-target":
                for r in handlers:
                    body = {"artifacts": {"flow_run_id": {"any_": [r["id"]]}, "key": {
                        "any_": ["db-pool-exhausted"]}}}  # fmt: skip
                    arts = httpx.post(
                        f"{stack.api_url}/artifacts/filter", json=body, timeout=30
                    ).json()
                    acted += sum("**terminated**" in str(a.get("data")) for a in arts)
    print(f"scenario {scenario}: {alerts_n} alerts delivered over {seconds:g} s; "
          f"status codes {dict(statuses)}")  # fmt: skip
    print(f"runs: {len(runs)}; states: {dict(states)}; covered: {len(covered)}; "
          f"handlers: {len(handlers)}")  # fmt: skip
    print(cpu)
    if took is None:
        done = sum(1 for r in runs if (r.get("state") or {}).get("type") in FINAL)
        print(f"NOT all finished within {wait_s:.0f} s of the last delivery: {done} final")
        return 1
    print(f"every run final {took:.1f} s after the last delivery")
    if scenario == "distinct":
        ok = len(runs) == alerts_n and took <= 60
        print("target (all", alerts_n, "finished within 60 s):", "MET" if ok else "NOT MET")
    else:
        print(f"runs that acted: {acted}")
        ok = acted == 1 and len(covered) == alerts_n - 1 and took <= 30
        print("target (1 act, the rest covered, within 30 s):", "MET" if ok else "NOT MET")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--scenario", choices=["intake", "distinct", "one-target"], default="intake"
    )
    parser.add_argument("--wait-s", type=float, default=300.0)
    parser.add_argument("--pool-size", type=int, default=4, help="warm processes (storms)")
    parser.add_argument("--deliveries", type=int, default=1000)
    parser.add_argument("--alerts", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--intake-only",
        action="store_true",
        help="schedule alert runs 5 min ahead so only the warm pool executes any during the "
        "storm: measures the receiver without 50 runs competing for the CPU",
    )
    args = parser.parse_args()
    if args.scenario != "intake":
        n = args.alerts if args.alerts != 50 else 100
        return storm_to_finish(args.scenario, n, args.seconds, args.wait_s, args.pool_size)
    extra_env = {"RUNBOOKS_RECEIVER_GRACE_S": "300"} if args.intake_only else {}
    prefix = uuid.uuid4().hex[:8]
    fingerprints = [f"{prefix}{i:04d}" for i in range(args.alerts)]
    alerts = [alert(namespace=f"storm{i}", fingerprint=fp) for i, fp in enumerate(fingerprints)]
    with (
        tempfile.TemporaryDirectory(prefix="bench-storm-") as tmp,
        running_stack(Path(tmp) / "prefect", pool_size=2, poll_s=1.0, extra_env=extra_env) as stack,
    ):
        t0 = time.monotonic()
        latencies, server_side, statuses = storm(stack, args.deliveries, alerts, args.seconds)
        elapsed = time.monotonic() - t0
        # Accepted alerts whose runs are still being created: wait (bounded) until all exist.
        deadline = time.monotonic() + 60
        counts = count_runs(stack, fingerprints)
        while min(counts.values()) == 0 and time.monotonic() < deadline:
            time.sleep(1)
            counts = count_runs(stack, fingerprints)
    runs = sum(counts.values())
    duplicates = sum(max(0, n - 1) for n in counts.values())
    lost = sum(1 for n in counts.values() if n == 0)
    server_errors = sum(n for code, n in statuses.items() if code >= 500 or code == 0)
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    s50, s99 = percentile(server_side, 50), percentile(server_side, 99)
    print(f"deliveries: {len(latencies)} in {elapsed:.1f} s; status codes: {dict(statuses)}")
    print(f"runs created: {runs} (expected {args.alerts}); duplicates: {duplicates}; lost: {lost}")
    print(f"5xx: {server_errors}")
    print(f"receiver p50={s50 * 1000:.1f} ms p99={s99 * 1000:.1f} ms "
          f"max={max(server_side) * 1000:.1f} ms (server-side, Server-Timing)")  # fmt: skip
    print(f"as seen by the client: p50={p50 * 1000:.1f} ms p99={p99 * 1000:.1f} ms "
          f"max={max(latencies) * 1000:.1f} ms")  # fmt: skip
    ok = runs == args.alerts and duplicates == 0 and server_errors == 0 and s99 < 0.1
    print("targets (exactly one run per alert, no 5xx, p99 < 100 ms):", "MET" if ok else "NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
