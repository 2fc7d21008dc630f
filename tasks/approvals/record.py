"""A finished run's approvals as the incident record shows them: who, through what, when.

The gate (`flows/approval.py`) stores `approval-decision-<plan>` when it ends: every vote
with its channel, time and whether it counted. Those decisions are the record. A run
without one (approved before verified approvals existed) falls back to its Resume-form
answers, all self-declared; the answers the receiver leaves only to wake a paused run
(reason `desk.WAKE...`) are not votes and are never counted a second time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from prefect.client.schemas.objects import FlowRunInput
from pydantic import BaseModel, Field, ValidationError

from tasks.approvals.desk import WAKE
from tasks.approvals.signing import Channel, Choice
from tasks.approvals.store import DECISION

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: How the record names a channel: verified (a signed link, a Slack click) or not.
CHANNEL_LABEL: dict[Channel, str] = {
    "link": "signed link",
    "slack": "Slack",
    "ui": "UI, self-declared",
}


class RecordedVote(BaseModel):
    """One approver's decision on one run, and its part in the outcome."""

    approver: str
    channel: Channel
    choice: Choice
    at: datetime
    counted: bool
    why: str = ""
    reason: str = ""

    def who(self) -> str:
        """The approver with the channel that vouches for them."""
        return f"{self.approver} ({CHANNEL_LABEL[self.channel]})"

    def line(self) -> str:
        """One timeline detail: decision, who, channel, counted or why not, and the reason."""
        verdict = "approved" if self.choice == "approve" else "refused"
        part = "counted" if self.counted else f"not counted: {self.why or 'no reason given'}"
        reason = f"; reason: {self.reason}" if self.reason else ""
        return f"{verdict} by {self.who()}; {part}{reason}"


class RunApprovals(BaseModel):
    """Every vote of one run (oldest first) and, when it was approved, when and by whom."""

    votes: list[RecordedVote]
    approved_at: datetime | None = None
    approved_by: list[RecordedVote] = Field(default_factory=list)
    from_decision: bool = True

    def by(self) -> str:
        """The counted approvers with their channels, comma-separated."""
        return ", ".join(dict.fromkeys(v.who() for v in self.approved_by))


class _Row(BaseModel):
    """A vote as `store.save_decision` writes it."""

    approver: str
    channel: Channel
    choice: Choice
    at: float
    counted: bool
    why: str = ""
    reason: str = ""


class _Decision(BaseModel):
    approved: bool
    state: str
    plan: str
    approvers: list[_Row]


def _value(item: FlowRunInput) -> Any:
    try:
        return json.loads(item.value)
    except ValueError:
        return None


def _decisions(records: Iterable[FlowRunInput]) -> list[_Decision]:
    """The run's stored decisions, oldest first; anything unreadable is skipped."""
    found: list[tuple[datetime, _Decision]] = []
    for item in records:
        if not item.key.startswith(DECISION):
            continue
        try:
            found.append((item.created or _EPOCH, _Decision.model_validate(_value(item))))
        except ValidationError:
            continue
    return [d for _, d in sorted(found, key=lambda x: x[0])]


def _vote(row: _Row) -> RecordedVote:
    return RecordedVote(
        approver=row.approver[:200],
        channel=row.channel,
        choice=row.choice,
        at=datetime.fromtimestamp(row.at, UTC),
        counted=row.counted,
        why=row.why,
        reason=row.reason[:500],
    )


def from_decisions(records: Iterable[FlowRunInput]) -> RunApprovals | None:
    """The run's approvals from its gate decisions, or None when it stored none.

    A gate that re-planned stores one decision per plan, and every decision lists every vote
    of the run (older plans' ones as "not counted"): a vote is listed once, as counted
    where it counted. The run was approved when its first approved decision's last counted
    approval arrived: that vote decided.
    """
    decisions = _decisions(records)
    if not decisions:
        return None
    votes: dict[tuple[str, str, str, float], RecordedVote] = {}
    approved_at: datetime | None = None
    approved_by: list[RecordedVote] = []
    for decision in decisions:
        for row in decision.approvers:
            key = (row.approver, row.channel, row.choice, row.at)
            if key not in votes or (row.counted and not votes[key].counted):
                votes[key] = _vote(row)
        counted = [_vote(r) for r in decision.approvers if r.counted and r.choice == "approve"]
        if decision.approved and counted and approved_at is None:
            approved_at = max(v.at for v in counted)
            approved_by = sorted(counted, key=lambda v: v.at)
    return RunApprovals(
        votes=sorted(votes.values(), key=lambda v: v.at),
        approved_at=approved_at,
        approved_by=approved_by,
    )


def from_answers(answers: Iterable[FlowRunInput]) -> RunApprovals | None:
    """The run's approvals from its Resume-form answers (self-declared), or None."""
    votes: list[RecordedVote] = []
    for answer in answers:
        value = _value(answer)
        if not isinstance(value, dict) or "approved" not in value or answer.created is None:
            continue
        reason = str(value.get("reason") or "")
        if reason.startswith(WAKE):
            continue  # the receiver waking the run for a sealed vote, not a human answer
        votes.append(
            RecordedVote(
                approver=str(value.get("approver", ""))[:200],
                channel="ui",
                choice="approve" if value.get("approved") else "refuse",
                at=answer.created,
                counted=True,
                reason=reason[:500],
            )
        )
    if not votes:
        return None
    votes.sort(key=lambda v: v.at)
    first = next((v for v in votes if v.choice == "approve"), None)
    return RunApprovals(
        votes=votes,
        approved_at=first.at if first else None,
        approved_by=[first] if first else [],
        from_decision=False,
    )


def run_approvals(
    answers: Iterable[FlowRunInput], records: Iterable[FlowRunInput]
) -> RunApprovals | None:
    """The run's approvals: its gate decisions when it stored any, else its form answers."""
    found = from_decisions(records)
    return found if found is not None else from_answers(answers)
