"""Every evidence check of `high-error-rate`, timed one after the other and all at once.

Against the started sandbox platform (`tests/fixtures/platform.py`): the backend on its
own PostgreSQL database and the local Redis, a real Prometheus scraping it every second, and
the test Kubernetes control plane (Deployment `akig-backend`, the backend's lines as its
pods' logs) when its binaries are built. The :v2 release is rolled out first, so the
evidence has errors to find. Each round runs the checks the flow submits
(`flows.high_error_rate.evidence_checks`, the same tasks and arguments) sequentially, then
concurrently in threads, as Prefect's default task runner does. Target: all evidence < 3 s.

    .venv/bin/python bench/diagnose.py [--rounds 5] [--no-kube]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DO_NOT_TRACK", "1")

from tests.fixtures.platform import running_platform

TARGET_S = 3.0


def timed(fn: Any) -> tuple[float, str]:
    start = time.perf_counter()
    try:
        fn()
        outcome = "ok"
    except Exception as exc:  # a bench reports a failing check and goes on
        outcome = f"failed: {type(exc).__name__}"
    return time.perf_counter() - start, outcome


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-kube", action="store_true")
    args = parser.parse_args()
    with running_platform(kube=not args.no_kube) as platform:
        os.environ.update(platform.env)
        # Imported after the environment is set: settings are read when the checks are built.
        from flows.high_error_rate import HighErrorRateParams, evidence_checks

        print(f"kube: {'yes' if platform.cluster else 'no (checks report unavailable)'}")
        with platform.traffic():
            time.sleep(3)  # a few scrapes of healthy traffic first
            if platform.cluster is not None:
                platform.roll_out("v2", 2)
            params = HighErrorRateParams()
            seq: dict[str, list[float]] = {}
            conc: dict[str, list[float]] = {}
            seq_totals: list[float] = []
            conc_totals: list[float] = []
            outcomes: dict[str, str] = {}
            for _ in range(args.rounds):
                checks = evidence_checks(params)
                start = time.perf_counter()
                for name, check in checks.items():
                    took, outcomes[name] = timed(check.call)
                    seq.setdefault(name, []).append(took)
                seq_totals.append(time.perf_counter() - start)
                checks = evidence_checks(params)
                start = time.perf_counter()
                with ThreadPoolExecutor(len(checks)) as pool:
                    futures = {n: pool.submit(timed, c.call) for n, c in checks.items()}
                    for name, fut in futures.items():
                        took, _ = fut.result()
                        conc.setdefault(name, []).append(took)
                conc_totals.append(time.perf_counter() - start)
    print(f"\nmedian of {args.rounds} rounds, seconds")
    print(f"{'check':<10} {'sequential':>11} {'concurrent':>11}  outcome")
    for name in seq:
        print(
            f"{name:<10} {statistics.median(seq[name]):>11.3f} "
            f"{statistics.median(conc[name]):>11.3f}  {outcomes[name]}"
        )
    seq_total = statistics.median(seq_totals)
    conc_total = statistics.median(conc_totals)
    print(f"{'TOTAL':<10} {seq_total:>11.3f} {conc_total:>11.3f}")
    print(f"max concurrent total {max(conc_totals):.3f} s; target < {TARGET_S:g} s")
    return 0 if conc_total < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
