"""Bench: plan and terminate N idle sessions with the guarded single statement.

Starts a private PostgreSQL cluster (initdb in a temp dir, loopback only, max_connections
raised) so the shared server is not disturbed, opens N idle sessions (N = 100, 500, 1000),
then times `select_sessions` (plan) and `kill_planned` (one guarded statement), against
the by-hand baseline of one `SELECT pg_terminate_backend(pid)` per session.

Run: .venv/bin/python bench/terminate_sessions.py [N ...]      Target: 1,000 in < 2 s.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
from pydantic import SecretStr

from tasks.postgres import TerminationGuard, kill_planned, select_sessions
from tasks.settings import PostgresSettings

# The private cluster lives with the test fixtures (tests use it too).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.pg_private import private_cluster

SIZES = [int(a) for a in sys.argv[1:]] or [100, 500, 1000]


def open_idle(dsn: str, n: int) -> list[psycopg.Connection[tuple[object, ...]]]:
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda _: psycopg.connect(dsn, autocommit=True), range(n)))


def close_all(conns: list[psycopg.Connection[tuple[object, ...]]]) -> None:
    for c in conns:
        with contextlib.suppress(psycopg.Error):
            c.close()


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 8192)), hard))
    with private_cluster(max(SIZES) + 50) as cluster:
        port = cluster.port
        admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE ROLE bench_app LOGIN")
            conn.execute("CREATE DATABASE bench OWNER bench_app")
        app = f"postgresql://bench_app@127.0.0.1:{port}/bench"
        settings = PostgresSettings(dsn=SecretStr(admin))
        print(f"PostgreSQL private cluster on 127.0.0.1:{port}")
        print(
            f"{'N':>6} {'plan s':>8} {'kill s':>8} {'killed':>7} {'µs/session':>11}"
            f" {'by hand s':>10} {'speed-up':>9}"
        )
        for n in SIZES:
            conns = open_idle(app, n)
            time.sleep(1.1)
            guard = TerminationGuard(database="bench", idle_minutes=1 / 60, max_sessions=n)
            t0 = time.perf_counter()
            plan = select_sessions(guard, settings)
            t1 = time.perf_counter()
            result = kill_planned(plan, settings)
            t2 = time.perf_counter()
            close_all(conns)
            assert len(result.terminated) == n, (len(result.terminated), n)

            # Baseline: what the on-call runbook does by hand, one pg_terminate_backend per pid.
            conns = open_idle(app, n)
            with psycopg.connect(admin, autocommit=True) as conn:
                pids = [c.info.backend_pid for c in conns]
                t3 = time.perf_counter()
                for p in pids:
                    conn.execute("SELECT pg_terminate_backend(%s)", (p,))
                t4 = time.perf_counter()
            close_all(conns)
            time.sleep(0.5)
            plan_s, kill_s, hand_s = t1 - t0, t2 - t1, t4 - t3
            print(
                f"{n:>6} {plan_s:>8.3f} {kill_s:>8.3f} {len(result.terminated):>7}"
                f" {1e6 * (plan_s + kill_s) / n:>11.1f} {hand_s:>10.3f}"
                f" {hand_s / kill_s:>8.1f}x"
            )
        print("target: 1,000 sessions planned + terminated in < 2 s")


if __name__ == "__main__":
    main()
