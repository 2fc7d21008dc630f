"""`python -m drills --screenshots DIR`: the Prefect UI after the drills, before teardown.

The runs list (each alert's runbook run, the `escalate` runs, the `post-incident` drafts the
receiver started when the alerts resolved) as `drill-runs.png`, and for each drill that
reached its incident the post-incident record (its timeline artifact) as
`drill-<name>-incident.png`. Headless Debian Chromium through playwright, as
`make screenshots` takes the e2e ones.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import httpx

from drills.base import Context, Outcome
from drills.evidence import final_run, poll

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _post_incident_artifact(api_url: str, incident: str) -> dict[str, Any] | None:
    """The markdown artifact of the incident's `post-incident` run, once that run is final."""
    body = {"flow_runs": {"tags": {"all_": [f"incident:{incident}"]}}}
    r = httpx.post(f"{api_url}/flow_runs/filter", json=body, timeout=5)
    r.raise_for_status()
    runs = [x for x in r.json() if x["name"].startswith("post-incident")]
    if not runs or final_run(api_url, runs[0]["id"]) is None:
        return None
    body = {"artifacts": {"flow_run_id": {"any_": [runs[0]["id"]]}, "type": {"any_": ["markdown"]}}}
    r = httpx.post(f"{api_url}/artifacts/filter", json=body, timeout=5)
    r.raise_for_status()
    found: list[dict[str, Any]] = r.json()
    return found[0] if found else None


def take(ctx: Context, outcomes: list[Outcome], folder: Path) -> list[Path]:
    """Screenshot each finished drill's runs and incident record into `folder`; the files."""
    from playwright.sync_api import sync_playwright

    stack, _ = ctx.running
    ui = stack.api_url.removesuffix("/api")
    folder.mkdir(parents=True, exist_ok=True)
    shots: list[Path] = []
    records = {
        o.name: poll(partial(_post_incident_artifact, stack.api_url, o.record["incident"]), 60, 0.5)
        for o in outcomes
        if o.record.get("incident")  # a drill that stopped before its incident has none
    }
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            # Tall pages: the UI scrolls inside its own container, so the viewport is the shot.
            page = browser.new_page(viewport={"width": 1440, "height": 1300})
            page.goto(f"{ui}/runs", wait_until="networkidle", timeout=60_000)
            page.get_by_text("post-incident").first.wait_for(timeout=60_000)
            page.wait_for_timeout(1500)  # the state chips and the bar chart settle
            shots.append(folder / "drill-runs.png")
            page.screenshot(path=str(shots[-1]))
            page.set_viewport_size({"width": 1440, "height": 2300})
            for name, art in records.items():
                if art is None:
                    ctx.say(f"screenshots: drill {name}: no post-incident record within 60 s")
                    continue
                page.goto(
                    f"{ui}/artifacts/artifact/{art['id']}", wait_until="networkidle", timeout=60_000
                )
                page.get_by_text("Timeline").first.wait_for(timeout=60_000)
                page.wait_for_timeout(1000)
                shots.append(folder / f"drill-{name}-incident.png")
                page.screenshot(path=str(shots[-1]))
        finally:
            browser.close()
    for shot in shots:
        ctx.say(f"screenshots: {shot}")
    return shots
