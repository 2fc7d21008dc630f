"""The Slack app block against a local Slack Web API sink, and the interaction route's
refusals that need no Prefect: Block Kit shape, failures classified without a secret."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from deployments.slack_clicks import parse_click
from tasks.approvals.message import ApprovalMessage
from tasks.notify import _classify
from tasks.slack_app import SlackApp, SlackSendError
from tests.fixtures.slack_api import SlackApi, click_body, signed_headers

APPROVE = "eyJhcHByb3ZlIjp0cnVlfQ.approve-token-Zk3"
REFUSE = "eyJyZWZ1c2UiOnRydWV9.refuse-token-Qp8"


def app_block(api: SlackApi, token: str | None = None) -> SlackApp:
    return SlackApp(
        bot_token=SecretStr(token or api.bot_token),
        signing_secret=SecretStr("signing-secret-unit-0123456789"),
        channel="C0UNIT",
        api_url=api.url,
        timeout_s=2,
    )


def message() -> ApprovalMessage:
    return ApprovalMessage(
        run="4b5d0000-0000-0000-0000-000000000001",
        run_name="brave-otter",
        runbook="stale-flag",
        recipient="on-call",
        actions=["reset-flag: SET flags:x ok (was <stale> & old)"],
        needs="1 of on-call, team-lead",
        run_url="http://127.0.0.1:4200/runs/flow-run/4b5d",
        approve_url=SecretStr(f"http://x/approvals/{APPROVE}"),
        refuse_url=SecretStr(f"http://x/approvals/{REFUSE}"),
        approve_token=SecretStr(APPROVE),
        refuse_token=SecretStr(REFUSE),
        expires_at=time.time() + 600,
    )


def test_an_approval_request_is_a_block_kit_message_with_two_buttons(
    slack_api: SlackApi, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    app_block(slack_api).notify_approval(message())
    # slack_sdk logs request bodies at DEBUG: its clients' logger never goes below WARNING.
    assert APPROVE not in caplog.text and slack_api.bot_token not in caplog.text
    (call,) = slack_api.wait_for("chat.postMessage")
    assert call.token == slack_api.bot_token
    body = call.body
    assert body["channel"] == "C0UNIT"
    assert APPROVE not in body["text"] and REFUSE not in body["text"]  # the fallback text
    kinds = [b["type"] for b in body["blocks"]]
    assert kinds[0] == "header" and kinds[-1] == "actions"
    text = json.dumps(body["blocks"][:-1])
    assert "reset-flag: SET flags:x ok (was &lt;stale&gt; &amp; old)" in text
    assert (
        "1 of on-call, team-lead" in text and "<http://127.0.0.1:4200/runs/flow-run/4b5d|" in text
    )
    assert "expire at" in text
    approve, refuse = body["blocks"][-1]["elements"]
    assert (approve["action_id"], approve["style"], approve["value"]) == (
        "approval-approve",
        "primary",
        APPROVE,
    )
    assert (refuse["action_id"], refuse["style"], refuse["value"]) == (
        "approval-refuse",
        "danger",
        REFUSE,
    )
    assert set(refuse["confirm"]) == {"title", "text", "confirm", "deny"}
    assert "confirm" not in approve


def test_notify_posts_plain_text(slack_api: SlackApi) -> None:
    app_block(slack_api).notify(body="disk <full>", subject="[CRITICAL] db")
    (call,) = slack_api.wait_for("chat.postMessage")
    assert call.body["text"] == "*[CRITICAL] db*\ndisk &lt;full&gt;"


def _failure(block: SlackApp) -> SlackSendError:
    with pytest.raises(SlackSendError) as caught:
        block.notify_approval(message())
    exc = caught.value
    # Neither the token, the message nor a link token, not even in the chained context.
    for secret in (block.bot_token.get_secret_value(), APPROVE, REFUSE, "reset-flag"):
        assert secret not in str(exc) and secret not in exc.answer
    assert exc.__cause__ is None and exc.__context__ is None
    return exc


def test_a_refused_call_is_failed_and_not_retried(slack_api: SlackApi) -> None:
    exc = _failure(app_block(slack_api, token="xoxb-wrong-token-123"))
    assert _classify(exc) == ("failed", "Slack chat.postMessage: HTTP 200 invalid_auth", False)


def test_a_503_is_failed_and_retried(slack_api: SlackApi) -> None:
    slack_api.fail_first = 1
    exc = _failure(app_block(slack_api))
    assert _classify(exc) == (
        "failed",
        "Slack chat.postMessage: HTTP 503 service_unavailable",
        True,
    )


def test_a_lost_answer_is_unconfirmed_and_sent_once(slack_api: SlackApi) -> None:
    slack_api.drop_first = 5
    status, answer, retryable = _classify(_failure(app_block(slack_api)))
    assert (status, retryable) == ("unconfirmed", False)
    assert answer.startswith("Slack chat.postMessage: no answer:")
    assert len(slack_api.calls) == 1  # slack_sdk's own retry of a reset connection is off


def test_an_unreachable_api_is_failed_and_retried(slack_api: SlackApi) -> None:
    block = app_block(slack_api)
    slack_api.stop()
    status, answer, retryable = _classify(_failure(block))
    assert (status, retryable) == ("failed", True)
    assert answer == "Slack chat.postMessage: not reached: ConnectionRefusedError"


def _posted() -> dict[str, Any]:
    return {"channel": "C0UNIT", "ts": "1700000000.000100", "text": "t", "blocks": []}


def test_a_click_payload_is_parsed_and_other_payloads_ignored(slack_api: SlackApi) -> None:
    app_block(slack_api).notify_approval(message())
    (call,) = slack_api.wait_for("chat.postMessage")
    posted = slack_api.messages[call.body.get("ts") or next(iter(slack_api.messages))]
    click = parse_click(click_body(posted, "U0ONCALL", "approval-refuse"))
    assert click is not None
    assert (click.user, click.choice, click.token, click.channel) == (
        "U0ONCALL",
        "refuse",
        REFUSE,
        "C0UNIT",
    )
    assert parse_click(b"payload=%7Bnot+json") is None
    assert parse_click(b"payload=" + json.dumps({"type": "view_submission"}).encode()) is None
    assert parse_click(b"") is None


@pytest.mark.parametrize(
    "timestamp",
    [
        "",
        "not-a-number",
        "1e9",
        "-5",
        "1_700_000_000",
        " 12",
        "9" * 5000,
        str(int(time.time()) - 301),
    ],
)
def test_a_click_without_a_current_numeric_timestamp_is_401(
    offline_app: Any, timestamp: str
) -> None:
    body = click_body({**_posted(), "blocks": []} | _buttons(), "U0ONCALL", "approval-approve")
    headers = signed_headers("any-secret", body, timestamp=timestamp or "0")
    if not timestamp:
        del headers["X-Slack-Request-Timestamp"]
    with TestClient(offline_app) as client:
        r = client.post("/slack/interactions", content=body, headers=headers)
    assert r.status_code == 401
    assert "any-secret" not in r.text


def _buttons() -> dict[str, Any]:
    element = {"type": "button", "action_id": "approval-approve", "value": APPROVE}
    return {"blocks": [{"type": "actions", "elements": [element]}]}


def test_slack_interactions_needs_no_bearer_token_but_other_routes_still_do(
    offline_app: Any,
) -> None:
    with TestClient(offline_app) as client:
        # Current timestamp, no Prefect behind the offline app: the secrets cannot be read.
        body = b"payload=%7B%7D"
        r = client.post("/slack/interactions", content=body, headers=signed_headers("s", body))
        assert r.status_code == 503
        assert client.post("/slack/interactions/x", content=body).status_code == 401
        assert client.get("/slack").status_code == 401
