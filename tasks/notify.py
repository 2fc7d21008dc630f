"""Notifications through Prefect's own notification blocks, at most once per incident and target.

A target is one (contact, block) pair. Before a send, a record is claimed in a Prefect
Variable named after (incident key, contact, block); it says `sending`, then `sent`,
`unconfirmed` or `failed`. A retry or a rerun with the same incident key reads it first:

- `sent`, `unconfirmed` or `sending` (a process that died mid-send): nothing is sent again;
- `failed` (the request certainly did not get through: connection refused, an HTTP error
  answer): sent again. Only this case raises `TransientError`, so the task retry policy
  never repeats a page that may have arrived.

`unconfirmed` is a request whose answer was lost (connection dropped, read timeout, or an
apprise-based block that reports every failure alike): it may have been delivered, so it is
never repeated on that block; the flow tries the contact's next channel instead. Exception:
a block that speaks PagerDuty Events v2 carries `dedup_key` = the incident key, so PagerDuty
merges a repeat into the alert it already opened; there a lost answer is retried (at least
once, deduplicated by the vendor). A Prefect API error while loading the block means nothing
was sent: `failed`, retried.

A page is one (incident, stage, contact, block): the stage is the severity and level
(`critical`, `critical:level2`, `approval`), so an upgraded incident pages its new level
once and a repeat at the same level pages nobody. The block is loaded by
`<block-type-slug>/<block-name>`, so any `NotificationBlock` works (`slack-webhook`,
`pager-duty-webhook`, `custom-webhook`, `ms-teams-webhook`, and this project's `slack-app`,
tasks/slack_app.py). Webhook URLs, tokens and routing keys live in the blocks and never
reach a log, a record, a state or an exception text: failures are reported by class and
HTTP status only.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
from prefect import get_run_logger, task
from prefect.blocks.abstract import NotificationBlock, NotificationError
from prefect.blocks.core import Block
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import VariableCreate, VariableUpdate
from prefect.context import FlowRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from pydantic import BaseModel, Field

from tasks.approvals.message import ApprovalMessage
from tasks.errors import PermanentError, TransientError
from tasks.retry import RETRY_IDEMPOTENT_WRITE

# Importing the Slack app block also registers its class: `Block.load("slack-app/x")` finds it.
from tasks.slack_app import SlackSendError

Status = Literal["sending", "sent", "unconfirmed", "failed"]
#: Records in these states are never sent again.
FINAL_OR_UNKNOWN: frozenset[str] = frozenset({"sending", "sent", "unconfirmed"})


class Delivery(BaseModel):
    """One notification to one target: the idempotency record and the audit row."""

    incident_key: str
    stage: str = Field("", description="Severity and level: `critical`, `critical:level2`, ...")
    contact: str
    block: str = Field(description="The block ref `<block-type-slug>/<block-name>`.")
    status: Status
    answer: str = Field(description="What the service answered, without any secret.")
    at: datetime = Field(description="When the last attempt ended (UTC).")
    flow_run_id: str | None = Field(None, description="The run that sent it.")
    repeated: bool = Field(
        False, description="True: found already recorded; nothing was sent this time."
    )

    @property
    def confirmed(self) -> bool:
        return self.status == "sent"


def record_name(incident_key: str, contact: str, block: str, stage: str = "") -> str:
    """The Prefect Variable holding the record of (incident, stage, contact, block)."""
    parts = [incident_key, contact, block] + ([stage] if stage else [])
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()
    return f"escalation_{digest[:40]}"


def read_record(incident_key: str, contact: str, block: str, stage: str = "") -> Delivery | None:
    """The stored record of that target, if any."""
    with get_client(sync_client=True) as client:
        var = client.read_variable_by_name(record_name(incident_key, contact, block, stage))
    if var is None or not isinstance(var.value, dict):
        return None
    return Delivery.model_validate(var.value)


def _write(record: Delivery, *, create: bool) -> bool:
    """Store `record`; with `create`, only if no record exists (False: someone has one)."""
    name = record_name(record.incident_key, record.contact, record.block, record.stage)
    value: dict[str, Any] = record.model_dump(mode="json")
    with get_client(sync_client=True) as client:
        if create:
            try:
                # The server's unique name makes this the claim: two runs cannot both win.
                client.create_variable(VariableCreate(name=name, value=value, tags=["escalation"]))
            except ObjectAlreadyExists:
                return False
            return True
        client.update_variable(VariableUpdate(name=name, value=value))
    return True


def _now() -> datetime:
    return datetime.now(UTC)


def _run_id() -> str | None:
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else None


class BlockNotLoaded(TransientError):
    """The Prefect API did not hand out the block: nothing was sent, so it is retried."""


def _load(block_ref: str) -> NotificationBlock:
    try:
        block = Block.load(block_ref)
    except (ValueError, ObjectNotFound):
        raise PermanentError(f"notification block {block_ref} is not saved in Prefect") from None
    except Exception as exc:  # noqa: BLE001 - the API's text may quote the block's fields
        raise BlockNotLoaded(
            f"block {block_ref}: Prefect API error while loading it ({type(exc).__name__})"
        ) from None
    if not isinstance(block, NotificationBlock):
        raise PermanentError(f"block {block_ref} is not a notification block")
    return block


def deduplicates(block: NotificationBlock) -> bool:
    """True for a block speaking PagerDuty Events v2: the vendor merges repeats by dedup_key."""
    if not isinstance(block, CustomWebhookNotificationBlock):
        return False
    data = block.json_data
    return isinstance(data, dict) and "routing_key" in data and "event_action" in data


def _with_dedup_key(block: NotificationBlock, incident_key: str) -> NotificationBlock:
    """The block with `dedup_key` = the incident key, when the vendor deduplicates by it."""
    if deduplicates(block):
        assert isinstance(block, CustomWebhookNotificationBlock)
        assert isinstance(block.json_data, dict)
        # In memory only: the saved block is unchanged. PagerDuty caps dedup_key at 255.
        block.json_data = {**block.json_data, "dedup_key": incident_key[:255]}
    return block


def _classify(exc: Exception) -> tuple[Status, str, bool]:
    """(status, answer, retryable) for a failed send; never the exception's own text."""
    if isinstance(exc, SlackSendError):  # the Slack app block classified it (no secret in it)
        return exc.status, exc.answer, exc.retryable
    if isinstance(exc, httpx.HTTPStatusError):
        code = exc.response.status_code
        return "failed", f"HTTP {code}", code == 429 or code >= 500
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return "failed", f"not reached: {type(exc).__name__}", True
    if isinstance(exc, httpx.TransportError):
        # The request may have arrived and only its answer was lost.
        return "unconfirmed", f"no answer: {type(exc).__name__}", False
    if isinstance(exc, NotificationError):
        # Apprise reports a refusal, a dead host and a lost answer alike, so the page may
        # have arrived: never repeated on this block (at most once). Its log may quote the
        # service URL: not kept.
        return "unconfirmed", "no confirmation: apprise", False
    return "failed", f"error: {type(exc).__name__}", False


@task(
    task_run_name="notify-{contact}-via-{block_ref}",
    **RETRY_IDEMPOTENT_WRITE,
)
def send_notification(
    incident_key: str,
    contact: str,
    block_ref: str,
    subject: str,
    body: str,
    stage: str = "",
    approval: ApprovalMessage | None = None,
) -> Delivery:
    """Notify one contact through one block, unless this incident already did at this stage."""
    logger = get_run_logger()
    previous = read_record(incident_key, contact, block_ref, stage)
    if previous is not None and previous.status in FINAL_OR_UNKNOWN:
        logger.info(
            "%s via %s: already %s for this incident; not sent again",
            contact,
            block_ref,
            previous.status,
        )
        return previous.model_copy(update={"repeated": True})
    claim = Delivery(
        incident_key=incident_key,
        stage=stage,
        contact=contact,
        block=block_ref,
        status="sending",
        answer="",
        at=_now(),
        flow_run_id=_run_id(),
    )
    if not _write(claim, create=previous is None):
        # Another run claimed it between our read and our write: it sends, we do not.
        again = read_record(incident_key, contact, block_ref, stage)
        return (again or claim).model_copy(update={"repeated": True})

    def finish(status: Status, answer: str) -> Delivery:
        done = claim.model_copy(update={"status": status, "answer": answer, "at": _now()})
        _write(done, create=False)
        return done

    try:
        block = _load(block_ref)
    except BlockNotLoaded as exc:
        # Nothing left this process: sending again cannot double a page.
        finish("failed", f"not sent: {exc}")
        logger.warning("%s via %s: %s; retried", contact, block_ref, exc)
        raise
    except PermanentError:
        finish("failed", "block not found")
        raise
    dedup = deduplicates(block)
    try:
        with _with_dedup_key(block, incident_key).raise_on_failure():
            notify_approval = getattr(block, "notify_approval", None)
            if approval is not None and callable(notify_approval):
                # A channel that shows buttons (the Slack app) gets the whole request.
                notify_approval(approval)
            else:
                # `_sync`: this task is synchronous; never hand back an unawaited coroutine.
                block.notify(body=body, subject=subject, _sync=True)  # type: ignore[call-arg,unused-coroutine]
    except Exception as exc:  # noqa: BLE001 - classified below, text never kept
        status, answer, retryable = _classify(exc)
        if status == "unconfirmed" and dedup:
            # The vendor merges a repeat with the same dedup_key: retrying cannot double it.
            status, answer, retryable = "failed", f"{answer}; deduplicated: retried", True
        failed = finish(status, answer)
        logger.warning("%s via %s: %s (%s)", contact, block_ref, status, answer)
        if status == "unconfirmed":
            return failed
        message = f"{contact} via {block_ref}: {answer}"
        # `from None`: the library's exception names the URL, which may hold the token.
        if retryable:
            raise TransientError(message) from None
        raise PermanentError(message) from None
    done = finish("sent", "accepted: HTTP 2xx")
    logger.info("%s via %s: sent", contact, block_ref)
    return done
