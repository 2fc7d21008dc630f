"""Bench: scan 200 local TLS endpoints, concurrently vs one by one; target < 5 s for 200.

Starts a server process (one asyncio loop, 200 loopback ports, half TLS 1.3-only and half
TLS 1.2-only, each presenting a leaf + intermediate made here), a real OCSP responder
(`openssl ocsp`) and a CRL HTTP server for that leaf, then measures, in one run:

  1. concurrent   `tasks.tls.probe.fetch_endpoint` (the code `probe_tls_endpoint` runs) on a
                  thread pool as wide as the flow's (`RUNBOOKS_TLS_MAX_WORKERS`, 64), with
                  revocation checks off, on (OCSP answers; the CRL is the fallback), OCSP
                  only and CRL only
  2. sequential   the same code, one endpoint after the other (revocation off)
  3. openssl      `openssl s_client` one after the other (the by-hand way), if installed
  4. flow         the `cert-expiry` flow itself (batch tasks on a thread pool), revocation
                  off and on, against a throwaway Prefect API; skip with `--no-flow`

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
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
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
    """The server process: all ports on one loop, half TLS 1.3-only and half TLS 1.2-only,
    until the parent says stop."""
    from tests.fixtures.tls import TlsServer

    server = TlsServer()
    tls13 = count // 2
    ports = server.serve(chain, key, count=tls13, latency_s=latency_s, tls13_only=True)
    ports += server.serve(chain, key, count=count - tls13, latency_s=latency_s, tls12_only=True)
    conn.send(ports)
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
    from tasks.tls.revocation import RevocationConfig, clear_crl_cache
    from tests.fixtures.tls import CertFactory, CrlServer, OcspResponder, make_crl

    pki = CertFactory()
    workdir = Path(tempfile.mkdtemp(prefix="cert-scan-"))
    responder = OcspResponder(workdir, pki.intermediate)
    crl_server = CrlServer()
    leaf = pki.leaf(days_left=60, ocsp_url=responder.url, crl_url=crl_server.url("/int.crl"))
    crl_server.files["/int.crl"] = make_crl(pki.intermediate)
    responder.start(good=[leaf])
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
            f"{n} TLS endpoints on loopback ({n // 2} TLS 1.3-only, {n - n // 2} TLS 1.2-only; "
            f"EC P-256 leaf + intermediate), server answers after {args.latency_ms:g} ms, "
            f"{os.cpu_count()} CPUs; OCSP: openssl ocsp, CRL: HTTP on loopback"
        )

        def ocsp_requests() -> int:
            """Requests the responder logged: proof the checks ran, not just the timing."""
            return (workdir / "ocsp.log").read_text(errors="replace").count("Received request")

        off = RevocationConfig.off()
        modes = {
            "revocation off": off,
            "revocation on": RevocationConfig(),
            "OCSP only": RevocationConfig(crl=False, stapling=False),
            "CRL only": RevocationConfig(ocsp=False, stapling=False),
        }

        def checker(config: RevocationConfig) -> Callable[[str], bool]:
            def one(ep: str) -> bool:
                scan = fetch_endpoint(ep, timeout_s=5, revocation=config)
                revocation_ok = config == off or scan.certificates[0].revocation == "good"
                return len(scan.certificates) == 2 and bool(scan.chain_complete) and revocation_ok

            return one

        checker(off)(endpoints[0])  # warm-up: imports, first handshake
        results: dict[str, float] = {}

        def concurrent(config: RevocationConfig) -> int:
            with ThreadPoolExecutor(workers) as pool:
                return sum(pool.map(checker(config), endpoints))

        for label, config in modes.items():
            if label == "CRL only":
                clear_crl_cache()  # its one download is part of the measure
            results[f"concurrent, {label}"] = _timed(
                f"concurrent ({workers} thr), {label}", partial(concurrent, config), n
            )
        results["sequential"] = _timed(
            "sequential (same code), rev. off", lambda: sum(map(checker(off), endpoints)), n
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
                # The flow reads RUNBOOKS_TLS_* at run time, as a deployment would.
                for label, switch in (("revocation off", "false"), ("revocation on", "true")):
                    for name in ("OCSP", "CRL", "OCSP_STAPLING"):
                        os.environ[f"RUNBOOKS_TLS_{name}"] = switch
                    before = ocsp_requests()
                    results[f"flow, {label}"] = _timed(
                        f"cert-expiry flow, {n}, {label}", lambda: run_flow(endpoints), n
                    )
                    print(f"  {ocsp_requests() - before} OCSP requests answered during the run")
                per_extra = (results["flow, revocation off"] - fixed) / max(1, n - 1) * 1000
                print(
                    f"  flow: {fixed:.2f} s fixed Prefect cost (run, tags, artifacts), "
                    f"{per_extra:.2f} ms per extra endpoint (revocation off)"
                )

    finally:
        with contextlib.suppress(OSError):
            parent.send("stop")
        server.join(10)
        if server.is_alive():
            server.terminate()
        responder.close()
        crl_server.close()
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    base = results["concurrent, revocation off"]
    print(f"concurrent vs sequential: {results['sequential'] / base:.1f}x faster")
    if "openssl" in results:
        print(f"concurrent vs openssl s_client: {results['openssl'] / base:.1f}x")
    print(
        f"revocation on costs {results['concurrent, revocation on'] - base:+.2f} s "
        f"for {n} endpoints ({n} OCSP requests; the CRL is the fallback)"
    )
    verdict = {
        k: v < TARGET_S * n / 200
        for k, v in results.items()
        if k.startswith(("concurrent", "flow"))
    }
    for k, ok in verdict.items():
        print(f"target < {TARGET_S * n / 200:.1f} s for {n} ({k}): {'MET' if ok else 'MISSED'}")
    return 0 if all(verdict.values()) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OutOfTime as exc:
        print(f"ABORTED: {exc}", file=sys.stderr)
        sys.exit(2)
