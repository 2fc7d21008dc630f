"""Post-incident's approvals, from the run's inputs: decisions first, form answers else."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

from prefect.client.schemas.objects import FlowRunInput

from tasks.approvals.desk import WAKE
from tasks.approvals.record import from_answers, from_decisions, run_approvals

RUN = uuid4()
T0 = datetime(2026, 12, 6, 3, 0, tzinfo=UTC)


def stored(key: str, value: Any, after_s: float = 0) -> FlowRunInput:
    return FlowRunInput(
        flow_run_id=RUN, key=key, value=json.dumps(value), created=T0 + timedelta(seconds=after_s)
    )


def row(
    approver: str, channel: str, at_s: float, counted: bool = True, **kw: Any
) -> dict[str, Any]:
    return {
        "approver": approver,
        "channel": channel,
        "choice": kw.get("choice", "approve"),
        "at": (T0 + timedelta(seconds=at_s)).timestamp(),
        "counted": counted,
        "why": kw.get("why", ""),
        "reason": kw.get("reason", ""),
    }


def decision(plan: str, state: str, rows: list[dict[str, Any]], after_s: float) -> FlowRunInput:
    value = {"approved": state == "approved", "state": state, "plan": plan, "approvers": rows}
    return stored(f"approval-decision-{plan}", value, after_s)


def answer(approved: bool, who: str, reason: str, after_s: float) -> FlowRunInput:
    value = {"approved": approved, "approver": who, "reason": reason}
    return stored(f"paused-{int(after_s)}-response", value, after_s)


def test_two_verified_approvers_the_second_decides() -> None:
    got = from_decisions(
        [
            decision(
                "p1",
                "approved",
                [
                    row("mallory", "slack", 5, False, why="not an allowed approver of this plan"),
                    row("dba-1", "link", 10),
                    row("dba-2", "slack", 20, reason="INC-20"),
                ],
                25,
            )
        ]
    )
    assert got is not None
    assert got.approved_at == T0 + timedelta(seconds=20)
    assert got.by() == "dba-1 (signed link), dba-2 (Slack)"
    assert [v.line() for v in got.votes] == [
        "approved by mallory (Slack); not counted: not an allowed approver of this plan",
        "approved by dba-1 (signed link); counted",
        "approved by dba-2 (Slack); counted; reason: INC-20",
    ]


def test_a_refused_or_timed_out_gate_has_no_approval_time() -> None:
    refused = from_decisions(
        [decision("p1", "refused", [row("dba-1", "link", 10, choice="refuse")], 12)]
    )
    assert refused is not None and refused.approved_at is None and refused.by() == ""
    assert refused.votes[0].line() == "refused by dba-1 (signed link); counted"
    timed_out = from_decisions([decision("p1", "pending", [], 900)])
    assert timed_out is not None and timed_out.votes == [] and timed_out.approved_at is None


def test_a_re_planned_gate_lists_each_vote_once_as_it_counted() -> None:
    first = decision("p1", "approved", [row("on-call", "link", 10)], 11)
    # The second plan's decision lists the first plan's vote again, as not counted.
    second = decision(
        "p2",
        "approved",
        [
            row("on-call", "link", 10, False, why="for an older plan of this run"),
            row("team-lead", "ui", 40),
        ],
        41,
    )
    got = from_decisions([second, first])  # read in any order
    assert got is not None
    assert [(v.approver, v.counted) for v in got.votes] == [("on-call", True), ("team-lead", True)]
    # The run was first approved when the first plan's vote arrived.
    assert got.approved_at == T0 + timedelta(seconds=10) and got.by() == "on-call (signed link)"


def test_decisions_win_over_form_answers_and_wake_ups_never_count() -> None:
    answers = [
        answer(True, "on-call (verified, link)", f"{WAKE}abc", 11),
        answer(True, "alice", "typed", 30),
    ]
    records = [decision("p1", "approved", [row("on-call", "link", 10)], 12)]
    got = run_approvals(answers, records)
    assert got is not None and got.from_decision
    assert [v.approver for v in got.votes] == ["on-call"]


def test_without_a_decision_the_form_answers_are_the_record() -> None:
    got = run_approvals(
        [
            answer(False, "bob", "not yet", 5),
            answer(True, "alice", "INC-9", 10),
            answer(True, "carol", "", 20),
        ],
        [],
    )
    assert got is not None and not got.from_decision
    assert got.approved_at == T0 + timedelta(seconds=10)
    assert got.by() == "alice (UI, self-declared)"
    assert got.votes[0].line() == "refused by bob (UI, self-declared); counted; reason: not yet"


def test_wake_ups_alone_are_no_approval() -> None:
    assert from_answers([answer(True, "on-call (verified, link)", f"{WAKE}abc", 11)]) is None
    # A checklist answer, a broken value and an unknown decision shape are not approvals.
    checklist = stored("paused-2-response", {"filled_by": "bob", "root_cause": "x"})
    broken = FlowRunInput(flow_run_id=RUN, key="paused-3-response", value="{not json", created=T0)
    assert from_answers([checklist, broken]) is None
    odd = stored("approval-decision-p9", {"approved": True})
    assert run_approvals([checklist], [odd, broken]) is None
