"""The Slack app block (`slack-app/<name>`): pages as a bot, approval requests with buttons.

Unlike an incoming webhook, a Slack app can show interactive buttons: an approval request
reaches Slack as a Block Kit message with Approve and Refuse, each carrying the recipient's
signed link token as its value. Slack posts a click to the receiver's `POST
/slack/interactions` (deployments/slack_interactions.py), signed with the app's signing
secret; the receiver verifies it, records the decision and updates this message.

The bot token and signing secret are block secrets. A failed call raises `SlackSendError`,
whose text names the Web API method, the HTTP status and Slack's error code only: never the
token, the message or a link token. `tasks/notify.py` reads its status: an answer that says
no is `failed`, a request whose answer was lost is `unconfirmed` (never sent again).
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import re
import socket
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.error import URLError

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.blocks.abstract import NotificationBlock
from pydantic import Field, SecretStr
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackRequestError

from tasks.approvals.message import ApprovalMessage

APPROVE_ACTION = "approval-approve"
REFUSE_ACTION = "approval-refuse"
ACTIONS_BLOCK = "approval-buttons"
_SLACK_ERROR = re.compile(r"^[a-z0-9_]{1,60}$")

# slack_sdk logs every request and answer body at DEBUG, button values (link tokens)
# included: its clients log here, never below WARNING, whatever the root level.
_SDK_LOG = logging.getLogger("runbooks.slack_sdk")
_SDK_LOG.setLevel(logging.WARNING)


class SlackSendError(Exception):
    """A Slack Web API call that failed; its text is safe to log (no token, no message)."""

    def __init__(
        self, method: str, status: Literal["failed", "unconfirmed"], answer: str, retryable: bool
    ) -> None:
        super().__init__(f"Slack {method}: {answer}")
        self.status: Literal["failed", "unconfirmed"] = status
        self.answer = f"Slack {method}: {answer}"
        self.retryable = retryable


def _refused(exc: SlackApiError) -> tuple[Literal["failed", "unconfirmed"], str, bool]:
    """Slack answered no: the status and its error code (a short word, nothing else)."""
    code = int(getattr(exc.response, "status_code", 0) or 0)
    data = getattr(exc.response, "data", None)
    error = data.get("error") if isinstance(data, dict) else None
    word = error if isinstance(error, str) and _SLACK_ERROR.match(error) else "unexpected answer"
    return "failed", f"HTTP {code} {word}", code == 429 or code >= 500


def _lost(exc: Exception) -> tuple[Literal["failed", "unconfirmed"], str, bool]:
    """A transport error: refused before sending (failed, retried) or an answer lost."""
    reason = exc.reason if isinstance(exc, URLError) else exc
    if isinstance(reason, ConnectionRefusedError | socket.gaierror):
        return "failed", f"not reached: {type(reason).__name__}", True
    if isinstance(exc, SlackRequestError):
        return "failed", "not sent: bad request settings", False
    # Reset, timeout, closed without an answer: the request may have been delivered.
    kind = type(reason).__name__ if isinstance(reason, BaseException) else type(exc).__name__
    return "unconfirmed", f"no answer: {kind}", False


def call(method: str, fn: Any, /, **kwargs: Any) -> None:
    """Call one Web API method; `SlackSendError` (raised outside the handler) on failure."""
    try:
        fn(**kwargs)
        return
    except SlackApiError as exc:
        outcome = _refused(exc)
    except (OSError, http.client.HTTPException, SlackRequestError) as exc:
        outcome = _lost(exc)
    # Raised here, not in the handler: the library's exception (which holds the request,
    # its Authorization header included) is not even kept as the context.
    raise SlackSendError(method, *outcome)


def esc(text: str) -> str:
    """Plain text safe inside Slack mrkdwn (Slack's three escapes)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _plain(text: str, limit: int = 75) -> dict[str, Any]:
    return {"type": "plain_text", "text": text[:limit] or " ", "emoji": True}


def approval_blocks(message: ApprovalMessage) -> list[dict[str, Any]]:
    """The Block Kit request: plan, who must approve, the run, expiry, two buttons."""
    until = datetime.fromtimestamp(message.expires_at, UTC).strftime("%Y-%m-%d %H:%M UTC")
    plan = "\n".join(f"• {esc(a)}" for a in message.actions) or "• (no action listed)"
    run = esc(message.run_name or message.run)
    link = f"<{message.run_url}|{run}>" if message.run_url else run
    confirm = {
        "title": _plain("Refuse this plan?"),
        "text": {"type": "mrkdwn", "text": "The run will change nothing."},
        "confirm": _plain("Refuse"),
        "deny": _plain("Back"),
    }
    return [
        {"type": "header", "text": _plain(f"Approval needed: {message.runbook}", 150)},
        {
            "type": "section",
            "text": {
                "type": "mrkdwn",
                "text": f"Run {link} asks *{esc(message.recipient)}* to approve:\n{plan}"[:3000],
            },
        },
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": f"*Needs:* {esc(message.needs)}"[:3000]},
        },
        {
            "type": "context",
            "elements": [
                {
                    "type": "mrkdwn",
                    "text": f"These buttons are for {esc(message.recipient)}"
                    f" and expire at {until}.",
                }
            ],
        },
        {
            "type": "actions",
            "block_id": ACTIONS_BLOCK,
            "elements": [
                {
                    "type": "button",
                    "action_id": APPROVE_ACTION,
                    "text": _plain("Approve"),
                    "style": "primary",
                    "value": message.approve_token.get_secret_value(),
                },
                {
                    "type": "button",
                    "action_id": REFUSE_ACTION,
                    "text": _plain("Refuse"),
                    "style": "danger",
                    "value": message.refuse_token.get_secret_value(),
                    "confirm": confirm,
                },
            ],
        },
    ]


class SlackApp(NotificationBlock):
    """A Slack app (bot token + signing secret) posting to one channel, with approval buttons."""

    _block_type_name = "Slack App"
    _block_type_slug = "slack-app"
    _description = "Posts pages as a Slack bot; approval requests get Approve/Refuse buttons."

    bot_token: SecretStr = Field(..., description="The app's bot token (xoxb-...).")
    signing_secret: SecretStr = Field(
        ..., description="The app's signing secret: the receiver verifies clicks with it."
    )
    channel: str = Field(..., min_length=1, description="The channel id to post to (C...).")
    api_url: str = Field("https://slack.com/api/", description="Slack's Web API base URL.")
    timeout_s: int = Field(10, ge=1, le=60, description="Per-call timeout (seconds).")

    def client(self) -> WebClient:
        """A Web API client sending each request once: the notify layer decides on repeats."""
        base = self.api_url if self.api_url.endswith("/") else self.api_url + "/"
        return WebClient(
            token=self.bot_token.get_secret_value(),
            base_url=base,
            timeout=self.timeout_s,
            retry_handlers=[],  # slack_sdk retries a reset connection: a page could double
            logger=_SDK_LOG,
        )

    def _post_text(self, body: str, subject: str | None) -> None:
        text = f"*{esc(subject)}*\n{esc(body)}" if subject else esc(body)
        call(
            "chat.postMessage",
            self.client().chat_postMessage,
            channel=self.channel,
            text=text[:39_000],
        )

    async def anotify(self, body: str, subject: str | None = None) -> None:
        """Post `subject` and `body` as plain text (from async code)."""
        await asyncio.to_thread(self._post_text, body, subject)

    @async_dispatch(anotify)
    def notify(self, body: str, subject: str | None = None) -> None:  # type: ignore[override]
        """Post `subject` and `body` as plain text to the channel."""
        self._post_text(body, subject)

    def notify_approval(self, message: ApprovalMessage) -> None:
        """Post the approval request as Block Kit with Approve/Refuse buttons."""
        call(
            "chat.postMessage",
            self.client().chat_postMessage,
            channel=self.channel,
            text=message.subject(),  # the notification's fallback text: no token in it
            blocks=approval_blocks(message),
        )
