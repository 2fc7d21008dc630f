"""Bench: plan and terminate N idle sessions with the guarded single statement.

Starts a private PostgreSQL cluster (initdb in a temp dir, loopback only, max_connections
raised) so the shared server is not disturbed, opens N idle sessions (N = 100, 500, 1000),
then times `select_sessions` (plan) and `kill_planned` (one guarded statement), against
the by-hand baseline of one `SELECT pg_terminate_backend(pid)` per session.

Run: .venv/bin/python bench/terminate_sessions.py [N ...]      Target: 1,000 in < 2 s.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
from pydantic import SecretStr

from tasks.postgres import TerminationGuard, kill_planned, select_sessions
from tasks.settings import PostgresSettings

SIZES = [int(a) for a in sys.argv[1:]] or [100, 500, 1000]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def private_cluster(max_connections: int) -> Iterator[int]:
    """initdb + pg_ctl start on a free loopback port; stopped and removed afterwards."""
    bindir = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
    run_as: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="rb-bench-pg-"))
    if os.geteuid() == 0:  # initdb refuses root: run the cluster as `postgres`
        pw = pwd.getpwnam("postgres")
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data, port = tmp / "data", free_port()
    subprocess.run(
        [*run_as, f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    opts = f"-p {port} -c listen_addresses=127.0.0.1 -c max_connections={max_connections} -k {tmp}"
    subprocess.run(
        [
            *run_as,
            f"{bindir}/pg_ctl",
            "-D",
            str(data),
            "-o",
            opts,
            "-l",
            str(tmp / "log"),
            "-w",
            "start",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    try:
        yield port
    finally:
        subprocess.run(
            [*run_as, f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"],
            check=False,
            stdout=subprocess.DEVNULL,
        )
        shutil.rmtree(tmp, ignore_errors=True)


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
    with private_cluster(max(SIZES) + 50) as port:
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

            # Baseline: what the seed does by hand, one pg_terminate_backend per pid.
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
