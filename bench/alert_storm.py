"""Alert storm: 1,000 webhook deliveries of 50 distinct alerts within 10 s.

Alertmanager is at-least-once (HA peers each deliver, retries repeat): the receiver must turn
this into exactly 50 flow runs, lose none, never answer 5xx, and answer fast (p99 < 100 ms),
while the runs themselves execute on the same machine (warm pool + Runner, stand-in runbook).

    .venv/bin/python bench/alert_storm.py [--deliveries 1000] [--alerts 50] [--seconds 10]
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
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
