"""`POST /slack/interactions`: an Approve/Refuse click on a Slack app's approval request.

Slack signs every interaction with the app's signing secret (v0: HMAC-SHA256 over
`v0:{timestamp}:{raw body}`). The route is exempt from the receiver's bearer token (Slack
cannot send one) and authenticated by that signature instead, checked with slack_sdk's
`SignatureVerifier` against the signing secrets of the saved `slack-app` blocks (read from
Prefect, cached briefly): a wrong signature, a missing or non-numeric timestamp, or one more
than 5 minutes away from now is answered 401 and nothing is recorded.

A verified click is answered 200 at once (Slack gives up after 3 s) and handled after the
answer (deployments/slack_clicks.py): the Slack user is mapped to a contact, the button's
signed link token is verified, the decision goes through the same desk as a signed link
(tasks/approvals/desk.py), and the message is updated with the outcome.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import APIRouter, BackgroundTasks, Request, Response
from fastapi.responses import JSONResponse
from prefect.client.orchestration import SyncPrefectClient
from prefect.exceptions import ObjectNotFound
from pydantic import ValidationError
from slack_sdk.signature import SignatureVerifier

from deployments.slack_clicks import ClickDesk, parse_click
from tasks.slack_app import SlackApp

log = logging.getLogger("runbooks.receiver")

PATH = "/slack/interactions"
#: Slack's own window: a signed request older (or newer) than this is a replay.
WINDOW_S = 300
#: Signatures are plain decimal Unix seconds; anything else is refused before any parsing.
_TIMESTAMP = re.compile(r"^[0-9]{1,12}$")


@dataclass
class SlackApps:
    """The saved `slack-app` blocks, read from Prefect and kept for `ttl_s` seconds.

    A signature that no cached secret verifies re-reads them, at most every `retry_s`, so a
    block saved a moment ago works without letting forged requests hammer the API.
    """

    client: Callable[[], SyncPrefectClient]
    ttl_s: float = 30.0
    retry_s: float = 5.0
    _apps: list[SlackApp] = field(default_factory=list)
    _read_at: float = float("-inf")
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def _read(self) -> list[SlackApp]:
        with self.client() as client:
            try:
                docs = client.read_block_documents_by_type("slack-app", include_secrets=True)
            except ObjectNotFound:  # the type was never registered: no app saved
                return []
        apps = []
        for doc in docs:
            try:
                apps.append(SlackApp.model_validate(doc.data))
            except ValidationError:  # a block from another schema version: skipped, named
                log.warning("slack-app block %s does not validate: ignored", doc.name)
        return apps

    async def _refresh(self, older_than_s: float) -> list[SlackApp]:
        async with self._lock:
            if time.monotonic() - self._read_at > older_than_s:
                self._apps = await asyncio.to_thread(self._read)
                self._read_at = time.monotonic()
            return self._apps

    async def verifying(self, body: bytes, timestamp: str, signature: str) -> SlackApp | None:
        """The app whose signing secret signed `body` at `timestamp`, or None."""
        if not _TIMESTAMP.match(timestamp) or abs(time.time() - int(timestamp)) > WINDOW_S:
            return None  # before reading any block: a replay costs nothing
        for older_than_s in (self.ttl_s, self.retry_s):
            for app in await self._refresh(older_than_s):
                verifier = SignatureVerifier(app.signing_secret.get_secret_value())
                if verifier.is_valid(body=body, timestamp=timestamp, signature=signature):
                    return app
        return None


def _unauthorized() -> JSONResponse:
    return JSONResponse({"detail": "bad Slack signature"}, status_code=401)


def slack_router(
    *, api_url: str, api_auth_string: str | None = None, ttl_s: float = 30.0
) -> APIRouter:
    """The router serving `POST /slack/interactions` against the Prefect API at `api_url`."""

    def client() -> SyncPrefectClient:
        return SyncPrefectClient(api_url, auth_string=api_auth_string)

    apps = SlackApps(client, ttl_s=ttl_s)
    desk = ClickDesk(client)
    router = APIRouter()

    @router.post(
        PATH,
        responses={
            401: {"description": "signature or timestamp does not verify"},
            503: {"description": "the Prefect API did not answer; Slack retries"},
        },
    )
    async def interactions(request: Request, background: BackgroundTasks) -> Response:
        """Verify Slack's signature, answer at once, then record the click's decision."""
        body = await request.body()
        timestamp = request.headers.get("x-slack-request-timestamp", "")
        signature = request.headers.get("x-slack-signature", "")
        try:
            app = await apps.verifying(body, timestamp, signature)
        except Exception as exc:  # noqa: BLE001 - the API's text may quote a block
            log.warning("Slack interaction: slack-app blocks not read (%s)", type(exc).__name__)
            return JSONResponse({"detail": "Prefect API unavailable"}, status_code=503)
        if app is None:
            log.warning("Slack interaction refused: bad signature or timestamp; nothing recorded")
            return _unauthorized()
        click = parse_click(body)
        if click is None:  # another interaction type or another app's button: nothing to do
            return Response(status_code=200)
        background.add_task(desk.handle, app, click)
        return Response(status_code=200)

    return router
