"""Signed approval links on the receiver: `GET /approvals/{token}` shows, `POST /approvals` decides.

The signed token is these routes' credential (no bearer token: an approver's browser has
none), so `AuthFirst` lets exactly these paths through, body limit kept. GET verifies the
token and shows the plan, who decides and the evidence, with a confirm form; it records
nothing (a link preview or a prefetch must never approve). Only the form's POST decides,
through `tasks.approvals.desk` (the paused run tallies). Every refusal is a clear page with
its HTTP status and one log line; the token is never logged, never on a page but in the
confirm form's hidden field, and redacted from uvicorn's access log (`install_redaction`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import parse_qs
from uuid import UUID

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from prefect.client.orchestration import SyncPrefectClient
from prefect.exceptions import ObjectNotFound
from pydantic import ValidationError

from deployments.approval_pages import confirm_page, outcome_page, problem_page
from flows.common import run_link
from tasks.approvals import desk
from tasks.approvals.signing import ApprovalSettings, LinkClaims, TokenRejected, verify_link
from tasks.approvals.store import vote_used
from tasks.errors import PermanentError

log = logging.getLogger("runbooks.approvals")

T = TypeVar("T")

#: A form is a token (< 2000 chars) and a reason (<= 2000 chars, maybe %-encoded x3).
MAX_FORM_BYTES = 16_384


def approval_router(api_url: str, api_auth_string: str | None = None) -> APIRouter:
    """The two routes of signed approval links, talking to Prefect at `api_url`."""
    router = APIRouter()

    def with_client(work: Callable[[SyncPrefectClient], T]) -> T:
        """Run `work` with a fresh Prefect client (in a worker thread: the client is sync)."""
        with SyncPrefectClient(api_url, auth_string=api_auth_string) as client:
            return work(client)

    @router.get("/approvals/{token}", response_class=HTMLResponse, include_in_schema=False)
    async def show(token: str) -> HTMLResponse:
        """The confirm page: plan, who decides, evidence; records nothing."""
        key = signing_key()
        if key is None:
            return problem_page("not-configured")
        claims = verified(token, key, "GET")
        if isinstance(claims, HTMLResponse):
            return claims

        def look(client: SyncPrefectClient) -> tuple[desk.Looked, bool]:
            looked = desk.look(client, claims)
            used = looked.asked and vote_used(client, UUID(claims.run), claims.nonce)
            return looked, used

        try:
            looked, used = await asyncio.to_thread(with_client, look)
        except Exception as exc:  # noqa: BLE001  # each kind gets its page, below
            return _prefect_failed(exc, claims, "GET")
        problem = _not_askable(looked, claims, "GET")
        if problem is not None:
            return problem
        if used:
            log.warning("approval link refused (GET): run %s, already used", claims.run)
            return problem_page("used")
        log.info(
            "approval page shown: run %s, %s (%s link)", claims.run, claims.recipient, claims.choice
        )
        # Relative: the form posts to `/approvals` under whatever prefix a proxy serves us.
        return confirm_page(claims, looked, token, "../approvals")

    @router.post("/approvals", response_class=HTMLResponse, include_in_schema=False)
    async def confirm(request: Request) -> HTMLResponse:
        """The confirm form: verify again, store the decision, wake the run."""
        key = signing_key()
        if key is None:
            return problem_page("not-configured")
        form = await _form(request)
        claims = verified(form.get("token", ""), key, "POST")
        if isinstance(claims, HTMLResponse):
            return claims
        reason = form.get("reason", "").strip()[:2000]

        def decide(client: SyncPrefectClient) -> desk.Decided | HTMLResponse:
            looked = desk.look(client, claims)
            if not looked.asked:
                return _wrong_run(claims, "POST")
            return desk.decide(
                client,
                key,
                claims,
                approver=claims.recipient,
                channel="link",
                reason=reason,
                use=claims.nonce,
            )

        try:
            decided = await asyncio.to_thread(with_client, decide)
        except Exception as exc:  # noqa: BLE001  # each kind gets its page, below
            return _prefect_failed(exc, claims, "POST")
        if isinstance(decided, HTMLResponse):
            return decided
        log.info(
            "approval link confirmed: run %s, %s %s: %s",
            claims.run, decided.approver, decided.choice, decided.outcome,
        )  # fmt: skip
        return outcome_page(decided, run_link(claims.run))

    return router


def signing_key() -> bytes | None:
    """The key links are signed with, read now (so a rotated key file applies); None: unset."""
    try:
        key = ApprovalSettings().key()
    except (PermanentError, ValidationError) as exc:
        # The message names the file or the rule broken, never the key.
        log.error("approval link refused: %s", str(exc).splitlines()[0][:300])
        return None
    if key is None:
        log.error("approval link refused: no signing key (RUNBOOKS_APPROVAL_SIGNING_KEY[_FILE])")
    return key


def verified(token: str, key: bytes, method: str) -> LinkClaims | HTMLResponse:
    """The token's claims, or the page saying why it is refused (logged, never the token)."""
    try:
        return verify_link(token, key)
    except TokenRejected as exc:
        log.warning("approval link refused (%s): %s", method, exc.reason)
        return problem_page(exc.reason)


def _not_askable(looked: desk.Looked, claims: LinkClaims, method: str) -> HTMLResponse | None:
    """The page for a link whose run cannot take this decision now; None when it can."""
    if not looked.asked:
        return _wrong_run(claims, method)
    if not looked.waiting:
        already = f"; it already decided: {looked.decided}" if looked.decided else ""
        log.warning(
            "approval link refused (%s): run %s no longer waits (%s%s)",
            method, claims.run, looked.state, already,
        )  # fmt: skip
        return problem_page("not-waiting", f"The run is {looked.state}{already}.")
    if looked.stale:
        log.warning("approval link refused (%s): run %s re-planned (stale)", method, claims.run)
        return problem_page("stale")
    return None


def _wrong_run(claims: LinkClaims, method: str) -> HTMLResponse:
    log.warning("approval link refused (%s): wrong run %s", method, claims.run)
    return problem_page("wrong-run")


def _prefect_failed(exc: Exception, claims: LinkClaims, method: str) -> HTMLResponse:
    """Unknown run -> wrong run; anything else -> Prefect unavailable (type logged only)."""
    if isinstance(exc, ObjectNotFound | ValueError):  # ValueError: not a run id at all
        return _wrong_run(claims, method)
    log.error(
        "approval link (%s): Prefect failed for run %s: %s", method, claims.run, type(exc).__name__
    )
    return problem_page("unavailable")


async def _form(request: Request) -> dict[str, str]:
    """The urlencoded form's first value per field (no multipart: the page never sends it)."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        return {}
    fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=10)
    return {name: values[0] for name, values in fields.items() if values}


# --- Keeping the token out of logs ---------------------------------------------------------

_TOKEN_IN_PATH = re.compile(r"(/approvals/)[^\s?#\"'/]+")


def redact(text: str) -> str:
    """`text` with every `/approvals/<token>` as `/approvals/<redacted>`."""
    return _TOKEN_IN_PATH.sub(r"\1<redacted>", text)


class RedactApprovalTokens(logging.Filter):
    """Rewrites a record's message and arguments (uvicorn's access line: the path is one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            args = record.args.items()
            record.args = {k: redact(v) if isinstance(v, str) else v for k, v in args}
        return True


#: uvicorn's access log prints each request's path; its error log may quote a request line.
REDACTED_LOGGERS = ("uvicorn.access", "uvicorn.error")


def install_redaction() -> None:
    """Install the filter on uvicorn's loggers (once; a logger filter survives dictConfig)."""
    for name in REDACTED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactApprovalTokens) for f in logger.filters):
            logger.addFilter(RedactApprovalTokens())
