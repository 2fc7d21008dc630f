"""The approval records a paused run and the receiver share, as Prefect flow-run inputs.

- `approval-request-<plan>`: what the run asks (the plan, the evidence, who may answer,
  until when), written by the run before it pauses; the receiver shows it on the link's
  page and refuses a token for any other plan ("the run re-planned").
- `approval-vote-<nonce>[-<approver>]`: one verified decision, sealed by the receiver.
  Prefect keeps one input per key and run, so creating it is the single-use check: a link
  (or a Slack button, per person) decides once, whichever receiver or process gets it.
- `approval-decision-<plan>`: how the run's gate ended and who counted, for post-incident.

Prefect deletes a run's inputs with the run; audit-retention exports them first.
"""

from __future__ import annotations

import json
import re
from typing import Any
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient
from prefect.exceptions import ObjectAlreadyExists, PrefectHTTPStatusError
from pydantic import BaseModel, Field, ValidationError

from tasks.approvals.signing import Vote, open_vote, seal_vote
from tasks.approvals.tally import Requirement, Tally

REQUEST = "approval-request-"
VOTE = "approval-vote-"
DECISION = "approval-decision-"
_KEY_PART = re.compile(r"[^a-z0-9-]+")


class ApprovalRequest(BaseModel):
    """What a paused run asks its approvers."""

    run: str
    run_name: str = ""
    runbook: str
    plan: str = Field(description="The plan's hash (`signing.plan_hash`).")
    actions: list[str] = Field(description="Each action, one line.")
    evidence: str = Field("", description="The evidence summary (markdown), as in the artifact.")
    requirements: list[Requirement]
    asked_at: float
    expires_at: float


def key_part(text: str) -> str:
    """`text` as a piece of a Prefect input key (lowercase letters, digits, dashes)."""
    return _KEY_PART.sub("-", text.lower()).strip("-")[:60] or "x"


def _all(client: SyncPrefectClient, run: UUID, prefix: str) -> list[Any]:
    found = client.filter_flow_run_input(run, key_prefix=prefix, limit=500, exclude_keys=set())
    out: list[Any] = []
    for item in found:
        try:
            out.append(json.loads(item.value))
        except ValueError:
            continue  # not ours: never trusted, never fatal
    return out


def save_request(client: SyncPrefectClient, request: ApprovalRequest) -> None:
    """Store the request (again is fine: a retried gate asks the same plan)."""
    try:
        client.create_flow_run_input(
            UUID(request.run), REQUEST + request.plan, request.model_dump_json()
        )
    except ObjectAlreadyExists:
        pass
    except PrefectHTTPStatusError as exc:
        if exc.response.status_code != 409:
            raise


def latest_request(client: SyncPrefectClient, run: UUID) -> ApprovalRequest | None:
    """The run's newest request (its current plan), or None."""
    requests: list[ApprovalRequest] = []
    for value in _all(client, run, REQUEST):
        try:
            requests.append(ApprovalRequest.model_validate(value))
        except ValidationError:
            continue
    return max(requests, key=lambda r: r.asked_at, default=None)


def record_vote(client: SyncPrefectClient, vote: Vote, use: str, key: bytes) -> bool:
    """Store a verified vote under its single-use key; False: that use was already made."""
    try:
        client.create_flow_run_input(
            UUID(vote.run), VOTE + key_part(use), json.dumps(seal_vote(vote, key))
        )
    except ObjectAlreadyExists:
        return False
    except PrefectHTTPStatusError as exc:
        if exc.response.status_code == 409:
            return False
        raise
    return True


def vote_used(client: SyncPrefectClient, run: UUID, use: str) -> bool:
    """Whether the single use `use` was made on the run (a link's page says so up front)."""
    key = VOTE + key_part(use)
    found = client.filter_flow_run_input(run, key_prefix=key, limit=50, exclude_keys=set())
    return any(item.key == key for item in found)


def read_votes(client: SyncPrefectClient, run: UUID, key: bytes) -> tuple[list[Vote], int]:
    """The run's votes whose seal holds, and how many stored ones did not (never counted)."""
    votes: list[Vote] = []
    broken = 0
    for value in _all(client, run, VOTE):
        vote = open_vote(value, key)
        if vote is None or vote.run != str(run):
            broken += 1
        else:
            votes.append(vote)
    return votes, broken


def read_decision(client: SyncPrefectClient, run: UUID, plan: str) -> dict[str, Any] | None:
    """The stored decision of the run's gate on `plan`, or None while it is still open."""
    for value in _all(client, run, DECISION + plan):
        if isinstance(value, dict):
            return value
    return None


def save_decision(client: SyncPrefectClient, run: UUID, plan: str, result: Tally) -> None:
    """How the gate ended and who counted: read by post-incident and the audit export."""
    value = {
        "approved": result.state == "approved",
        "state": result.state,
        "plan": plan,
        "approvers": [
            {
                "approver": c.vote.approver,
                "channel": c.vote.channel,
                "choice": c.vote.choice,
                "at": c.vote.at,
                "counted": c.counted,
                "why": c.why,
                "reason": c.vote.reason,
            }
            for c in result.votes
        ],
    }
    try:
        client.create_flow_run_input(run, DECISION + plan, json.dumps(value))
    except (ObjectAlreadyExists, PrefectHTTPStatusError) as exc:
        if isinstance(exc, PrefectHTTPStatusError) and exc.response.status_code != 409:
            raise
