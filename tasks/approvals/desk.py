"""The receiver's side of an approval: check a decision against the run, store it, wake the run.

Used for a signed link's confirm POST and for a Slack button click alike. Nothing here
decides the outcome: the paused run tallies the sealed votes under its policy. This only
refuses what must never be stored (a run that no longer waits, an older plan, a second
use) and says so in words a person at 3 a.m. understands.
"""

from __future__ import annotations

import time
from typing import Literal
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import FlowRun
from pydantic import BaseModel, Field

from tasks.approvals.signing import Channel, LinkClaims, Vote
from tasks.approvals.store import (
    ApprovalRequest,
    latest_request,
    read_decision,
    read_votes,
    record_vote,
)
from tasks.approvals.tally import recipients, tally

Outcome = Literal["recorded", "used", "stale", "not-waiting", "not-allowed"]

#: The prefix of the Resume-form reason by which the receiver wakes a run: not a human answer.
WAKE = "signed-vote:"


class Looked(BaseModel):
    """What a link points at now: the run's state and its current request."""

    run_name: str
    state: str
    paused: bool
    #: The gate still counts votes: the run is not final and has not decided this plan (it
    #: may be Running for a moment between two pauses, counting the previous vote).
    waiting: bool
    decided: str = Field("", description="approved / refused / pending (timed out), if so.")
    request: ApprovalRequest | None
    #: Whether the run ever asked for an approval (False: a link for the wrong run).
    asked: bool = True

    @property
    def stale(self) -> bool:
        return self.request is None


def look(client: SyncPrefectClient, claims: LinkClaims) -> Looked:
    """The run and request a (verified) token names, for the confirm page."""
    run: FlowRun = client.read_flow_run(UUID(claims.run))
    state = run.state
    request = latest_request(client, run.id)
    current = request if request is not None and request.plan == claims.plan else None
    decision = read_decision(client, run.id, claims.plan)
    final = state is None or state.is_final()
    return Looked(
        run_name=run.name,
        state=state.name if state and state.name else "unknown",
        paused=bool(state and state.is_paused()),
        waiting=not final and decision is None,
        decided=str(decision.get("state", "")) if decision else "",
        request=current,
        asked=request is not None,
    )


class Decided(BaseModel):
    """What happened to one decision, for the page or the Slack message."""

    outcome: Outcome
    message: str
    approver: str
    choice: str


def decide(
    client: SyncPrefectClient,
    key: bytes,
    claims: LinkClaims,
    *,
    approver: str,
    channel: Channel,
    reason: str,
    use: str,
    wake_within_s: float = 15.0,
) -> Decided:
    """Store `approver`'s decision on the run `claims` names, and wake the run to count it."""
    run_id = UUID(claims.run)
    looked = look(client, claims)

    def answer(outcome: Outcome, message: str) -> Decided:
        return Decided(outcome=outcome, message=message, approver=approver, choice=claims.choice)

    if not looked.waiting:
        already = f"; it already decided: {looked.decided}" if looked.decided else ""
        return answer(
            "not-waiting",
            f"The run no longer waits for an approval ({looked.state}{already}). Nothing was"
            " recorded.",
        )
    if looked.request is None:  # the run's current request is for another plan
        return answer(
            "stale",
            "This link is for an older plan: the run re-planned since. Nothing was recorded;"
            " use the link of the newest page.",
        )
    request = looked.request
    vote = Vote(
        run=claims.run,
        plan=claims.plan,
        approver=approver,
        choice=claims.choice,
        channel=channel,
        at=time.time(),
        reason=reason[:2000],
        recipient=claims.recipient,
    )
    if not record_vote(client, vote, use, key):
        return answer("used", "This link was already used: a link decides once.")
    if approver not in recipients(request.requirements):
        return answer(
            "not-allowed",
            f"{approver} is not an allowed approver of this plan: recorded, not counted.",
        )
    _wake(client, run_id, vote, use, wake_within_s)
    votes, _ = read_votes(client, run_id, key)
    now = tally(request.requirements, request.plan, votes)
    verdict = {
        "approved": "Approved: the run goes on.",
        "refused": "Refused: the run changes nothing.",
        "pending": f"Counted. Still needed: {now.missing}.",
    }[now.state]
    return answer("recorded", f"{claims.choice.capitalize()} by {approver} recorded. {verdict}")


def _wake(client: SyncPrefectClient, run: UUID, vote: Vote, use: str, within_s: float) -> bool:
    """Resume the paused run so it counts the vote; it may be between two pauses: retry.

    The run reads every vote before each pause, so a wake that finds it running is only
    needed if the vote landed after that read: retried until it pauses again or ends.
    """
    deadline = time.monotonic() + within_s
    run_input = {
        "approved": vote.choice == "approve",
        "approver": f"{vote.approver} (verified, {vote.channel})",
        "reason": WAKE + use,
    }
    while True:
        state = client.read_flow_run(run).state
        if state is None or state.is_final() or read_decision(client, run, vote.plan):
            return False  # ended, or the gate decided (it counted this vote or did not need it)
        if state.is_paused():
            result = client.resume_flow_run(run, run_input=run_input)
            if result.status.value == "ACCEPT":
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
