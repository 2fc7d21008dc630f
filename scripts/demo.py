"""`make demo`: a bad release, found and undone by the `high-error-rate` runbook.

1. Starts the sandbox platform (`tests/fixtures/platform.py`): PostgreSQL database, the
   backend, Prometheus scraping it every second, and the test Kubernetes control plane with
   Deployment `akig-backend` :v1 whose image tag the backend follows.
2. Sends traffic, then rolls out :v2 (the buggy release: 30 % of /api answered 500) and
   waits until Prometheus sees the 5xx ratio above 5 %.
3. Runs `high-error-rate` with `dry_run=False` and `auto_approve=True` on a throwaway
   Prefect API: evidence, scenario D, rollout undo, wait, verification by Prometheus.
4. Prints the run's audit artifact and the Deployment's image before and after, then
   stops and removes everything.

Needs the Kubernetes test binaries (`make kube`); without them it says so and exits 2.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from tests.fixtures.kube import missing_reason
from tests.fixtures.platform import running_platform


def wait_for(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.5)
    raise SystemExit(f"demo: timed out after {timeout:g} s waiting for {what}")


def main() -> int:
    reason = missing_reason()
    if reason:
        print(f"demo: needs the Kubernetes test control plane: {reason}", file=sys.stderr)
        return 2
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.testing.utilities import prefect_test_harness

    print("demo: starting the sandbox platform (PostgreSQL, Kubernetes API, backend, Prometheus)")
    with running_platform(kube=True) as platform:
        os.environ.update(platform.env)
        from flows.high_error_rate import (
            RUNBOOK,
            ErrorRateNotRecovered,
            HighErrorRateParams,
            high_error_rate,
        )

        def image() -> str:
            dep = platform.apps.read_namespaced_deployment("akig-backend", "default")
            return str(dep.spec.template.spec.containers[0].image)

        with platform.traffic():
            wait_for(lambda: platform.ratio() is not None, 60, "healthy traffic in Prometheus")
            print(f"demo: healthy: image {image()}, 5xx ratio {platform.ratio():.1%}")
            platform.roll_out("v2", 2)
            print(f"demo: rolled out {image()} (the buggy release)")
            wait_for(lambda: (platform.ratio() or 0) > 0.05, 90, "the 5xx ratio above 5 %")
            print(f"demo: 5xx ratio now {platform.ratio():.1%}: running {RUNBOOK}")
            print("demo: starting a throwaway Prefect API (~20 s)")
            with prefect_test_harness(server_startup_timeout=120):
                params = HighErrorRateParams(
                    dry_run=False,
                    auto_approve=True,
                    verify_window="15s",
                    verify_timeout_s=180,
                    requested_by="make demo",
                    reason="demo: bad :v2 rollout",
                )
                failed = False
                try:
                    out = high_error_rate(params)
                    print(f"demo: run ended: {out.outcome}: {out.note}")
                except ErrorRateNotRecovered as exc:
                    failed = True
                    print(f"demo: run FAILED: {exc}")
                with get_client(sync_client=True) as client:
                    arts = client.read_artifacts(
                        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[RUNBOOK]))
                    )
                arts.sort(key=lambda a: a.created or 0)
                print("\n" + "=" * 30 + " audit artifact " + "=" * 30)
                print(str(arts[-1].data) if arts else "(no artifact)")
                print("=" * 76)
        release = platform.backend.backend.release.current()
        print(f"demo: image now {image()}; backend release {release}")
        print("demo: stopping and removing the platform")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
