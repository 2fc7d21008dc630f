"""Who may approve what, and whether the votes so far decide: the approval policy, pure.

Each planned action has a requirement: the approvers rule of (runbook, action kind) from
the escalation config. The plan is approved when every requirement has its number of
distinct counted approvals; refused as soon as one counted vote refuses. A vote counts for
a requirement when it is for the plan asked about, and its approver is one of the rule's
individuals (verified: a signed link or a Slack click), or it is a self-declared answer
from Prefect's Resume form and the rule allows those. Everything else is recorded with
the reason it did not count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, Field

from tasks.approvals.signing import Vote
from tasks.contacts import EscalationConfig

State = Literal["approved", "refused", "pending"]


class Requirement(BaseModel):
    """What one rule asks of the plan, for the actions it covers."""

    actions: list[str] = Field(description="The action kinds this rule decides.")
    approvers: list[str] = Field(description="The individuals allowed (groups expanded).")
    named: list[str] = Field(description="The rule's approvers as configured.")
    min_approvers: int
    self_declared: bool

    def allows(self, vote: Vote) -> bool:
        if vote.verified:
            return vote.approver in self.approvers
        return self.self_declared

    def line(self) -> str:
        who = ", ".join(self.named)
        ui = "Resume form counts (self-declared)" if self.self_declared else "verified only"
        return (
            f"{', '.join(self.actions)}: {self.min_approvers} of {who}"
            f" ({len(self.approvers)} people); {ui}"
        )


def requirements(config: EscalationConfig, runbook: str, kinds: Sequence[str]) -> list[Requirement]:
    """The plan's requirements: one per distinct rule its actions fall under."""
    by_rule: dict[int, Requirement] = {}
    for kind in dict.fromkeys(kinds):
        rule = config.rule_for(runbook, kind)
        found = by_rule.get(id(rule))
        if found is not None:
            found.actions.append(kind)
            continue
        by_rule[id(rule)] = Requirement(
            actions=[kind],
            approvers=config.individuals(rule.approvers),
            named=list(rule.approvers),
            min_approvers=rule.min_approvers,
            self_declared=rule.self_declared,
        )
    return list(by_rule.values())


def recipients(reqs: Sequence[Requirement]) -> list[str]:
    """Everyone an approval request goes to: every requirement's individuals, no repeats."""
    return list(dict.fromkeys(name for r in reqs for name in r.approvers))


class Counted(BaseModel):
    """One vote and what it did: counted (for which actions) or why not."""

    vote: Vote
    counted: bool
    why: str = ""


class Tally(BaseModel):
    """The decision so far."""

    state: State
    votes: list[Counted]
    missing: str = Field("", description="What is still needed, when pending.")

    @property
    def approvers(self) -> list[Counted]:
        return [c for c in self.votes if c.counted]


def _identity(vote: Vote) -> str:
    # A typed name is not an identity: distinct only from other typed names.
    return vote.approver if vote.verified else f"ui:{vote.approver.strip().lower()}"


def tally(reqs: Sequence[Requirement], plan: str, votes: Sequence[Vote]) -> Tally:
    """Approved, refused or pending, with each vote's part in it (oldest first)."""
    rows: list[Counted] = []
    approvals: dict[int, set[str]] = {i: set() for i in range(len(reqs))}
    refused = False
    for vote in sorted(votes, key=lambda v: v.at):
        if vote.plan != plan:
            rows.append(Counted(vote=vote, counted=False, why="for an older plan of this run"))
            continue
        allowed = [i for i, r in enumerate(reqs) if r.allows(vote)]
        if not allowed:
            why = (
                "self-declared answers do not count here"
                if not vote.verified
                else "not an allowed approver of this plan"
            )
            rows.append(Counted(vote=vote, counted=False, why=why))
            continue
        who = _identity(vote)
        if vote.choice == "refuse":
            refused = True
            rows.append(Counted(vote=vote, counted=True))
            continue
        fresh = [i for i in allowed if who not in approvals[i]]
        if not fresh:
            rows.append(Counted(vote=vote, counted=False, why="already counted for this approver"))
            continue
        for i in fresh:
            approvals[i].add(who)
        rows.append(Counted(vote=vote, counted=True))
    if refused:
        return Tally(state="refused", votes=rows)
    short = [
        f"{r.min_approvers - len(approvals[i])} more for {', '.join(r.actions)}"
        for i, r in enumerate(reqs)
        if len(approvals[i]) < r.min_approvers
    ]
    if short:
        return Tally(state="pending", votes=rows, missing="; ".join(short))
    return Tally(state="approved", votes=rows)
