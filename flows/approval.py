"""The approval gate: ask who the policy names, in one tap from their page; count only them.

    plan -> requirements (tasks/approvals/tally) -> request stored on the run
         -> each allowed approver paged with their own signed Approve/Refuse links
         -> pause (Prefect's Resume form stays a way in, as a self-declared answer)
         -> every wake-up: read the sealed votes, tally -> approved | refused | pause again
         -> timeout: refused, nothing done

A vote counts only when the receiver verified it (a signed link's confirm, a Slack click
whose signature holds) and sealed it with the server key, or when it is a Resume-form
answer and the rule allows self-declared answers. The decision, with every vote and why it
did or did not count, is stored on the run for post-incident and shown in the artifact.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import BaseModel, Field, SecretStr

from flows.common import _end_expired_pause, md_escape, run_link, table
from flows.escalate import notify_contact
from tasks.approvals.desk import WAKE
from tasks.approvals.message import ApprovalMessage
from tasks.approvals.signing import (
    ApprovalSettings,
    LinkClaims,
    Vote,
    new_nonce,
    plan_hash,
    sign_link,
)
from tasks.approvals.store import ApprovalRequest, read_votes, save_decision, save_request
from tasks.approvals.tally import Counted, Requirement, Tally, recipients, requirements, tally
from tasks.contacts import EscalationConfig, load_config


class Approval(RunInput):
    """Prefect's Resume form: a self-declared answer, counted only where the policy allows."""

    approved: bool = Field(False, description="Tick to allow the planned action.")
    approver: str = Field(
        ..., min_length=1, max_length=200, description="Your name (self-declared, unverified)."
    )
    reason: str = Field("", max_length=2000, description="Why; recorded in the audit.")


@dataclass
class Decision:
    """How the gate ended: approved or not, and every vote with its part in it."""

    approved: bool
    summary: str
    requirements: list[Requirement] = field(default_factory=list)
    votes: list[Counted] = field(default_factory=list)
    #: Whom the links went to, through which channel (or why none).
    paged: list[str] = field(default_factory=list)

    @property
    def approver(self) -> str:
        """The counted approvers, comma-separated ("nobody" when none)."""
        names = [c.vote.approver for c in self.votes if c.counted]
        return ", ".join(dict.fromkeys(names)) or "nobody"

    def line(self) -> str:
        verdict = "approved" if self.approved else "refused"
        return f"{verdict} by **{md_escape(self.approver)}**: {md_escape(self.summary)}"

    def markdown(self) -> str:
        """The Approval section: the decision, the rules, and every vote."""
        rules = "\n".join(f"- {md_escape(r.line())}" for r in self.requirements)
        return "\n\n".join(
            part
            for part in [self.line(), rules, votes_md(self.votes) if self.votes else ""]
            if part
        )


_CHANNEL = {
    "link": "signed link (verified)",
    "slack": "Slack (verified)",
    "ui": "UI (self-declared)",
}


def votes_md(votes: list[Counted]) -> str:
    """Each vote: who, through what, when, what, and whether it counted."""
    return table(
        ["approver", "channel", "when (UTC)", "decision", "counted", "reason"],
        [
            [
                c.vote.approver,
                _CHANNEL[c.vote.channel],
                datetime.fromtimestamp(c.vote.at, UTC).strftime("%Y-%m-%d %H:%M:%S"),
                c.vote.choice,
                "yes" if c.counted else f"no: {c.why}",
                c.vote.reason,
            ]
            for c in votes
        ],
    )


class Asked(BaseModel):
    """What the gate asks: the runbook, the actions, and the evidence behind them."""

    runbook: str
    kinds: list[str]
    actions: list[str]
    evidence: str = ""
    page_links: bool = True


def request_approval(asked: Asked, plan_of: list[Any], timeout_s: int) -> Decision:
    """Ask, page, pause and count until the policy decides; a timeout refuses."""
    logger = get_run_logger()
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        raise RuntimeError("an approval gate runs inside a flow run")
    run = ctx.flow_run
    config = load_config()
    reqs = requirements(config, asked.runbook, asked.kinds)
    plan = plan_hash(plan_of)
    settings = ApprovalSettings()
    key = settings.key()
    now = time.time()
    request = ApprovalRequest(
        run=str(run.id),
        run_name=run.name,
        runbook=asked.runbook,
        plan=plan,
        actions=asked.actions,
        evidence=asked.evidence[:20_000],
        requirements=reqs,
        asked_at=now,
        expires_at=now + timeout_s,
    )
    with get_client(sync_client=True) as client:
        save_request(client, request)
    logger.warning(
        "Approval needed (%s): %s (waiting up to %d s)",
        "; ".join(r.line() for r in reqs),
        "; ".join(asked.actions)[:500],
        timeout_s,
    )
    paged: list[str] = []
    if key is None:
        logger.warning("no approval signing key: no links sent; only the Resume form answers")
        paged.append("no links sent: no approval signing key is configured")
    elif asked.page_links or not all(r.self_declared for r in reqs):
        # Unattended runs page their approvers; a run started by a human in the UI too when
        # a rule counts verified answers only (the Resume form cannot approve it).
        paged = _page_links(request, settings, key, config)
    decision = _wait(request, reqs, key, timeout_s)
    decision.paged = paged
    return decision


def _page_links(
    request: ApprovalRequest, settings: ApprovalSettings, key: bytes, config: EscalationConfig
) -> list[str]:
    """Each allowed approver gets their own Approve and Refuse links, on their channels;
    returns one line per recipient: reached through which block, or not."""
    lines: list[str] = []
    expires = int(min(request.expires_at, time.time() + settings.link_ttl_s))
    needs = "; ".join(r.line() for r in request.requirements)
    base = settings.base_url.rstrip("/")
    for recipient in recipients(request.requirements):
        nonce = new_nonce()
        tokens = {
            choice: sign_link(
                LinkClaims(
                    run=request.run,
                    recipient=recipient,
                    plan=request.plan,
                    choice=choice,
                    exp=expires,
                    nonce=nonce,
                ),
                key,
            )
            for choice in ("approve", "refuse")
        }
        message = ApprovalMessage(
            run=request.run,
            run_name=request.run_name,
            runbook=request.runbook,
            recipient=recipient,
            actions=request.actions,
            needs=needs,
            run_url=run_link(request.run),
            approve_url=SecretStr(f"{base}/approvals/{tokens['approve']}"),
            refuse_url=SecretStr(f"{base}/approvals/{tokens['refuse']}"),
            approve_token=SecretStr(tokens["approve"]),
            refuse_token=SecretStr(tokens["refuse"]),
            expires_at=expires,
        )
        # One page per recipient and plan: a retried gate does not page twice.
        rows = notify_contact(
            config,
            recipient,
            request.run,
            message.subject(),
            message.text(),
            stage=f"approval-request:{request.plan[:12]}",
            approval=message,
        )
        sent = [d.block for d in rows if d.status in {"sent", "unconfirmed"}]
        lines.append(
            f"links to {recipient}: "
            + (f"via {', '.join(sent)}" if sent else "NOT delivered (no channel answered)")
        )
    return lines


def _wait(
    request: ApprovalRequest, reqs: list[Requirement], key: bytes | None, timeout_s: int
) -> Decision:
    run = UUID(request.run)
    deadline = time.monotonic() + timeout_s
    typed: list[Vote] = []
    while True:
        votes = list(typed)
        if key is not None:
            with get_client(sync_client=True) as client:
                sealed, broken = read_votes(client, run, key)
            votes += sealed
            if broken:
                get_run_logger().warning("%d stored vote(s) without a valid seal: ignored", broken)
        result = tally(reqs, request.plan, votes)
        if result.state != "pending":
            return _decided(request, reqs, result.state == "approved", result.votes, "")
        remaining = int(deadline - time.monotonic())
        if remaining < 1:
            return _decided(
                request,
                reqs,
                False,
                result.votes,
                f"no answer within {timeout_s} s (still needed: {result.missing}); nothing done",
            )
        try:
            answer = pause_flow_run(
                wait_for_input=Approval.with_initial_data(
                    description=_form_text(request, reqs, result.missing), approved=False
                ),
                timeout=remaining,
                poll_interval=min(2, max(1, remaining // 4)),  # a confirmed link acts within ~2 s
                key=f"approval-{secrets.token_hex(4)}",
            )
        except FlowPauseTimeout:
            _end_expired_pause()
            continue  # the last tally above the loop's top decides: refused by timeout
        if not answer.reason.startswith(WAKE):
            # A human's Resume-form answer: recorded as typed, self-declared.
            typed.append(
                Vote(
                    run=request.run,
                    plan=request.plan,
                    approver=answer.approver,
                    choice="approve" if answer.approved else "refuse",
                    channel="ui",
                    at=time.time(),
                    reason=answer.reason,
                )
            )


def _form_text(request: ApprovalRequest, reqs: list[Requirement], missing: str) -> str:
    rules = "\n".join(f"- {r.line()}" for r in reqs)
    plan = "\n".join(f"- {a}" for a in request.actions)
    return (
        f"**{request.runbook}** asks to approve:\n\n{plan}\n\nWho decides:\n\n{rules}\n\n"
        f"Still needed: {missing}. Approvers got signed links; an answer here is"
        " self-declared and counts only where a rule above says so."
    )[:5000]


def _decided(
    request: ApprovalRequest,
    reqs: list[Requirement],
    approved: bool,
    votes: list[Counted],
    why: str,
) -> Decision:
    summary = why or ("approved" if approved else "refused by an allowed approver")
    with get_client(sync_client=True) as client:
        # The decision with every vote, kept on the run (post-incident reads it).
        state = "approved" if approved else ("refused" if not why else "pending")
        save_decision(client, UUID(request.run), request.plan, Tally(state=state, votes=votes))
    return Decision(approved=approved, summary=summary, requirements=reqs, votes=votes)
