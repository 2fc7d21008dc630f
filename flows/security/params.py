"""The parameters of `security-breach`: which pods, which Secrets, which steps to offer."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from flows.spec import LockTarget, RunbookParams, RunbookSpec
from tasks.settings import KubernetesSettings

RUNBOOK = "security-breach"

#: A DNS-1123 subdomain (a Secret's name): lowercase alphanumerics, `-` and `.`.
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
#: One requirement of an equality- or set-based label selector (`app=x`, `tier in (a,b)`,
#: `!canary`, `env!=prod`); the API server parses it again, this catches typos early.
_KEY = r"([a-z0-9A-Z]([-a-z0-9A-Z_.]*[a-z0-9A-Z])?/)?[a-z0-9A-Z]([-a-z0-9A-Z_.]*[a-z0-9A-Z])?"
_VALUE = r"([a-z0-9A-Z]([-a-z0-9A-Z_.]*[a-z0-9A-Z])?)?"
_REQ = re.compile(
    rf"^\s*(!?{_KEY}|{_KEY}\s*(==|=|!=)\s*{_VALUE}|"
    rf"{_KEY}\s+(in|notin)\s+\(\s*{_VALUE}(\s*,\s*{_VALUE})*\s*\))\s*$"
)
_INCIDENT = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def _requirements(selector: str) -> list[str]:
    """The selector's requirements, split on commas outside parentheses."""
    parts, depth, current = [], 0, ""
    for char in selector:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def valid_selector(selector: str) -> str:
    """The selector, stripped, if every requirement parses; else ValueError (nothing sent)."""
    text = selector.strip()
    if not text:
        raise ValueError("a label selector is required (e.g. `app=akig-backend`)")
    if len(text) > 500:
        raise ValueError("label selector longer than 500 characters")
    bad = [r for r in _requirements(text) if not _REQ.match(r)]
    if bad:
        raise ValueError(f"not a label selector requirement: {bad[0].strip()[:80]!r}")
    return text


class SecurityBreachParams(RunbookParams):
    """The affected pods (label selector), the Secrets to rotate, and the steps to offer.

    Every changing step asks for its own approval; a dry run (the default) plans them all
    and changes nothing.
    """

    selector: str = Field(
        ...,
        description="Label selector of the affected pods in the platform namespace (evidence,"
        " isolation), e.g. `app=akig-backend,tier=api`.",
    )
    incident: str = Field(
        "",
        max_length=63,
        description="The incident id (lowercase letters, digits, dashes): names the evidence"
        " folder, the NetworkPolicy and the backups. Empty: this run's id.",
    )
    secrets: list[str] = Field(
        default_factory=list,
        max_length=50,
        description="Kubernetes Secrets (names, platform namespace) to rotate.",
    )
    isolate: bool = Field(True, description="Offer step 2: the deny-all NetworkPolicy.")
    cordon: bool = Field(False, description="With isolation, also cordon the pods' nodes.")
    rotate: bool = Field(True, description="Offer step 5a: rotate the named Secrets.")
    reset_passwords: bool = Field(True, description="Offer step 5b: force a password reset.")
    revoke_sessions: bool = Field(True, description="Offer step 5c: revoke the login sessions.")
    notify: bool = Field(
        True,
        description="Step 4: page critical (topic security) and the"
        " runbook's contacts (not on a dry run: it names them).",
    )
    notify_contacts: list[str] = Field(
        default_factory=lambda: ["security-lead", "legal", "pr", "customer-support"],
        max_length=20,
        description="The runbook's contacts (escalation config names), told with the run's link.",
    )
    ask_form: bool = Field(
        True, description="Step 6: pause for the Communicate / Improve form (not on a dry run)."
    )
    form_timeout_s: int = Field(
        3600, ge=10, le=86_400, description="How long the form waits; unanswered items stay open."
    )

    @field_validator("selector")
    @classmethod
    def _selector(cls, value: str) -> str:
        return valid_selector(value)

    @field_validator("incident")
    @classmethod
    def _incident(cls, value: str) -> str:
        if value and not _INCIDENT.match(value):
            raise ValueError(
                "incident: lowercase letters, digits and dashes, at most 63, no dash at the ends"
            )
        return value

    @field_validator("secrets")
    @classmethod
    def _secret_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if len(name) > 253 or not _DNS1123.match(name):
                raise ValueError(f"secret name {name[:60]!r} is not a DNS-1123 name")
        if len(set(value)) != len(value):
            raise ValueError("secret names repeat")
        return value

    @field_validator("notify_contacts")
    @classmethod
    def _contacts(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.match(r"^[a-z0-9][a-z0-9-]{0,62}$", name):
                raise ValueError(f"contact name {name[:60]!r}: lowercase letters, digits, dashes")
        return value


TOPIC = "security"


def target_of(params: SecurityBreachParams) -> str:
    """What the runbook changes: the platform namespace, `security:<namespace>`."""
    return f"security:{KubernetesSettings().namespace}"


SPEC: RunbookSpec[SecurityBreachParams] = RunbookSpec(
    name=RUNBOOK,
    title="Security breach",
    severity="critical",
    topic=TOPIC,
    lock=lambda p: LockTarget(target_of(p)),
    lock_timeout_s=600.0,
)
