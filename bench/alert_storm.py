"""Alert storms, measured until every run has finished.

`--scenario intake` (the default): 1,000 webhook deliveries of 50 distinct alerts within 10 s.
Alertmanager is at-least-once (HA peers each deliver, retries repeat): the receiver must turn
this into exactly 50 flow runs, lose none, never answer 5xx, and answer fast (p99 < 100 ms,
server-side, from its Server-Timing header), while the runs themselves execute on the same
machine (warm pool + Runner, stand-in runbook).

`--scenario intake --prefect-db postgres`: the storm of issue 25, twice in one invocation,
first with the Prefect server on SQLite, then on PostgreSQL (a database of its own on the
local server, dropped after), printed side by side. Defaults: 10,000 deliveries of 500 alerts
over 80 s (125 a second) to two receivers (`--receivers 2`: the stack plus a node started
with `deployments.cli join`, own receiver, journal, warm pool and Runner, one Prefect API).
Delivery i carries alert i % 500 to receiver (i + i // 500) % 2: every alert reaches both
receivers, ten times each. Targets on each database: exactly 500 runs (no duplicate, none
lost), no 5xx, receiver p99 < 100 ms on each receiver. Also printed: run-creation throughput
(runs created per second from the first delivery until the last run existed, from the runs'
`created` timestamps) and the CPU seconds each part used over the same span.

`--scenario distinct`: 100 `DatabaseConnectionPoolExhausted` alerts for 100 databases (100
targets), plan-only, with the real `db-pool-exhausted` runbook on the local PostgreSQL; target:
every run finished within 60 s of the last delivery on SQLite, 30 s with `--prefect-db
postgres` (`--receivers 2`: alternate deliveries to the two receivers, two warm pools).

`--scenario one-target`: 100 alerts (100 fingerprints) for one database, on a `mode: auto`
route; target: exactly one run acts, the other 99 are covered by it, all accounted for within
30 s of the last delivery. (The acting run's guard names a role that does not exist: it acts,
and ends no session.)

Every scenario prints the CPU seconds the stack's processes used, by part and node (on
PostgreSQL including the database's backends for Prefect). Measured figures:
docs/alert-storms.md, docs/triggers.md, docs/scale-out-measured.md.

    .venv/bin/python bench/alert_storm.py [--scenario intake|distinct|one-target]
        [--prefect-db sqlite|postgres] [--receivers 1|2] [--pool-size N] [--db-pool N]
        [--deliveries 1000] [--alerts 50] [--seconds 10] [--wait-s 300] [--intake-only]
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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deployments.settings import POSTGRES_POOL_SIZE
from tests.fixtures.stack import STUB_CATALOG, Stack, joined_node, running_stack
from tests.fixtures.stub_runbooks import ROUTING as STUB_ROUTING
from tests.fixtures.triggers import alert, payload


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile of `values` (nearest rank); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def node_of(i: int, alerts: int, nodes: int) -> int:
    """The receiver delivery i goes to: round-robin, shifted by one every pass over the alerts.

    Without the shift an even number of alerts over two receivers would send each alert to
    one receiver only; with it, every alert reaches both (as from two Alertmanager peers).
    """
    return (i + i // max(alerts, 1)) % nodes


def throughput(runs: int, first_delivery: float, last_created: float) -> float:
    """Runs created per second from the first delivery until the last run existed."""
    return runs / max(last_created - first_delivery, 1e-3)


def side_by_side(columns: dict[str, dict[str, str]]) -> str:
    """A plain text table: one row per measure (in order of first appearance), one column each.

    A measure one column lacks (a part only PostgreSQL has) shows "-" there.
    """
    names = list(columns)
    rows = list(dict.fromkeys(r for cells in columns.values() for r in cells))
    table = [["", *names]] + [[r, *(columns[n].get(r, "-") for n in names)] for r in rows]
    widths = [max(len(row[c]) for row in table) for c in range(len(table[0]))] if table else []
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in table]
    return "\n".join(line.rstrip() for line in lines)


@dataclass
class Storm:
    """What the load generator saw: per delivery, and per receiver the Server-Timing values."""

    latencies: list[float]
    server_side: list[list[float]]
    statuses: Counter[int]
    first_wall: float  # time.time() of the first delivery
    elapsed: float


KEEPALIVE_S = 3.0  # under uvicorn's timeout_keep_alive (5 s)


def storm(
    nodes: list[Stack], deliveries: int, alerts: list[dict[str, object]], seconds: float
) -> Storm:
    """Send delivery i at start + i * seconds / deliveries, from 32 keep-alive clients.

    Delivery i carries alert i % len(alerts) to receiver `node_of(i, ...)`.
    """
    latencies: list[float] = []
    server_side: list[list[float]] = [[] for _ in nodes]
    slow: list[tuple[int, int, int]] = []
    failed: list[tuple[int, int, int, str]] = []  # no answer: (receiver, index, ms, error)
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    start = time.monotonic() + 0.5
    first_wall = time.time() + (start - time.monotonic())
    interval = seconds / deliveries
    bodies = [json.dumps(payload(alerts[i % len(alerts)])).encode() for i in range(deliveries)]
    local = threading.local()
    addresses = [n.receiver_url.removeprefix("http://").split(":") for n in nodes]
    send_headers = {"Authorization": f"Bearer {nodes[0].token}", "Content-Type": "application/json"}

    def deliver(i: int) -> None:
        # http.client, not httpx: the load generator shares the 2 cores with what it measures.
        node = node_of(i, len(alerts), len(nodes))
        conns = getattr(local, "conns", None)
        if conns is None:
            conns = local.conns = {}
        time.sleep(max(0.0, start + i * interval - time.monotonic()))
        conn, used = conns.get(node, (None, 0.0))
        # uvicorn closes a keep-alive connection idle for 5 s; a request sent on it as it
        # closes finds no answer. A thread may not reach one receiver for a pass over the
        # alerts (4 s at 125 a second): reconnect rather than count the race as a failure.
        if conn is None or time.monotonic() - used > KEEPALIVE_S:
            if conn is not None:
                conn.close()
            host, port = addresses[node]
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
        t0 = time.monotonic()
        server = None
        try:
            conn.request("POST", "/alerts", body=bodies[i], headers=send_headers)
            r = conn.getresponse()
            r.read()
            code = r.status
            timing = r.getheader("server-timing") or ""
            server = float(timing.split("dur=")[1]) / 1000 if "dur=" in timing else None
            conns[node] = (conn, time.monotonic())
        except (OSError, http.client.HTTPException) as exc:
            code = 0
            conn.close()
            conns.pop(node, None)
            with lock:
                failed.append((node + 1, i, round((time.monotonic() - t0) * 1000), repr(exc)[:80]))
        with lock:
            statuses[code] += 1
            latencies.append(time.monotonic() - t0)
            if server is not None:
                server_side[node].append(server)
                if server > 0.1:
                    slow.append((node + 1, i, round(server * 1000)))

    with ThreadPoolExecutor(max_workers=32) as executor:
        list(executor.map(deliver, range(deliveries)))
    elapsed = time.monotonic() - start
    if slow:
        shown = sorted(slow)[:40]
        print(f"deliveries over 100 ms (receiver, index, ms), {len(slow)}: {shown}"
              f"{' ...' if len(slow) > len(shown) else ''}")  # fmt: skip
    if failed:
        print(f"deliveries without an answer (receiver, index, ms, error), {len(failed)}: "
              f"{sorted(failed)[:20]}")  # fmt: skip
    return Storm(latencies, server_side, statuses, first_wall, elapsed)


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
    """CPU seconds the stack's processes (the CLIs' descendants) use, by role and node.

    Sampled from /proc every 0.5 s by a thread, so a process that exits meanwhile (a
    recycled warm process, a Runner subprocess) keeps the time last seen; one born after
    `start` counts from zero. On PostgreSQL the server's backends for the Prefect database
    (`postgres: ... <database> ...`) are counted too: they do the work SQLite does inside
    the Prefect server's process.
    """

    def __init__(self, nodes: list[Stack]) -> None:
        self.roots = {
            n.proc.pid: ("" if i == 0 else f" (node {i + 1})") for i, n in enumerate(nodes)
        }
        self.database = prefect_database_name(nodes[0])
        self.first: dict[int, float] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        """Take the baseline and sample every 0.5 s until `report`."""
        self.sample()
        self.first = {pid: seconds for pid, (_, seconds) in self.last.items()}
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.wait(0.5):
            self.sample()

    def sample(self) -> None:
        """Read every process's CPU time and attribute it to a role."""
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
            if (
                self.database
                and cmdline.startswith("postgres: ")
                and f" {self.database} " in cmdline
            ):
                self.last[pid] = ("PostgreSQL (Prefect's database)", seconds)
                self.first.setdefault(pid, 0.0)
                continue
            ancestor = pid
            while ancestor in procs and ancestor not in self.roots:
                ancestor = procs[ancestor][0]
            if ancestor in self.roots:
                role = next((name for part, name in ROLES if part in cmdline), "others")
                self.last[pid] = (role + self.roots[ancestor], seconds)
                self.first.setdefault(pid, 0.0)  # born after `start` (start() resets `first`)

    def spent(self) -> dict[str, float]:
        """Stop sampling; CPU seconds by role since `start`, largest first."""
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
        self.sample()
        spent: dict[str, float] = {}
        for pid, (role, seconds) in self.last.items():
            if pid in self.first:
                spent[role] = spent.get(role, 0.0) + seconds - self.first[pid]
        return dict(sorted(spent.items(), key=lambda x: -x[1]))

    def report(self, runs: int, until: str = "every run was final") -> str:
        """One line: the total, per run, and by role."""
        spent = self.spent()
        total = sum(spent.values())
        parts = ", ".join(f"{r} {v:.1f}" for r, v in spent.items())
        return (
            f"CPU seconds from the first delivery until {until}: {total:.1f} "
            f"({total / max(runs, 1):.2f} per run): {parts}"
        )


def prefect_database_name(stack: Stack) -> str | None:
    """The PostgreSQL database of the stack's Prefect server (from its environment), if any."""
    try:
        environ = Path(f"/proc/{stack.proc.pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    env = dict(item.decode(errors="replace").partition("=")[::2] for item in environ if item)
    if env.get("RUNBOOKS_PREFECT_DB") != "postgres":
        return None
    return env.get("RUNBOOKS_PREFECT_PG_DSN", "").rpartition("/")[2] or None


@contextmanager
def nodes_up(
    tmp: Path,
    prefect_db: str,
    receivers: int,
    pool_size: int,
    catalog: str | None,
    routing: Path | None,
    extra_env: dict[str, str],
    server_env: dict[str, str],
) -> Iterator[list[Stack]]:
    """`running_stack` on `prefect_db`, plus a `joined_node` when `receivers` is 2."""
    with ExitStack() as stack:
        first = stack.enter_context(
            running_stack(
                tmp / "prefect", pool_size=pool_size, poll_s=1.0, catalog=catalog,
                routing=routing, extra_env={**extra_env, **server_env}, prefect_db=prefect_db,
            )
        )  # fmt: skip
        nodes = [first]
        for i in range(1, receivers):
            nodes.append(
                stack.enter_context(
                    joined_node(
                        first, tmp / f"node{i + 1}", pool_size=pool_size, poll_s=1.0,
                        catalog=catalog, routing=routing, extra_env=extra_env,
                    )
                )
            )  # fmt: skip
        yield nodes


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
    scenario: str,
    alerts_n: int,
    seconds: float,
    wait_s: float,
    pool_size: int,
    prefect_db: str,
    receivers: int,
    server_env: dict[str, str],
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
    extra_env = {k: v for k, v in os.environ.items() if k.startswith("RUNBOOKS_RECEIVER_")}
    with tempfile.TemporaryDirectory(prefix="bench-storm-") as tmp:
        routing = Path(tmp) / "routing.yaml"
        routing.write_text(ROUTING)
        with nodes_up(
            Path(tmp), prefect_db, receivers, pool_size, None, routing, extra_env, server_env
        ) as nodes:
            stack = nodes[0]
            meter = CpuMeter(nodes)
            meter.start()
            sent = storm(nodes, alerts_n, alerts, seconds)
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
    print(f"scenario {scenario} on {prefect_db}, {receivers} receiver(s), {pool_size} warm "
          f"processes each: {alerts_n} alerts delivered over {seconds:g} s; "
          f"status codes {dict(sent.statuses)}")  # fmt: skip
    print(f"runs: {len(runs)}; states: {dict(states)}; covered: {len(covered)}; "
          f"handlers: {len(handlers)}")  # fmt: skip
    print(cpu)
    if took is None:
        done = sum(1 for r in runs if (r.get("state") or {}).get("type") in FINAL)
        print(f"NOT all finished within {wait_s:.0f} s of the last delivery: {done} final")
        return 1
    print(f"every run final {took:.1f} s after the last delivery")
    if scenario == "distinct":
        limit = 30 if prefect_db == "postgres" else 60
        ok = len(runs) == alerts_n and took <= limit
        print(f"target (all {alerts_n} finished within {limit} s):", "MET" if ok else "NOT MET")
    else:
        print(f"runs that acted: {acted}")
        ok = acted == 1 and len(covered) == alerts_n - 1 and took <= 30
        print("target (1 act, the rest covered, within 30 s):", "MET" if ok else "NOT MET")
    return 0 if ok else 1


def created_at(run: dict[str, Any]) -> float:
    """A flow run's `created` timestamp (the server's clock, this machine) as time.time()."""
    return datetime.fromisoformat(str(run["created"])).timestamp()


def intake(
    prefect_db: str,
    receivers: int,
    deliveries: int,
    alerts_n: int,
    seconds: float,
    intake_only: bool,
    server_env: dict[str, str],
    wait_s: float,
) -> tuple[dict[str, str], bool]:
    """One intake storm on `prefect_db`: its measures as table cells, and whether targets held."""
    extra_env = {"RUNBOOKS_RECEIVER_GRACE_S": "300"} if intake_only else {}
    prefix = uuid.uuid4().hex[:8]
    fingerprints = [f"{prefix}{i:04d}" for i in range(alerts_n)]
    alerts = [alert(namespace=f"storm{i}", fingerprint=fp) for i, fp in enumerate(fingerprints)]
    with (
        tempfile.TemporaryDirectory(prefix="bench-storm-") as tmp,
        nodes_up(
            Path(tmp), prefect_db, receivers, 2, STUB_CATALOG, STUB_ROUTING, extra_env, server_env
        ) as nodes,
    ):
        stack = nodes[0]
        meter = CpuMeter(nodes)
        meter.start()
        sent = storm(nodes, deliveries, alerts, seconds)
        # Accepted alerts whose runs are still being created: wait (bounded) until all exist.
        deadline = time.monotonic() + wait_s
        while count_tagged(stack, "alertname:StubAuto") < alerts_n and time.monotonic() < deadline:
            time.sleep(0.5)
        cpu = meter.spent()
        runs = runs_of(stack, "alertname:StubAuto")
    counts = Counter(t for r in runs for t in r["tags"] if t.startswith("alert:"))
    per_alert = [counts.get(f"alert:{fp}", 0) for fp in fingerprints]
    duplicates = sum(max(0, n - 1) for n in per_alert)
    lost = sum(1 for n in per_alert if n == 0)
    server_errors = sum(n for code, n in sent.statuses.items() if code >= 500 or code == 0)
    last = max((created_at(r) for r in runs), default=sent.first_wall)
    cells = {
        "deliveries (sent in)": f"{len(sent.latencies)} ({sent.elapsed:.1f} s)",
        "status codes": " ".join(f"{c}:{n}" for c, n in sorted(sent.statuses.items())),
        "runs created (expected)": f"{len(runs)} ({alerts_n})",
        "duplicates": str(duplicates),
        f"no run {wait_s:.0f} s after the storm": str(lost),
        "5xx or no answer": str(server_errors),
    }
    p99s = []
    for i, values in enumerate(sent.server_side):
        p50, p99 = percentile(values, 50), percentile(values, 99)
        p99s.append(p99 if values else float("inf"))
        cells[f"receiver {i + 1} p50/p99/max ms"] = (
            f"{p50 * 1000:.1f} / {p99 * 1000:.1f} / {max(values, default=0) * 1000:.1f}"
            f" (n={len(values)})"
        )
    c50, c99 = percentile(sent.latencies, 50), percentile(sent.latencies, 99)
    cells["client p50/p99 ms"] = f"{c50 * 1000:.1f} / {c99 * 1000:.1f}"
    cells["last run created after"] = f"{last - sent.first_wall:.1f} s"
    cells["run-creation throughput"] = f"{throughput(len(runs), sent.first_wall, last):.1f} runs/s"
    cells["CPU s (first delivery to last run)"] = f"{sum(cpu.values()):.1f}"
    for role, value in cpu.items():
        cells[f"  {role}"] = f"{value:.1f}"
    ok = len(runs) == alerts_n and not duplicates and not lost and not server_errors
    ok = ok and max(p99s) < 0.1
    return cells, ok


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scenario", choices=["intake", "distinct", "one-target"], default="intake"
    )
    parser.add_argument(
        "--prefect-db",
        choices=["sqlite", "postgres"],
        default="sqlite",
        help="the Prefect server's database; intake on postgres runs SQLite too, side by side",
    )
    parser.add_argument(
        "--receivers", type=int, choices=[1, 2], default=None,
        help="1, or 2: a joined node (own receiver, journal, warm pool, Runner); default 1, "
        "2 for the intake storm on postgres",
    )  # fmt: skip
    parser.add_argument("--wait-s", type=float, default=300.0)
    parser.add_argument(
        "--pool-size", type=int, default=None,
        help="warm processes per node (storms); default as `make run`: 4, on postgres "
        f"{POSTGRES_POOL_SIZE} (deployments.settings.POSTGRES_POOL_SIZE)",
    )  # fmt: skip
    parser.add_argument("--deliveries", type=int, default=None, help="1000; 10000 on postgres")
    parser.add_argument("--alerts", type=int, default=None, help="50 (100 storms); 500 on postgres")
    parser.add_argument("--seconds", type=float, default=None, help="10; 80 intake on postgres")
    parser.add_argument(
        "--db-pool", type=int, default=None,
        help="PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE of the server (PostgreSQL only; "
        "Prefect's default 5, plus 10 overflow)",
    )  # fmt: skip
    parser.add_argument(
        "--intake-only",
        action="store_true",
        help="schedule alert runs 5 min ahead so only the warm pool executes any during the "
        "storm: measures the receiver without the runs competing for the CPU",
    )
    args = parser.parse_args()
    server_env = {}
    if args.db_pool is not None:
        server_env["PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE"] = str(args.db_pool)
    big = args.scenario == "intake" and args.prefect_db == "postgres"
    receivers = args.receivers or (2 if big else 1)
    if args.scenario != "intake":
        n = args.alerts or 100
        default_pool = POSTGRES_POOL_SIZE if args.prefect_db == "postgres" else 4
        return storm_to_finish(
            args.scenario, n, args.seconds or 10.0, args.wait_s, args.pool_size or default_pool,
            args.prefect_db, receivers, server_env,
        )  # fmt: skip
    deliveries = args.deliveries or (10_000 if big else 1000)
    alerts_n = args.alerts or (500 if big else 50)
    seconds = args.seconds or (80.0 if big else 10.0)
    databases = ["sqlite", "postgres"] if big else ["sqlite"]
    columns: dict[str, dict[str, str]] = {}
    met: dict[str, bool] = {}
    for db in databases:
        print(f"intake storm on {db}: {deliveries} deliveries of {alerts_n} alerts over "
              f"{seconds:g} s to {receivers} receiver(s)...", flush=True)  # fmt: skip
        columns[db], met[db] = intake(
            db, receivers, deliveries, alerts_n, seconds, args.intake_only, server_env,
            args.wait_s,
        )  # fmt: skip
    print(side_by_side(columns))
    for db, ok in met.items():
        print(f"targets on {db} (exactly one run per alert, no 5xx, p99 < 100 ms on each "
              "receiver):", "MET" if ok else "NOT MET")  # fmt: skip
    return 0 if all(met.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
