"""The escalation path as typed config: severities, their deadlines, contacts and topics.

Defaults are the on-call runbook's table (critical < 15 min: page on-call and notify
executives; high < 1 h: team lead and the incident channel; medium < 4 h: a ticket; low
< 1 day: the backlog). A contact is a list of Prefect notification blocks, tried in order until one
answers; a block is named `<block-type-slug>/<block-name>` (e.g. `slack-webhook/db-team`,
`custom-webhook/on-call-pagerduty`) and saved in the Prefect server, never here: the webhook
URLs and routing keys stay in the blocks.

Override with `RUNBOOKS_ESCALATION_CONFIG_FILE` (a YAML file of the same shape,
`deployments/escalation.example.yaml`) and the deadlines alone with
`RUNBOOKS_ESCALATION_DEADLINES_S` (JSON, e.g. `{"critical": 5}`: tests use seconds).
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Self

import yaml
from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.errors import PermanentError

_BLOCK_REF = re.compile(r"^[a-z0-9-]+/[a-z0-9-]+$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class Severity(StrEnum):
    """The on-call runbook's four severities, most urgent first."""

    CRITICAL = "critical"
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"


#: Marks "the contact of the incident's topic" in a severity's `notify` list.
TOPIC = "{topic}"


class Contact(BaseModel):
    """Who is reached, and through which blocks (in order: the next when one is down)."""

    description: str = Field("", description="Who this is (for the report).")
    channels: list[str] = Field(
        min_length=1, description="Notification block refs `<block-type-slug>/<block-name>`."
    )
    members: list[str] = Field(
        default_factory=list,
        description="A group: the contacts it stands for. An approval request goes to each"
        " member with links of their own; without members the contact is one approver.",
    )
    slack_user_ids: list[str] = Field(
        default_factory=list,
        description="Slack user ids (U0...) that are this contact: a button click from one of"
        " them is this contact's decision.",
    )

    @field_validator("channels")
    @classmethod
    def _refs(cls, value: list[str]) -> list[str]:
        for ref in value:
            if not _BLOCK_REF.match(ref):
                raise ValueError(f"{ref!r} is not a block ref `<block-type-slug>/<block-name>`")
        return value


class SeverityPolicy(BaseModel):
    """What one severity does: whom to notify, how fast, and who is next without an ack."""

    deadline_s: int = Field(ge=1, description="Acknowledge (or act) within this many seconds.")
    action: str = Field(description="The on-call runbook's action, for the report.")
    notify: list[str] = Field(
        description=f"Contact names, or {TOPIC!r} for the contact of the incident's topic."
    )
    ack_required: bool = Field(
        False, description="Wait for an acknowledgement; without one, page the next level."
    )
    next_levels: list[str] = Field(
        default_factory=list,
        description="Contacts paged one by one, each after a deadline passed without an ack.",
    )


class ApprovalPolicy(BaseModel):
    """Re-paging while a runbook run waits for an approval: the on-call chain, never leadership.

    The first page goes out `repage_after_s` after the run paused, each next level one more
    `repage_after_s` later, until someone acknowledges or the run stops waiting (approved,
    refused, timed out, ended). The default (300 s, then on-call-secondary at 600 s) ends
    before the runbooks' approval timeout (900 s) and is not the critical deadline: an
    approval wait is a question for the on-call, not an incident for executives.
    """

    repage_after_s: int = Field(
        300, ge=1, description="Seconds paused before the first page, then between levels."
    )
    notify: list[str] = Field(
        default_factory=lambda: ["on-call"], description="Contacts paged first (on-call)."
    )
    next_levels: list[str] = Field(
        default_factory=lambda: ["on-call-secondary"],
        description="Contacts paged one by one while nobody acknowledges.",
    )


def _default_contacts() -> dict[str, Contact]:
    return {
        "on-call": Contact(
            description="primary on-call (PagerDuty), then the on-call Slack channel",
            channels=["custom-webhook/on-call-pagerduty", "custom-webhook/on-call-slack"],
        ),
        "on-call-secondary": Contact(
            description="secondary on-call (PagerDuty)",
            channels=["custom-webhook/on-call-secondary-pagerduty"],
        ),
        "team-lead": Contact(
            description="engineering team lead (Slack)", channels=["custom-webhook/team-lead-slack"]
        ),
        "incidents": Contact(
            description="the incident channel (Slack)", channels=["custom-webhook/incidents-slack"]
        ),
        "db-team": Contact(
            description="database team (Slack)", channels=["custom-webhook/db-team-slack"]
        ),
        "security-team": Contact(
            description="security team (Slack)", channels=["custom-webhook/security-team-slack"]
        ),
        "payments-team": Contact(
            description="payments team (Slack)", channels=["custom-webhook/payments-team-slack"]
        ),
        "leadership": Contact(
            description="executives (Slack)", channels=["custom-webhook/leadership-slack"]
        ),
        # The security-breach runbook's own contacts (the on-call runbook's escalation list).
        "security-lead": Contact(
            description="CTO or security lead (Slack)",
            channels=["custom-webhook/security-lead-slack"],
        ),
        "legal": Contact(description="legal team (Slack)", channels=["custom-webhook/legal-slack"]),
        "pr": Contact(
            description="PR / communications (Slack)", channels=["custom-webhook/pr-slack"]
        ),
        "customer-support": Contact(
            description="customer support (Slack)",
            channels=["custom-webhook/customer-support-slack"],
        ),
        "tickets": Contact(
            description="ticket queue (webhook)", channels=["custom-webhook/tickets"]
        ),
        "backlog": Contact(
            description="team backlog (webhook)", channels=["custom-webhook/backlog"]
        ),
    }


def _default_severities() -> dict[Severity, SeverityPolicy]:
    return {
        Severity.CRITICAL: SeverityPolicy(
            deadline_s=15 * 60,
            action="page on-call, notify executives",
            notify=["on-call", "leadership", TOPIC],
            ack_required=True,
            next_levels=["on-call-secondary", "team-lead"],
        ),
        Severity.HIGH: SeverityPolicy(
            deadline_s=3600,
            action="notify team lead, post the incident",
            notify=["team-lead", "incidents", TOPIC],
        ),
        Severity.MEDIUM: SeverityPolicy(
            deadline_s=4 * 3600, action="create a ticket", notify=["tickets"]
        ),
        Severity.LOW: SeverityPolicy(deadline_s=86_400, action="backlog", notify=["backlog"]),
    }


def _default_topics() -> dict[str, str]:
    return {
        "database": "db-team",
        "security": "security-team",
        "tls": "security-team",
        "payments": "payments-team",
        "platform": "incidents",
    }


class ApproverRule(BaseModel):
    """Who may approve an action of a runbook, and how many distinct approvers it needs.

    The most specific rule applies: runbook and action named, then the runbook with `*`,
    then `*` with the action, then `*`/`*`.
    """

    runbook: str = Field("*", description="The runbook's name, or `*`.")
    action: str = Field("*", description="The action's kind (e.g. `database-restart`), or `*`.")
    approvers: list[str] = Field(
        min_length=1, description="Contact names; a group contact stands for its members."
    )
    min_approvers: int = Field(1, ge=1, le=10, description="Distinct approvals needed.")
    self_declared: bool = Field(
        True,
        description="Whether a name typed into Prefect's Resume form counts (unverified).",
    )

    def specificity(self) -> int:
        return (self.runbook != "*") * 2 + (self.action != "*")

    def matches(self, runbook: str, action: str) -> bool:
        return self.runbook in {"*", runbook} and self.action in {"*", action}


def _default_approvers() -> list[ApproverRule]:
    return [
        ApproverRule(approvers=["on-call", "on-call-secondary", "team-lead"]),
        # A database restart drops every session: the database team decides, verified.
        ApproverRule(
            runbook="high-error-rate",
            action="database-restart",
            approvers=["db-team"],
            self_declared=False,
        ),
        # Retrying payments moves money: the payments team or the on-call, verified.
        ApproverRule(
            runbook="payment-failure",
            action="retry-payments",
            approvers=["payments-team", "on-call"],
            self_declared=False,
        ),
        # Secret rotation logs every user out: two distinct, verified approvers.
        ApproverRule(
            runbook="security-breach",
            action="rotate-secrets",
            approvers=["security-team", "leadership"],
            min_approvers=2,
            self_declared=False,
        ),
        # The breach's other changes (isolation, password reset, session revocation): the
        # security team or the on-call, verified (a name typed in the UI does not count).
        ApproverRule(
            runbook="security-breach",
            approvers=["security-team", "on-call"],
            self_declared=False,
        ),
    ]


class EscalationConfig(BaseModel):
    """Contacts, topics and the severity table; every name used must be defined."""

    contacts: dict[str, Contact] = Field(default_factory=_default_contacts)
    topics: dict[str, str] = Field(
        default_factory=_default_topics, description="Topic -> contact name."
    )
    default_topic_contact: str = Field(
        "incidents", description="The contact of a topic not in `topics`."
    )
    severities: dict[Severity, SeverityPolicy] = Field(default_factory=_default_severities)
    approval: ApprovalPolicy = Field(
        default_factory=ApprovalPolicy, description="Re-paging for a long approval wait."
    )
    approvers: list[ApproverRule] = Field(
        default_factory=_default_approvers,
        description="Who may approve which runbook's actions (the most specific rule wins).",
    )

    @model_validator(mode="after")
    def _names_resolve(self) -> Self:
        for name in self.contacts:
            if not _NAME.match(name):
                raise ValueError(f"contact name {name!r}: lowercase letters, digits and dashes")
        used = set(self.topics.values()) | {self.default_topic_contact}
        for policy in self.severities.values():
            used |= {n for n in policy.notify if n != TOPIC} | set(policy.next_levels)
        used |= set(self.approval.notify) | set(self.approval.next_levels)
        for contact in self.contacts.values():
            used |= set(contact.members)
        for rule in self.approvers:
            used |= set(rule.approvers)
        missing = sorted(used - set(self.contacts))
        if missing:
            raise ValueError(f"contacts used but not defined: {missing}")
        slack_owner: dict[str, str] = {}
        for name, contact in self.contacts.items():
            for user in contact.slack_user_ids:
                if slack_owner.setdefault(user, name) != name:
                    raise ValueError(f"Slack user {user} is both {slack_owner[user]} and {name}")
        for rule in self.approvers:
            found = len(self.individuals(rule.approvers))
            if rule.min_approvers > found:
                raise ValueError(
                    f"approvers rule {rule.runbook}/{rule.action} needs {rule.min_approvers}"
                    f" distinct approvers but names only {found}: it could never be met"
                )
        if not any(r.runbook == "*" and r.action == "*" for r in self.approvers):
            raise ValueError("approvers: a default rule (runbook `*`, action `*`) is needed")
        if set(self.severities) != set(Severity):
            raise ValueError("every severity (critical, high, medium, low) needs a policy")
        return self

    def individuals(self, names: list[str]) -> list[str]:
        """The approvers `names` stand for: a group is its members (recursively), in order."""
        out: list[str] = []
        seen: set[str] = set()

        def walk(name: str) -> None:
            if name in seen:
                return  # a group listing itself (or a cycle) adds nobody twice
            seen.add(name)
            members = self.contacts[name].members if name in self.contacts else []
            if not members:
                out.append(name)
            for member in members:
                walk(member)

        for name in names:
            walk(name)
        return out

    def rule_for(self, runbook: str, action: str) -> ApproverRule:
        """The approvers rule of one action of one runbook: the most specific that matches."""
        matching = [r for r in self.approvers if r.matches(runbook, action)]
        # Validated: a `*`/`*` rule exists. Ties: the later rule (an override file's) wins.
        return max(reversed(matching), key=ApproverRule.specificity)

    def slack_contact(self, user_id: str) -> str | None:
        """The contact a Slack user id belongs to, or None."""
        for name, contact in self.contacts.items():
            if user_id in contact.slack_user_ids:
                return name
        return None

    def topic_contact(self, topic: str) -> str:
        """The contact that owns `topic` (the default contact for an unknown topic)."""
        return self.topics.get(topic, self.default_topic_contact)

    def first_level(self, severity: Severity, topic: str) -> list[str]:
        """The contacts notified at once for `severity` and `topic`, in order, no repeats."""
        names = [
            self.topic_contact(topic) if n == TOPIC else n for n in self.severities[severity].notify
        ]
        return list(dict.fromkeys(names))


class EscalationSettings(BaseSettings):
    """Where the escalation config comes from, and per-severity deadline overrides."""

    model_config = SettingsConfigDict(env_prefix="RUNBOOKS_ESCALATION_")

    config_file: Path | None = Field(
        None, description="YAML file with contacts, topics, severities; unset = the defaults."
    )
    deadlines_s: dict[Severity, int] = Field(
        default_factory=dict, description="Override a severity's deadline (seconds)."
    )
    poll_interval_s: int = Field(
        5, ge=1, le=60, description="How often a wait for an acknowledgement checks for it."
    )
    approval_repage_s: int | None = Field(
        None, ge=1, description="Override the approval re-page interval (seconds)."
    )
    last_resort_block: str = Field(
        "custom-webhook/last-resort",
        pattern=r"^[a-z0-9-]+/[a-z0-9-]+$",
        description="The block paged when an escalate run itself fails or crashes.",
    )


def load_config(settings: EscalationSettings | None = None) -> EscalationConfig:
    """The escalation config: the file if set, else the defaults; deadline overrides applied."""
    settings = settings or EscalationSettings()
    if settings.config_file is None:
        config = EscalationConfig()
    else:
        try:
            raw = yaml.safe_load(settings.config_file.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise PermanentError(
                f"escalation config {settings.config_file}: cannot read it ({type(exc).__name__})"
            ) from None
        config = EscalationConfig.model_validate(raw or {})
    for severity, seconds in settings.deadlines_s.items():
        if seconds < 1:
            raise PermanentError(f"RUNBOOKS_ESCALATION_DEADLINES_S: {severity} must be >= 1")
        config.severities[severity].deadline_s = seconds
    if settings.approval_repage_s is not None:
        config.approval.repage_after_s = settings.approval_repage_s
    return config


#: Most urgent first: a higher rank is a lower index.
_RANK = {s: i for i, s in enumerate(Severity)}


def highest(*severities: Severity) -> Severity:
    """The most urgent of `severities` (an incident's severity is the highest raised)."""
    return min(severities, key=_RANK.__getitem__)
