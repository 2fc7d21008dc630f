"""A verified Slack click on an approval request: decided through the desk, answered in Slack.

Runs after Slack got its 200 (deployments/slack_interactions.py verified the signature).
The Slack user is mapped to a contact (`slack_user_ids` in the escalation config); the
button's value is the recipient's signed link token, verified like a link. The decision is
recorded by `tasks.approvals.desk.decide` as `channel="slack"`, one use per (token,
approver). Then Slack is told, with the app's bot token:

- recorded, stale, not waiting: the message is updated (`chat.update`), its buttons replaced
  by the outcome: who, what, when;
- not an allowed approver, already used, a token that does not verify: only that user sees
  a notice (`chat.postEphemeral`); the buttons stay for the people they are meant for.

Log lines name the Slack user, the contact, the run and the outcome: never a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import parse_qs

from prefect.client.orchestration import SyncPrefectClient
from pydantic import BaseModel, Field, ValidationError

from tasks.approvals.desk import Decided, decide
from tasks.approvals.signing import ApprovalSettings, Choice, TokenRejected, verify_link
from tasks.contacts import load_config
from tasks.slack_app import ACTIONS_BLOCK, APPROVE_ACTION, REFUSE_ACTION, SlackApp, call, esc

log = logging.getLogger("runbooks.receiver")

_CHOICE: dict[str, Choice] = {APPROVE_ACTION: "approve", REFUSE_ACTION: "refuse"}
_SLACK_ID = r"^[A-Za-z0-9]{1,32}$"


class _Id(BaseModel):
    id: str = Field(pattern=_SLACK_ID)


class _Action(BaseModel):
    action_id: str
    value: str = Field("", max_length=2000)


class _Container(BaseModel):
    channel_id: str = ""
    message_ts: str = ""


class _Message(BaseModel):
    ts: str = ""
    blocks: list[dict[str, Any]] = Field(default_factory=list, max_length=50)


class _BlockActions(BaseModel):
    type: Literal["block_actions"]
    user: _Id
    actions: list[_Action] = Field(max_length=25)
    container: _Container = Field(default_factory=_Container)
    channel: _Id | None = None
    message: _Message | None = None


@dataclass(frozen=True)
class Click:
    """One Approve/Refuse click: who, which button, on which message."""

    user: str
    choice: Choice
    token: str
    channel: str
    ts: str
    blocks: list[dict[str, Any]]


def parse_click(body: bytes) -> Click | None:
    """The approval click in a `block_actions` payload (`payload=<json>`), or None."""
    form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
    try:
        data = _BlockActions.model_validate(json.loads(form.get("payload", [""])[0]))
    except (ValueError, ValidationError):  # not JSON, not block_actions, not Slack's shape
        return None
    action = next((a for a in data.actions if a.action_id in _CHOICE), None)
    message = data.message or _Message()
    channel = data.container.channel_id or (data.channel.id if data.channel else "")
    ts = data.container.message_ts or message.ts
    if action is None or not action.value or not channel or not re.match(r"^[0-9.]{1,32}$", ts):
        return None
    return Click(data.user.id, _CHOICE[action.action_id], action.value, channel, ts, message.blocks)


def _when() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def decided_blocks(click: Click, decided: Decided) -> list[dict[str, Any]]:
    """The original message without its buttons, and the outcome where they were."""
    kept = [
        b for b in click.blocks if b.get("type") != "actions" and b.get("block_id") != ACTIONS_BLOCK
    ][:45]
    icon = {"approve": ":white_check_mark:", "refuse": ":no_entry:"}[decided.choice]
    if decided.outcome != "recorded":
        icon = ":warning:"
    who = f"{decided.choice} by {esc(decided.approver)} (<@{click.user}>) at {_when()}"
    return [
        *kept,
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": f"{icon} {esc(decided.message)}"[:3000]},
        },
        {"type": "context", "elements": [{"type": "mrkdwn", "text": who[:3000]}]},
    ]


class ClickDesk:
    """Decides verified clicks against the Prefect API and answers them in Slack."""

    def __init__(self, client: Callable[[], SyncPrefectClient]) -> None:
        self.client = client

    async def handle(self, app: SlackApp, click: Click) -> None:
        """Decide `click` and tell Slack; every failure is logged, none is raised."""
        try:
            await asyncio.to_thread(self._handle, app, click)
        except Exception as exc:  # noqa: BLE001 - after Slack's 200: log, never leak
            log.warning("Slack click by %s: not handled (%s)", click.user, type(exc).__name__)
            # The person should not wait for an outcome that will not come.
            with contextlib.suppress(Exception):
                await asyncio.to_thread(
                    self._notice, app, click, "Not recorded: an error on our side. Try again."
                )

    def _handle(self, app: SlackApp, click: Click) -> None:
        settings = ApprovalSettings()
        key = settings.key()
        if key is None:
            self._notice(app, click, "Approvals are not configured here: nothing was recorded.")
            return
        try:
            claims = verify_link(click.token, key)
            if claims.choice != click.choice:  # a token moved to the other button
                raise TokenRejected("forged")
        except TokenRejected as exc:
            log.warning("Slack click by %s: button token %s; nothing recorded", click.user, exc)
            self._notice(app, click, f"This button is {exc.reason}: nothing was recorded.")
            return
        contact = load_config().slack_contact(click.user)
        approver = contact or f"slack:{click.user}"
        with self.client() as client:
            decided = decide(
                client,
                key,
                claims,
                approver=approver,
                channel="slack",
                reason=f"Slack user {click.user}",
                use=f"{claims.nonce}-{approver}",
            )
        log.info(
            "Slack click by %s (%s) on run %s: %s -> %s",
            click.user,
            approver,
            claims.run,
            claims.choice,
            decided.outcome,
        )
        if decided.outcome in ("not-allowed", "used"):
            self._notice(app, click, decided.message)
            return
        call(
            "chat.update",
            app.client().chat_update,
            channel=click.channel,
            ts=click.ts,
            text=decided.message,
            blocks=decided_blocks(click, decided),
        )

    def _notice(self, app: SlackApp, click: Click, text: str) -> None:
        """Tell only the user who clicked (an ephemeral message in that channel)."""
        call(
            "chat.postEphemeral",
            app.client().chat_postEphemeral,
            channel=click.channel,
            user=click.user,
            text=text,
        )
