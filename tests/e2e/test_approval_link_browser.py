"""A real browser approves a paused alert run from the link on the on-call's page.

An alert reaches the receiver (real uvicorn), its `stale-flag` run (the throwaway runbook,
a real Redis key) pauses and pages the on-call through the local PagerDuty-shaped sink.
Headless Debian Chromium opens the Approve link taken from that page's text, reads the
plan, types a reason and clicks confirm; the same run acts: the key is set back.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.test_alert_to_run import CHROMIUM, require_binary
from tests.fixtures.link_runs import link_receiver, links_in, paused_run
from tests.fixtures.prefect_runs import flow_run_artifacts
from tests.fixtures.throwaway_runbook import read_flag, stale_key
from tests.fixtures.triggers import LiveServer
from tests.integration.test_alert_approval import served  # noqa: F401  # the deployment

pytestmark = pytest.mark.e2e


@pytest.fixture
def receiver(served: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveServer]:  # noqa: F811
    with link_receiver(monkeypatch) as server:
        yield server


@pytest.fixture
def flag() -> Iterator[str]:
    with stale_key("browser") as made:
        yield made


def test_chromium_opens_the_approve_link_from_the_page_confirms_and_the_run_acts(
    receiver: LiveServer, flag: str, world_env: Any
) -> None:
    require_binary(CHROMIUM)
    from playwright.sync_api import sync_playwright

    world = world_env()
    with paused_run(receiver, flag) as run:
        (page_sent,) = [p for p in world.sink["on-call"].delivered if "/approvals/" in str(p)]
        approve = links_in(page_sent)["approve"]
        assert approve.startswith(f"{receiver.url}/approvals/")
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-gpu", "--no-first-run"],
            )
            try:
                page = browser.new_page()
                shown = page.goto(approve, wait_until="load", timeout=60_000)
                assert shown is not None and shown.status == 200
                assert page.title() == "Approve stale-flag?"
                plan = page.locator("ul").first.inner_text()
                assert "reset-flag" in plan and flag in plan
                assert "on-call" in page.locator("dl").inner_text()
                assert run.state().is_paused()  # opening the page decided nothing
                page.fill("#reason", "INC-20 browser: flag checked by hand")
                with page.expect_navigation(timeout=120_000):
                    page.click("button[type=submit]")
                outcome = page.locator("body").inner_text()
                assert page.title() == "Decision recorded", outcome
                assert "Approve by on-call recorded" in outcome
                assert page.url == f"{receiver.url}/approvals"  # the token left the address bar
            finally:
                browser.close()
        run.future.result(timeout=120)
    assert run.state().is_completed()
    assert read_flag(flag) == "ok"
    (md,) = flow_run_artifacts(run.id, "stale-flag")
    assert "INC-20 browser: flag checked by hand" in md
    assert "approved by **on-call**" in md
