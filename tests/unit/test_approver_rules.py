"""Approver rules in the escalation config: what is refused at load, which rule applies."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from tasks.contacts import ApproverRule, EscalationConfig

DEFAULT = {"runbook": "*", "action": "*", "approvers": ["on-call"]}


def contacts(**extra: dict[str, Any]) -> dict[str, Any]:
    """The default contacts plus (or overriding) `extra`."""
    base = {n: c.model_dump() for n, c in EscalationConfig().contacts.items()}
    return {**base, **extra}


def config(approvers: list[dict[str, Any]], **extra: dict[str, Any]) -> EscalationConfig:
    return EscalationConfig.model_validate({"contacts": contacts(**extra), "approvers": approvers})


def test_the_defaults_load_and_say_who_decides_what() -> None:
    c = EscalationConfig()
    assert c.rule_for("db-pool-exhausted", "terminate-sessions").approvers == [
        "on-call",
        "on-call-secondary",
        "team-lead",
    ]
    restart = c.rule_for("high-error-rate", "database-restart")
    assert (restart.approvers, restart.self_declared) == (["db-team"], False)
    rotate = c.rule_for("security-breach", "rotate-secrets")
    assert (rotate.min_approvers, rotate.self_declared) == (2, False)


def test_an_unknown_approver_contact_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"not defined: \['dba-oncall'\]"):
        config([DEFAULT, {"runbook": "x", "approvers": ["dba-oncall"]}])


def test_an_unknown_group_member_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"not defined: \['ghost'\]"):
        config([DEFAULT], dbas={"channels": ["slack-webhook/dbas"], "members": ["ghost"]})


def test_a_rule_that_could_never_be_met_is_refused() -> None:
    with pytest.raises(ValidationError, match="needs 3 distinct approvers but names only 2"):
        config(
            [
                DEFAULT,
                {"action": "restart", "approvers": ["on-call", "team-lead"], "min_approvers": 3},
            ]
        )


def test_min_approvers_counts_a_groups_members() -> None:
    group = {
        "channels": ["custom-webhook/db-team-slack"],
        "members": ["on-call", "team-lead", "on-call-secondary"],
    }
    c = config(
        [DEFAULT, {"action": "restart", "approvers": ["db-team"], "min_approvers": 3}],
        **{"db-team": group},
    )
    assert c.individuals(["db-team"]) == ["on-call", "team-lead", "on-call-secondary"]
    with pytest.raises(ValidationError, match="names only 3"):
        config(
            [DEFAULT, {"action": "restart", "approvers": ["db-team"], "min_approvers": 4}],
            **{"db-team": group},
        )


def test_a_slack_user_of_two_contacts_is_refused() -> None:
    with pytest.raises(ValidationError, match="Slack user U0AAA is both alice and bob"):
        config(
            [DEFAULT],
            alice={"channels": ["slack-webhook/alice"], "slack_user_ids": ["U0AAA"]},
            bob={"channels": ["slack-webhook/bob"], "slack_user_ids": ["U0BBB", "U0AAA"]},
        )


def test_a_slack_user_maps_to_its_contact() -> None:
    c = config([DEFAULT], alice={"channels": ["slack-webhook/alice"], "slack_user_ids": ["U0A"]})
    assert c.slack_contact("U0A") == "alice" and c.slack_contact("U0NOBODY") is None


def test_a_missing_default_rule_is_refused() -> None:
    with pytest.raises(ValidationError, match="a default rule"):
        config([{"runbook": "high-error-rate", "approvers": ["on-call"]}])
    with pytest.raises(ValidationError, match="a default rule"):
        config([{"runbook": "*", "action": "restart", "approvers": ["on-call"]}])


@pytest.mark.parametrize("bad", [{"min_approvers": 0}, {"min_approvers": 11}, {"approvers": []}])
def test_rule_fields_have_bounds(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ApproverRule.model_validate({"approvers": ["on-call"], **bad})


def test_groups_expand_recursively_once_each_even_in_a_cycle() -> None:
    c = config(
        [DEFAULT],
        a={"channels": ["slack-webhook/a"], "members": ["b", "on-call"]},
        b={"channels": ["slack-webhook/b"], "members": ["a", "team-lead", "on-call"]},
    )
    assert c.individuals(["a"]) == ["team-lead", "on-call"]
    assert c.individuals(["a", "team-lead", "b"]) == ["team-lead", "on-call"]


RULES = [
    {"runbook": "*", "action": "*", "approvers": ["on-call"]},
    {"runbook": "*", "action": "restart", "approvers": ["team-lead"]},
    {"runbook": "high-error-rate", "action": "*", "approvers": ["db-team"]},
    {"runbook": "high-error-rate", "action": "restart", "approvers": ["leadership"]},
]


@pytest.mark.parametrize(
    ("runbook", "action", "who"),
    [
        ("high-error-rate", "restart", "leadership"),  # runbook + action
        ("high-error-rate", "rollout-undo", "db-team"),  # runbook + *
        ("high-latency", "restart", "team-lead"),  # * + action
        ("high-latency", "cache-clear", "on-call"),  # * + *
    ],
)
def test_the_most_specific_rule_applies(runbook: str, action: str, who: str) -> None:
    assert config(RULES).rule_for(runbook, action).approvers == [who]


@given(st.permutations(RULES))
def test_precedence_does_not_depend_on_the_order_of_rules(rules: list[dict[str, Any]]) -> None:
    c = config(rules)
    assert c.rule_for("high-error-rate", "restart").approvers == ["leadership"]
    assert c.rule_for("high-error-rate", "x").approvers == ["db-team"]
    assert c.rule_for("other", "restart").approvers == ["team-lead"]
    assert c.rule_for("other", "x").approvers == ["on-call"]


def test_of_two_equally_specific_rules_the_later_one_wins() -> None:
    later = {"runbook": "*", "action": "restart", "approvers": ["leadership"]}
    assert config([*RULES, later]).rule_for("high-latency", "restart").approvers == ["leadership"]
