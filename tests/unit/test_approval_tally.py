"""The approval policy, pure: distinct approvers, refusals, self-declared answers, groups."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tasks.approvals.signing import Channel, Choice, Vote
from tasks.approvals.tally import Requirement, recipients, requirements, tally
from tasks.contacts import EscalationConfig

PLAN = "p" * 32
OLD_PLAN = "o" * 32
RUN = "7b7c6c8e-0000-4000-8000-000000000001"


def req(
    approvers: list[str], min_approvers: int = 1, self_declared: bool = True, **kw: Any
) -> Requirement:
    return Requirement(
        actions=kw.get("actions", ["restart"]),
        approvers=approvers,
        named=kw.get("named", approvers),
        min_approvers=min_approvers,
        self_declared=self_declared,
    )


_clock = iter(range(1, 10**6))


def v(
    approver: str,
    choice: Choice = "approve",
    channel: Channel = "link",
    plan: str = PLAN,
    at: float | None = None,
) -> Vote:
    return Vote(
        run=RUN,
        plan=plan,
        approver=approver,
        choice=choice,
        channel=channel,
        at=float(next(_clock)) if at is None else at,
    )


def test_one_allowed_approval_approves_a_rule_of_one() -> None:
    result = tally([req(["alice", "bob"])], PLAN, [v("alice")])
    assert result.state == "approved"
    assert [c.vote.approver for c in result.approvers] == ["alice"]


def test_no_vote_is_pending_and_says_what_is_missing() -> None:
    result = tally([req(["alice", "bob"], 2, actions=["rotate-secrets"])], PLAN, [])
    assert result.state == "pending" and result.missing == "2 more for rotate-secrets"


def test_two_distinct_required_one_is_not_enough() -> None:
    result = tally([req(["alice", "bob"], 2)], PLAN, [v("alice")])
    assert result.state == "pending" and result.missing == "1 more for restart"


def test_two_distinct_required_the_same_approver_twice_is_not_enough() -> None:
    result = tally([req(["alice", "bob"], 2)], PLAN, [v("alice"), v("alice", channel="slack")])
    assert result.state == "pending"
    assert [(c.counted, c.why) for c in result.votes] == [
        (True, ""),
        (False, "already counted for this approver"),
    ]


def test_two_distinct_required_two_distinct_are_enough() -> None:
    result = tally([req(["alice", "bob"], 2)], PLAN, [v("alice"), v("bob", channel="slack")])
    assert result.state == "approved"
    assert {c.vote.approver for c in result.approvers} == {"alice", "bob"}


def test_a_refusal_from_an_allowed_approver_refuses_even_after_approvals() -> None:
    votes = [v("alice"), v("bob"), v("carol", "refuse")]
    result = tally([req(["alice", "bob", "carol"], 2)], PLAN, votes)
    assert result.state == "refused"
    assert result.votes[-1].counted


def test_a_refusal_from_someone_not_allowed_is_recorded_and_ignored() -> None:
    result = tally([req(["alice"])], PLAN, [v("mallory", "refuse"), v("alice")])
    assert result.state == "approved"
    assert (result.votes[0].counted, result.votes[0].why) == (
        False,
        "not an allowed approver of this plan",
    )


def test_an_approval_from_someone_not_allowed_does_not_count() -> None:
    result = tally([req(["alice"])], PLAN, [v("mallory")])
    assert result.state == "pending" and not result.votes[0].counted


def test_self_declared_answers_count_only_where_the_rule_allows_them() -> None:
    typed = v("anyone at all", channel="ui")
    assert tally([req(["alice"], self_declared=True)], PLAN, [typed]).state == "approved"
    closed = tally([req(["alice"], self_declared=False)], PLAN, [typed])
    assert closed.state == "pending"
    assert closed.votes[0].why == "self-declared answers do not count here"
    # Even a typed name that is an allowed approver's: typing it proves nothing.
    assert tally([req(["alice"], self_declared=False)], PLAN, [v("alice", channel="ui")]).state == (
        "pending"
    )


def test_a_self_declared_refusal_refuses_where_typed_answers_count() -> None:
    votes = [v("alice"), v("bob", "refuse", channel="ui")]
    assert tally([req(["alice"], self_declared=True)], PLAN, votes).state == "refused"
    assert tally([req(["alice"], self_declared=False)], PLAN, votes).state == "approved"


def test_typed_names_are_distinct_only_from_other_typed_names() -> None:
    rule = req(["alice", "bob"], 2, self_declared=True)
    # "Alice" typed twice (any case, spaces) is one person; typed "alice" is not verified alice.
    same = [v("Alice", channel="ui"), v(" alice ", channel="ui")]
    assert tally([rule], PLAN, same).state == "pending"
    assert tally([rule], PLAN, [v("alice"), v("alice", channel="ui")]).state == "approved"


def test_votes_for_an_older_plan_are_ignored() -> None:
    result = tally([req(["alice"])], PLAN, [v("alice", plan=OLD_PLAN)])
    assert result.state == "pending"
    assert result.votes[0].why == "for an older plan of this run"
    refusal = tally([req(["alice"])], PLAN, [v("alice", "refuse", plan=OLD_PLAN), v("alice")])
    assert refusal.state == "approved"


def test_votes_are_listed_oldest_first_whatever_order_they_were_read() -> None:
    votes = [v("bob", at=30.0), v("alice", at=10.0), v("carol", at=20.0)]
    result = tally([req(["alice", "bob", "carol"], 3)], PLAN, votes)
    assert [c.vote.approver for c in result.votes] == ["alice", "carol", "bob"]


def test_every_requirement_must_be_met() -> None:
    reqs = [req(["alice"], actions=["restart"]), req(["dba"], actions=["database-restart"])]
    assert tally(reqs, PLAN, [v("alice")]).state == "pending"
    assert tally(reqs, PLAN, [v("alice")]).missing == "1 more for database-restart"
    assert tally(reqs, PLAN, [v("alice"), v("dba")]).state == "approved"


def test_groups_expand_to_their_members() -> None:
    config = EscalationConfig.model_validate(
        {
            "contacts": {
                **{n: c.model_dump() for n, c in EscalationConfig().contacts.items()},
                "dba-1": {"channels": ["slack-webhook/dba-1"]},
                "dba-2": {"channels": ["slack-webhook/dba-2"]},
                "db-team": {
                    "channels": ["custom-webhook/db-team-slack"],
                    "members": ["dba-1", "dba-2"],
                },
            },
            "approvers": [
                {"approvers": ["on-call"]},
                {
                    "runbook": "high-error-rate",
                    "action": "database-restart",
                    "approvers": ["db-team"],
                    "min_approvers": 2,
                    "self_declared": False,
                },
            ],
        }
    )
    (rule,) = requirements(config, "high-error-rate", ["database-restart"])
    assert rule.approvers == ["dba-1", "dba-2"] and rule.named == ["db-team"]
    assert recipients([rule]) == ["dba-1", "dba-2"]
    # The group's name is not a member: a vote as "db-team" is not one of its people.
    assert tally([rule], PLAN, [v("db-team"), v("dba-1")]).state == "pending"
    assert tally([rule], PLAN, [v("dba-1"), v("dba-2")]).state == "approved"


def test_requirements_group_the_actions_of_one_rule() -> None:
    config = EscalationConfig()
    reqs = requirements(config, "high-error-rate", ["rollout-undo", "database-restart", "restart"])
    assert [r.actions for r in reqs] == [["rollout-undo", "restart"], ["database-restart"]]
    assert reqs[0].approvers == ["on-call", "on-call-secondary", "team-lead"]
    assert (reqs[1].approvers, reqs[1].self_declared) == (["db-team"], False)
    assert recipients(reqs) == ["on-call", "on-call-secondary", "team-lead", "db-team"]


APPROVERS = ["alice", "bob", "carol", "dave"]
VOTES = st.lists(
    st.builds(
        v,
        approver=st.sampled_from([*APPROVERS, "mallory"]),
        choice=st.sampled_from(["approve", "refuse"]),
        channel=st.sampled_from(["link", "slack", "ui"]),
        plan=st.sampled_from([PLAN, OLD_PLAN]),
        at=st.floats(min_value=0, max_value=1000),
    ),
    max_size=12,
)


@given(VOTES, st.integers(min_value=1, max_value=4), st.booleans())
def test_the_decision_follows_the_policy_for_any_votes(
    votes: list[Vote], needed: int, typed: bool
) -> None:
    rule = req(APPROVERS, needed, self_declared=typed)
    result = tally([rule], PLAN, votes)
    assert len(result.votes) == len(votes)

    def allowed(vote: Vote) -> bool:
        return vote.plan == PLAN and (vote.approver in APPROVERS if vote.verified else typed)

    counted_refusal = any(allowed(x) and x.choice == "refuse" for x in votes)
    distinct = {
        x.approver if x.verified else f"ui:{x.approver}"
        for x in votes
        if allowed(x) and x.choice == "approve"
    }
    if counted_refusal:
        assert result.state == "refused"
    elif len(distinct) >= needed:
        assert result.state == "approved"
    else:
        assert result.state == "pending"
    # Nobody outside the policy, nor an older plan's vote, ever counts.
    assert all(allowed(c.vote) for c in result.votes if c.counted)
    assert all(c.why for c in result.votes if not c.counted)
