"""Signed approval links end to end: a paused alert run, the receiver's link pages, the vote.

Real Prefect test server, the real receiver under uvicorn, an alert run of the throwaway
runbook (`stale-flag`, a real Redis key) paused for approval. A link's GET shows the plan
and records nothing; its confirm POST records the recipient's verified decision and the
run counts it. Every refusal (forged, malformed, expired, wrong run, not waiting, stale
plan, reused) is a clear page that records nothing. No token and no key in the logs, the
run's artifacts or the pages.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.approvals import KEY, current_request, link_token
from tests.fixtures.link_runs import (
    PausedRun,
    confirm,
    link_receiver,
    links_in,
    open_link,
    paused_run,
    wait_until,
)
from tests.fixtures.prefect_runs import flow_run_artifacts, flow_run_logs
from tests.fixtures.throwaway_runbook import read_flag, stale_key
from tests.fixtures.triggers import LiveServer
from tests.integration.test_alert_approval import served  # noqa: F401  # the deployment

TWO_APPROVERS = Path(__file__).resolve().parents[1] / "fixtures" / "two_approvers.yaml"
SECURITY_HEADERS = {
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
    "x-robots-tag": "noindex",
}


@pytest.fixture
def receiver(served: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveServer]:  # noqa: F811
    with link_receiver(monkeypatch) as server:
        yield server


@pytest.fixture
def flag() -> Iterator[str]:
    with stale_key("links") as made:
        yield made


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO)
    # The test's own HTTP client logs each URL it requests, links included: not the product.
    caplog.set_level(logging.WARNING, "httpx")
    return caplog


def assert_secret_free(texts: list[str], tokens: list[str]) -> None:
    """No token and no signing key in any of `texts`."""
    for text in texts:
        assert KEY.decode() not in text
        for token in tokens:
            assert token not in text
            assert token.split(".")[1] not in text  # not even the signature part


def run_texts(run: PausedRun) -> list[str]:
    return flow_run_artifacts(run.id) + flow_run_logs(run.id)


def test_a_link_shows_the_plan_records_nothing_and_its_confirm_approves(
    receiver: LiveServer, flag: str, world_env: Any, logs: pytest.LogCaptureFixture
) -> None:
    world = world_env()
    with paused_run(receiver, flag) as run:
        # The on-call's own page carries their links, pointing at this receiver.
        (page,) = [p for p in world.sink["on-call"].delivered if "/approvals/" in str(p)]
        links = links_in(page)
        token = links["approve"].rsplit("/", 1)[1]
        for _ in range(2):  # a link preview, then the person: neither decides
            shown = open_link(receiver, token)
            assert shown.status_code == 200, shown.text
        for name, value in SECURITY_HEADERS.items():
            assert shown.headers[name] == value
        csp = shown.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "form-action 'self'" in csp
        html = shown.text
        assert "stale-flag" in html and "on-call" in html and "Confirm: Approve" in html
        assert flag in html  # the plan line names the key
        assert "1 of on-call, on-call-secondary, team-lead" in html  # who must approve
        assert "<h2>Evidence</h2><pre>" in html
        assert html.count(token) == 1 and f'name="token" value="{token}"' in html  # form only
        assert run.votes() == []
        assert run.state().is_paused()
        done = confirm(receiver, token, "INC-20: <checked> the flag")
        assert done.status_code == 200, done.text
        assert "Approve by on-call recorded" in done.text and "/runs/flow-run/" in done.text
        assert run.future.result(timeout=120)
    assert run.state().is_completed()
    assert read_flag(flag) == "ok"
    (md,) = flow_run_artifacts(run.id, "stale-flag")
    assert "| on-call | signed link \\(verified\\) |" in md and "INC-20" in md
    assert "approved by **on-call**" in md
    # The run is decided: the other recipients' links now say so, and record nothing.
    late = link_token(run.id, "team-lead", plan=current_request(run.id).plan)
    for answer in (open_link(receiver, late), confirm(receiver, late)):
        assert answer.status_code == 409 and "no longer waits" in answer.text
    assert "approval link refused (GET): run" in logs.text
    tokens = [links["approve"].rsplit("/", 1)[1], links["refuse"].rsplit("/", 1)[1], late]
    assert_secret_free([logs.text, *run_texts(run), done.text], tokens)


def test_a_refuse_link_refuses_and_nothing_changes(
    receiver: LiveServer, flag: str, world_env: Any
) -> None:
    world_env()
    with paused_run(receiver, flag) as run:
        token = link_token(run.id, "on-call-secondary", "refuse")
        shown = open_link(receiver, token)
        assert shown.status_code == 200 and "Confirm: Refuse" in shown.text
        done = confirm(receiver, token, "not during the release")
        assert done.status_code == 200 and "Refused: the run changes nothing" in done.text
        run.future.result(timeout=120)
    assert read_flag(flag) == "stale"
    (md,) = flow_run_artifacts(run.id, "stale-flag")
    assert "refused by **on-call-secondary**" in md and "not during the release" in md


def test_forged_malformed_expired_wrong_run_and_stale_links_record_nothing(
    receiver: LiveServer, flag: str, world_env: Any, logs: pytest.LogCaptureFixture
) -> None:
    world_env()
    with paused_run(receiver, flag) as run:
        good = link_token(run.id, "on-call")
        body = good.split(".")[0]
        other = link_token(run.id, "on-call").split(".")[1]
        cases = {
            "forged": (f"{body}.{other}", 403, "not genuine"),
            "malformed": ("not-a-token", 400, "not an approval link"),
            "expired": (link_token(run.id, "on-call", ttl_s=-5), 410, "expired"),
            "wrong run": (link_token(uuid.uuid4(), "on-call", plan="a" * 32), 404, "Wrong run"),
            "stale": (link_token(run.id, "on-call", plan="b" * 32), 409, "older plan"),
        }
        pages = []
        for case, (token, status, words) in cases.items():
            for answer in (open_link(receiver, token), confirm(receiver, token, "x")):
                assert answer.status_code == status, (case, answer.text)
                assert words in answer.text, (case, answer.text)
                assert answer.headers["cache-control"] == "no-store"
                pages.append(answer.text)
        assert "the run re-planned" in pages[-1]
        assert run.votes() == []
        assert run.state().is_paused()
        for reason in ("forged", "malformed", "expired"):
            assert f"approval link refused (POST): {reason}" in logs.text
        assert "wrong run" in logs.text and "re-planned (stale)" in logs.text
        assert confirm(receiver, good, "ok").status_code == 200
        run.future.result(timeout=120)
    assert read_flag(flag) == "ok"
    tokens = [good] + [t for t, _, _ in cases.values() if t.count(".") == 1]
    assert_secret_free([logs.text, *run_texts(run), *pages], tokens)


def test_two_distinct_approvers_needed_a_link_decides_once_and_outsiders_do_not_count(
    receiver: LiveServer,
    flag: str,
    world_env: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    logs: pytest.LogCaptureFixture,
) -> None:
    world = world_env()
    config = yaml.safe_load(world.file.read_text())
    config["approvers"] = yaml.safe_load(TWO_APPROVERS.read_text())["approvers"]
    (tmp_path / "escalation.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("RUNBOOKS_ESCALATION_CONFIG_FILE", str(tmp_path / "escalation.yaml"))
    with paused_run(receiver, flag) as run:
        plan = current_request(run.id).plan
        nonce = "n" + uuid.uuid4().hex[:12]
        approve = link_token(run.id, "on-call", "approve", plan=plan, nonce=nonce)
        refuse = link_token(run.id, "on-call", "refuse", plan=plan, nonce=nonce)
        first = confirm(receiver, approve, "one of two")
        assert first.status_code == 200 and "Still needed: 1 more for reset-flag" in first.text
        # One is not enough: the run counts it and pauses again.
        wait_until(lambda: len(run.votes()) == 1, "the first vote")
        wait_until(lambda: run.state().is_paused(), "the run to pause again")
        assert read_flag(flag) == "stale"
        # The same recipient's other link (one nonce: one use), and the same link again.
        for token in (refuse, approve):
            shown = open_link(receiver, token)
            assert shown.status_code == 409 and "already used" in shown.text
            again = confirm(receiver, token, "second try")
            assert again.status_code == 409 and "already used" in again.text
        # Someone the rule does not name: recorded, not counted.
        outsider = confirm(receiver, link_token(run.id, "leadership", plan=plan), "me too")
        assert outsider.status_code == 403 and "recorded, not counted" in outsider.text
        assert len(run.votes()) == 2
        assert run.state().is_paused()
        second = confirm(receiver, link_token(run.id, "team-lead", plan=plan), "two of two")
        assert second.status_code == 200 and "Approved: the run goes on" in second.text
        run.future.result(timeout=120)
    assert run.state().is_completed()
    assert read_flag(flag) == "ok"
    (md,) = flow_run_artifacts(run.id, "stale-flag")
    assert "2 of on-call, on-call-secondary, team-lead" in md
    assert "approved by **on-call, team-lead**" in md
    assert "leadership" in md and "no: not an allowed approver of this plan" in md
    assert "second try" not in md  # the reused link recorded nothing
    assert_secret_free([logs.text, *run_texts(run)], [approve, refuse])
