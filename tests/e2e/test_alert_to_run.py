"""End to end with real components: Alertmanager -> receiver -> Prefect -> runbook -> UI.

`make run`'s CLI starts the Prefect server, serves the real catalog and the receiver (the
real routing table, its db-pool-exhausted route in `mode: plan`). The apt
`prometheus-alertmanager` is configured with a webhook receiver and a bearer token; an alert
pushed to its v2 API must become a db-pool-exhausted run (dry run, database from the alert's
label) that completes against the local PostgreSQL. Headless Chromium then opens the Prefect
UI's runs list, finds the run and screenshots it: into a temporary folder, or into
$RUNBOOKS_SCREENSHOT_DIR (`make screenshots` points it at docs/).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.fixtures.stack import Stack, running_stack
from tests.fixtures.triggers import free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ALERTMANAGER = "/usr/bin/prometheus-alertmanager"
CHROMIUM = "/usr/bin/chromium"


def require_binary(path: str) -> None:
    """Skip with the reason when absent; in CI (env CI set) absence is a failure."""
    if shutil.which(path) is None:
        message = f"{path} not installed (scripts/install-system-deps.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("stack")
    with running_stack(home, pool_size=1, catalog=None, routing=plan_only_routing(home)) as s:
        yield s


def plan_only_routing(home: Path) -> Path:
    """The shipped routing table with the db-pool-exhausted route in `mode: plan`: this test
    follows the dry-run path to the UI (the shipped `approve` path, paused and approved in
    the alert's own run, is tests/integration/test_alert_approval.py)."""
    table = yaml.safe_load((REPO / "deployments" / "routing.yaml").read_text())
    for route in table["routes"]:
        if route["runbook"] == "db-pool-exhausted":
            route["mode"] = "plan"
    path = home / "routing.yaml"
    path.write_text(yaml.safe_dump(table))
    return path


@pytest.fixture(scope="module")
def alertmanager(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_binary(ALERTMANAGER)
    tmp = tmp_path_factory.mktemp("alertmanager")
    config = tmp / "alertmanager.yml"
    config.write_text(
        f"""
route:
  receiver: runbooks
  group_by: ['...']
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: runbooks
    webhook_configs:
      - url: {stack.receiver_url}/alerts
        send_resolved: true
        http_config:
          authorization:
            type: Bearer
            credentials: {stack.token}
"""
    )
    port = free_port()
    log = (tmp / "alertmanager.log").open("w")
    proc = subprocess.Popen(
        [
            ALERTMANAGER,
            f"--config.file={config}",
            f"--storage.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError((tmp / "alertmanager.log").read_text())
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def find_runs(stack: Stack, tag: str) -> list[dict[str, Any]]:
    body = {"flow_runs": {"tags": {"all_": [tag]}}}
    r = httpx.post(f"{stack.api_url}/flow_runs/filter", json=body, timeout=10)
    r.raise_for_status()
    result: list[dict[str, Any]] = r.json()
    return result


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def alert_run(stack: Stack, alertmanager: str) -> dict[str, Any]:
    """Push one alert to Alertmanager; return the flow run it produced, once final."""
    labels = {
        "alertname": "DatabaseConnectionPoolExhausted",
        "datname": "postgres",
        "instance": "pg-e2e",
        "severity": "critical",
    }
    now = datetime.now(UTC).isoformat()
    r = httpx.post(
        f"{alertmanager}/api/v2/alerts",
        json=[{"labels": labels, "annotations": {"summary": "e2e"}, "startsAt": now}],
        timeout=10,
    )
    assert r.status_code == 200, r.text
    alerts = httpx.get(f"{alertmanager}/api/v2/alerts", timeout=10).json()
    fingerprint = next(a["fingerprint"] for a in alerts if a["labels"] == labels)
    runs = wait_for(lambda: find_runs(stack, f"alert:{fingerprint}"), 60, "the alert's run")
    assert len(runs) == 1
    run_id = runs[0]["id"]

    def final() -> dict[str, Any] | None:
        run: dict[str, Any] = httpx.get(f"{stack.api_url}/flow_runs/{run_id}", timeout=10).json()
        state = run.get("state") or {}
        return run if state.get("type") in ("COMPLETED", "FAILED", "CRASHED") else None

    run = wait_for(final, 120, "the run to finish")
    run["fingerprint"] = fingerprint
    return dict(run)


def test_alertmanager_alert_runs_the_runbook_in_dry_run(
    stack: Stack, alert_run: dict[str, Any]
) -> None:
    assert alert_run["state"]["type"] == "COMPLETED", stack.log()[-3000:]
    params = alert_run["parameters"]["params"]
    assert params["dry_run"] is True  # route has mode: plan
    assert params["guard"] == {"database": "postgres"}
    assert params["requested_by"] == "alertmanager"
    assert "pg-e2e" in params["reason"]
    tags = set(alert_run["tags"])
    assert {
        "source:alert",
        f"alert:{alert_run['fingerprint']}",
        "alertname:DatabaseConnectionPoolExhausted",
        "runbook:db-pool-exhausted",
    } <= tags
    deployment = httpx.get(
        f"{stack.api_url}/deployments/{alert_run['deployment_id']}", timeout=10
    ).json()
    assert deployment["name"] == "db-pool-exhausted"


def test_redelivery_and_resolution_start_nothing_more(
    stack: Stack, alertmanager: str, alert_run: dict[str, Any]
) -> None:
    fingerprint = alert_run["fingerprint"]
    alerts = httpx.get(f"{alertmanager}/api/v2/alerts", timeout=10).json()
    labels = next(a["labels"] for a in alerts if a["fingerprint"] == fingerprint)
    now = datetime.now(UTC).isoformat()
    r = httpx.post(
        f"{alertmanager}/api/v2/alerts",
        json=[{"labels": labels, "startsAt": alert_run["created"], "endsAt": now}],
        timeout=10,
    )
    assert r.status_code == 200
    wait_for(lambda: "resolved" in stack.log(), 30, "the resolved notification")
    assert len(find_runs(stack, f"alert:{fingerprint}")) == 1


def test_prefect_ui_lists_the_alert_run(
    stack: Stack, alert_run: dict[str, Any], tmp_path: Path
) -> None:
    require_binary(CHROMIUM)
    from playwright.sync_api import sync_playwright

    # `make test` leaves the work tree clean; `make screenshots` refreshes docs/.
    folder = Path(os.environ.get("RUNBOOKS_SCREENSHOT_DIR") or tmp_path)
    shot = folder / "ui-flow-runs.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.goto(f"{stack.prefect_url}/runs", wait_until="networkidle", timeout=60_000)
            page.get_by_text(alert_run["name"]).first.wait_for(timeout=60_000)
            page.screenshot(path=str(shot), full_page=False)
            page.goto(
                f"{stack.prefect_url}/runs/flow-run/{alert_run['id']}",
                wait_until="networkidle",
                timeout=60_000,
            )
            # The run page: its name and its tags are rendered (tags may sit in a collapsed list).
            page.get_by_text(alert_run["name"]).first.wait_for(timeout=60_000)
            page.get_by_text("source:alert").first.wait_for(state="attached", timeout=60_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(folder / "ui-flow-run.png"), full_page=False)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
