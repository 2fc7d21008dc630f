"""Slack approval buttons end to end: a paused alert run, its request posted as Block Kit
through a `slack-app` block, clicks signed as Slack signs them, the run acting.

Real Prefect test server, the real receiver under uvicorn, a real paused run of the throwaway
runbook (`stale-flag`, alert-started, so it pages its approvers), and a local sink speaking
Slack's Web API (tests/fixtures/slack_api.py): Slack itself is the only stand-in. The
escalation config puts every contact on the `slack-app` block and maps Slack users to
contacts: `U0ONCALL` is the on-call (an allowed approver of `stale-flag`), `U0DBTEAM` the
database team (not allowed here), `U0NOBODY` nobody.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
import yaml
from prefect.blocks.core import Block
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL

from deployments.blocks import main as blocks_main
from deployments.serve import to_deployments
from deployments.warm_pool import execute
from tasks.approvals.signing import verify_link
from tasks.approvals.store import read_votes
from tasks.slack_app import SlackApp
from tests.fixtures.approvals import KEY
from tests.fixtures.link_runs import link_receiver
from tests.fixtures.prefect_runs import flow_run_artifacts, flow_run_logs
from tests.fixtures.sinks import CONTACTS
from tests.fixtures.slack_api import SlackApi, click_body, signed_headers
from tests.fixtures.throwaway_runbook import read_flag, stale_flag, stale_key
from tests.fixtures.triggers import LiveServer, alert
from tests.integration.test_alert_approval import (
    CATALOG,
    ended,
    fire,
    read_run,
    wait_paused,
)

USERS = {"on-call": ["U0ONCALL"], "team-lead": ["U0LEAD"], "db-team": ["U0DBTEAM"]}
CHANNEL = "C0INCIDENTS"


@pytest.fixture
def slack_app(
    prefect_api: None, slack_api: SlackApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, str]]:
    """A `slack-app` block on the sink, saved by `blocks create`; every contact on it."""
    name = f"test-app-{secrets.token_hex(4)}"
    signing = "slack-signing-" + secrets.token_hex(16)
    monkeypatch.setenv("RUNBOOKS_SLACK_BOT_TOKEN", slack_api.bot_token)
    monkeypatch.setenv("RUNBOOKS_SLACK_SIGNING_SECRET", signing)
    monkeypatch.setenv("RUNBOOKS_SLACK_API_URL", slack_api.url)
    assert blocks_main(["create", "slack-app", name, CHANNEL]) == 0
    # As the notify task loads it: by `slack-app/<name>`, the class found by its slug.
    loaded = Block.load(f"slack-app/{name}")
    assert isinstance(loaded, SlackApp)
    assert (loaded.channel, loaded.api_url) == (CHANNEL, slack_api.url)
    config = {
        "contacts": {
            c: {"channels": [f"slack-app/{name}"], "slack_user_ids": USERS.get(c, [])}
            for c in CONTACTS
        },
        "topics": {"database": "db-team", "security": "security-team"},
        "default_topic_contact": "incidents",
    }
    path = tmp_path / "escalation.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("RUNBOOKS_ESCALATION_CONFIG_FILE", str(path))
    yield name, signing
    with get_client(sync_client=True) as client:
        assert loaded._block_document_id is not None
        client.delete_block_document(loaded._block_document_id)


@pytest.fixture
def receiver(
    prefect_api: None, slack_app: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[LiveServer]:
    """The receiver on a loopback port, `stale-flag` registered (as test_alert_approval)."""
    for deployment in to_deployments(CATALOG):
        deployment.apply()
    with link_receiver(monkeypatch) as server:
        yield server


@pytest.fixture
def key() -> Iterator[str]:
    with stale_key("slack") as made:
        yield made


def click(server: LiveServer, body: bytes, headers: dict[str, str]) -> httpx.Response:
    """Slack posting an interaction to the receiver (no bearer token: Slack has none)."""
    return httpx.post(f"{server.url}/slack/interactions", content=body, headers=headers, timeout=10)


def request_for(api: SlackApi, recipient: str) -> dict[str, Any]:
    """The Block Kit request posted for `recipient` (as Slack stores it: with channel, ts)."""
    found = [m for m in api.messages.values() if f"asks *{recipient}* to approve" in json.dumps(m)]
    assert len(found) == 1, [m.get("text") for m in api.messages.values()]
    return found[0]


def votes(run_id: UUID) -> list[tuple[str, str, str]]:
    with get_client(sync_client=True) as client:
        found, broken = read_votes(client, run_id, KEY)
    assert broken == 0
    return sorted((v.approver, v.channel, v.choice) for v in found)


def test_a_slack_click_signed_by_slack_approves_and_the_run_acts(
    receiver: LiveServer,
    slack_app: tuple[str, str],
    slack_api: SlackApi,
    key: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    _, signing = slack_app
    run_id = fire(receiver, alert(alertname="FlagStale", key=key))
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(execute_stale_flag, run_id)
        wait_paused(run_id, future)
        # Each allowed approver of the default rule: its own Block Kit message, two buttons.
        posted = slack_api.wait_for("chat.postMessage", 3)
        assert {c.token for c in posted} == {slack_api.bot_token}
        message = request_for(slack_api, "on-call")
        assert message["channel"] == CHANNEL and message["blocks"][0]["type"] == "header"
        approve, refuse = message["blocks"][-1]["elements"]
        assert (approve["action_id"], approve["style"]) == ("approval-approve", "primary")
        assert (refuse["action_id"], refuse["style"]) == ("approval-refuse", "danger")
        assert "confirm" in refuse
        claims = verify_link(approve["value"], KEY)
        assert (claims.run, claims.recipient, claims.choice) == (str(run_id), "on-call", "approve")
        tokens = [
            e["value"]
            for m in slack_api.messages.values()
            for b in m["blocks"]
            if b["type"] == "actions"
            for e in b["elements"]
        ]
        assert len(tokens) == 6

        body = click_body(message, "U0ONCALL", "approval-approve")
        # A wrong signature, an old or a malformed timestamp: 401, nothing recorded.
        assert click(receiver, body, signed_headers("not-the-secret", body)).status_code == 401
        old = int(time.time()) - 6 * 60
        assert (
            click(receiver, body, signed_headers(signing, body, timestamp=old)).status_code == 401
        )
        bad_ts = signed_headers(signing, body) | {"X-Slack-Request-Timestamp": "12a"}
        assert click(receiver, body, bad_ts).status_code == 401
        tampered = body.replace(b"U0ONCALL", b"U0LEADXX")
        assert click(receiver, tampered, signed_headers(signing, body)).status_code == 401
        assert votes(run_id) == []
        assert read_run(run_id).state.is_paused()  # type: ignore[union-attr]

        # A Slack user mapped to no contact, then a contact the rule does not allow:
        # recorded, not counted; only they are told; the buttons stay; the run still waits.
        for user in ("U0NOBODY", "U0DBTEAM"):
            outsider = click_body(message, user, "approval-approve")
            assert click(receiver, outsider, signed_headers(signing, outsider)).status_code == 200
        notices = slack_api.wait_for("chat.postEphemeral", 2)
        assert sorted((n.body["user"], n.body["channel"]) for n in notices) == [
            ("U0DBTEAM", CHANNEL),
            ("U0NOBODY", CHANNEL),
        ]
        assert all("not an allowed approver" in n.body["text"] for n in notices)
        assert votes(run_id) == [
            ("db-team", "slack", "approve"),
            ("slack:U0NOBODY", "slack", "approve"),
        ]
        assert slack_api.of("chat.update") == []
        time.sleep(1)
        assert read_run(run_id).state.is_paused()  # type: ignore[union-attr]
        assert read_flag(key) == "stale"

        # The on-call clicks Approve: answered at once, counted, the run acts.
        started = time.monotonic()
        r = click(receiver, body, signed_headers(signing, body))
        assert r.status_code == 200 and time.monotonic() - started < 3
        run = ended(run_id, future)
    assert run.state is not None and run.state.is_completed(), run.state
    assert read_flag(key) == "ok"
    # The message now says who decided what, when; its buttons are gone.
    (update,) = slack_api.wait_for("chat.update")
    assert (update.body["channel"], update.body["ts"]) == (CHANNEL, message["ts"])
    assert update.token == slack_api.bot_token
    assert "Approve by on-call recorded. Approved" in update.body["text"]
    assert not [b for b in update.body["blocks"] if b["type"] == "actions"]
    decided = json.dumps(update.body["blocks"])
    assert "approve by on-call (<@U0ONCALL>) at" in decided and "UTC" in decided
    (md,) = flow_run_artifacts(run_id, "stale-flag")
    rows = [line for line in md.splitlines() if r"| Slack \(verified\) |" in line]
    assert len(rows) == 3, md
    assert "| on-call |" in rows[-1] and "| approve | yes |" in rows[-1]
    for name in ("slack:U0NOBODY", "db-team"):
        (row,) = [r for r in rows if r.startswith(f"| {name} |")]
        assert "| approve | no: not an allowed approver of this plan |" in row
    # No bot token, signing secret or link token in any log or the run's artifacts.
    leaks = [slack_api.bot_token, signing, *tokens]
    seen = "\n".join([caplog.text, md, *flow_run_logs(run_id)])
    assert not [s for s in leaks if s in seen]


def execute_stale_flag(run_id: UUID) -> str:
    """The run, executed as the warm pool executes alert runs."""
    return str(execute(run_id, stale_flag))


def test_a_refuse_click_from_an_allowed_approver_refuses(
    receiver: LiveServer, slack_app: tuple[str, str], slack_api: SlackApi, key: str
) -> None:
    _, signing = slack_app
    run_id = fire(receiver, alert(alertname="FlagStale", key=key))
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(execute_stale_flag, run_id)
        wait_paused(run_id, future)
        slack_api.wait_for("chat.postMessage", 3)
        message = request_for(slack_api, "team-lead")
        body = click_body(message, "U0LEAD", "approval-refuse")
        assert click(receiver, body, signed_headers(signing, body)).status_code == 200
        run = ended(run_id, future)
    assert read_flag(key) == "stale"
    (update,) = slack_api.wait_for("chat.update")
    assert "Refuse by team-lead recorded. Refused" in update.body["text"]
    (md,) = flow_run_artifacts(run_id, "stale-flag")
    assert r"| team-lead | Slack \(verified\) |" in md and "| refuse | yes |" in md
    assert run.state is not None and run.state.is_final()


def test_blocks_check_registers_slack_app_and_create_takes_secrets_from_env_only(
    prefect_api: None, slack_api: SlackApi, tmp_path: Path
) -> None:
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    check = subprocess.run(
        [sys.executable, "-m", "deployments.blocks", "check"], env=env, capture_output=True
    )
    assert check.returncode in (0, 1), check.stderr  # 1: default contacts have no block
    with get_client(sync_client=True) as client:
        assert client.read_block_type_by_slug("slack-app").slug == "slack-app"
    signing = "slack-signing-" + secrets.token_hex(16)
    name = f"cli-app-{secrets.token_hex(4)}"
    made = subprocess.run(
        [sys.executable, "-m", "deployments.blocks", "create", "slack-app", name, CHANNEL],
        env={
            **env,
            "RUNBOOKS_SLACK_BOT_TOKEN": slack_api.bot_token,
            "RUNBOOKS_SLACK_SIGNING_SECRET": signing,
            "RUNBOOKS_SLACK_API_URL": slack_api.url,
        },
        capture_output=True,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    assert f"saved slack-app/{name}" in made.stderr
    for secret in (slack_api.bot_token, signing):
        assert secret not in made.stdout + made.stderr
    block = Block.load(f"slack-app/{name}")
    assert isinstance(block, SlackApp)
    block.notify(body="pool still exhausted", subject="[CRITICAL] database", _sync=True)  # type: ignore[call-arg]
    (call,) = slack_api.wait_for("chat.postMessage")
    assert call.body["channel"] == CHANNEL and "pool still exhausted" in call.body["text"]
    # Without the secrets in the environment and no terminal to ask at: refused.
    bare = subprocess.run(
        [sys.executable, "-m", "deployments.blocks", "create", "slack-app", name, CHANNEL],
        env=env,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert bare.returncode == 2 and "RUNBOOKS_SLACK_BOT_TOKEN" in bare.stderr
