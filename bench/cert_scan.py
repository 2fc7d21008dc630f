"""Bench: scan 200 local TLS endpoints, concurrently vs one by one; target < 5 s for 200.

Starts a server process (one asyncio loop, 200 loopback ports, each presenting a leaf +
intermediate made here), then measures, in one run:

  1. concurrent   `tasks.tls.probe.fetch_endpoint` (the code `probe_tls_endpoint` runs) on a
                  thread pool as wide as the flow's (`RUNBOOKS_TLS_MAX_WORKERS`, 64)
  2. sequential   the same code, one endpoint after the other
  3. openssl      `openssl s_client` one after the other (the by-hand way), if installed
  4. flow         the `cert-expiry` flow itself (Prefect task per endpoint, thread pool),
                  against a throwaway Prefect API; skip with `--no-flow`

Loopback only; every step is bounded (per-endpoint timeouts, a global alarm).
Run: `.venv/bin/python bench/cert_scan.py [--endpoints 200] [--no-flow]`
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

TARGET_S = 5.0
HOST = "akig.example"


def _serve(
    chain: bytes, key: bytes, count: int, latency_s: float, conn: mp.connection.Connection
) -> None:
    """The server process: all ports on one loop, until the parent says stop."""
    from tests.fixtures.tls import TlsServer

    server = TlsServer()
    conn.send(server.serve(chain, key, count=count, latency_s=latency_s))
    conn.recv()
    server.close()


def _timed(label: str, fn, n: int) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    ok = fn()
    elapsed = time.perf_counter() - started
    print(f"{label:<34} {elapsed:8.3f} s  {elapsed / n * 1000:8.2f} ms/endpoint  ({ok}/{n} ok)")
    return elapsed


class OutOfTime(Exception):
    """The whole bench exceeded --budget-s."""


def _out_of_time(signum: int, frame: object) -> None:
    raise OutOfTime("bench exceeded its time budget")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", type=int, default=200)
    parser.add_argument("--no-flow", action="store_true", help="skip the Prefect flow run")
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=20.0,
        help="server answers this late (a far host; loopback alone has no network wait)",
    )
    parser.add_argument("--budget-s", type=int, default=300, help="hard cap on the whole run")
    args = parser.parse_args()
    signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(args.budget_s)  # never hang a CI job; the handler lets cleanup run
    n = args.endpoints

    from tasks.settings import TlsSettings
    from tasks.tls.probe import fetch_endpoint
    from tests.fixtures.tls import CertFactory

    pki = CertFactory()
    leaf = pki.leaf(days_left=60)
    parent, child = mp.Pipe()
    server = mp.get_context("spawn").Process(
        target=_serve,
        args=(leaf.chain_pem(), leaf.key_pem, n, args.latency_ms / 1000, child),
        daemon=True,
    )
    server.start()
    try:
        ports: list[int] = parent.recv()
        endpoints = [f"{HOST}@127.0.0.1:{p}" for p in ports]
        workers = TlsSettings().max_workers
        print(
            f"{n} TLS endpoints on loopback (EC P-256 leaf + intermediate), server answers after "
            f"{args.latency_ms:g} ms, {os.cpu_count()} CPUs"
        )

        def one(ep: str) -> bool:
            scan = fetch_endpoint(ep, timeout_s=5)
            return len(scan.certificates) == 2 and scan.chain_observed

        fetch_endpoint(endpoints[0])  # warm-up: imports, first handshake
        results: dict[str, float] = {}
        results["concurrent"] = _timed(
            f"concurrent ({workers} threads)",
            lambda: sum(ThreadPoolExecutor(workers).map(one, endpoints)),
            n,
        )
        results["sequential"] = _timed(
            "sequential (same code)", lambda: sum(map(one, endpoints)), n
        )

        openssl = shutil.which("openssl")
        if openssl:

            def s_client(ep: str) -> bool:
                port = ep.rsplit(":", 1)[1]
                command = [
                    openssl,
                    "s_client",
                    "-connect",
                    f"127.0.0.1:{port}",
                    "-servername",
                    HOST,
                    "-showcerts",
                ]
                try:
                    proc = subprocess.run(
                        command, input=b"", capture_output=True, timeout=5, check=False
                    )
                except subprocess.TimeoutExpired:
                    return False
                return proc.stdout.count(b"-----BEGIN CERTIFICATE-----") == 2

            results["openssl"] = _timed(
                "openssl s_client, sequential", lambda: sum(map(s_client, endpoints)), n
            )
        else:
            print("openssl s_client, sequential       (openssl not installed: skipped)")

        if not args.no_flow:
            from prefect.testing.utilities import prefect_test_harness

            from flows.cert_expiry import CertExpiryParams, cert_expiry

            started = time.perf_counter()
            with prefect_test_harness(server_startup_timeout=120):
                print(f"(throwaway Prefect API up in {time.perf_counter() - started:.1f} s)")

                def run_flow(eps: list[str]) -> int:
                    params = CertExpiryParams(files=[], endpoints=eps, connect_timeout_s=5)
                    state = cert_expiry(params, return_state=True)
                    result = state.result(raise_on_failure=False)
                    return len(getattr(result, "findings", [])) // 2

                run_flow(endpoints[:1])  # warm-up: flow registration, first API calls
                fixed = _timed("cert-expiry flow, 1 endpoint", lambda: run_flow(endpoints[:1]), 1)
                results["flow"] = _timed(
                    f"cert-expiry flow, {n} endpoints", lambda: run_flow(endpoints), n
                )
                print(
                    f"  flow: {fixed:.2f} s fixed Prefect cost (run, tags, artifacts), "
                    f"{(results['flow'] - fixed) / max(1, n - 1) * 1000:.2f} ms per extra endpoint"
                )

    finally:
        with contextlib.suppress(OSError):
            parent.send("stop")
        server.join(10)
        if server.is_alive():
            server.terminate()

    print()
    speedup = results["sequential"] / results["concurrent"]
    print(f"concurrent vs sequential: {speedup:.1f}x faster")
    if "openssl" in results:
        print(f"concurrent vs openssl s_client: {results['openssl'] / results['concurrent']:.1f}x")
    verdict = {k: v < TARGET_S * n / 200 for k, v in results.items() if k in ("concurrent", "flow")}
    for k, ok in verdict.items():
        print(f"target < {TARGET_S * n / 200:.1f} s for {n} ({k}): {'MET' if ok else 'MISSED'}")
    return 0 if all(verdict.values()) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OutOfTime as exc:
        print(f"ABORTED: {exc}", file=sys.stderr)
        sys.exit(2)
