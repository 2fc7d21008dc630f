"""What a runbook declares once, and the words every runbook uses for what it found and did.

A runbook module (`flows/<name>.py`) declares a `SPEC = RunbookSpec(...)`: its name, the
severity and topic it escalates with, how to build the target it locks while acting, the
parameter that makes a run plan-only. The catalog, the routes, escalation, post-incident,
audit-retention and the docs tables read the spec; nothing copies it.

Every runbook speaks one vocabulary:

- `Outcome`: what the run came to (nothing to do · planned · refused · skipped · acted ·
  failed), the same six words in every artifact, return value and test;
- `Check`: one row of evidence with a `Verdict` (pass · FAIL · unavailable · not configured);
- `Action`: one planned change as a typed object that can describe itself, be tried as a
  dry run, record what it replaces (the undo) and be applied; its `approval` policy says
  whether a human must agree: `never` (read-only), `unless-auto` (a route or parameter may
  say auto), `always` (database restart, certificate install, secret rotation).
"""

from __future__ import annotations

import importlib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Generic, Literal, ParamSpec, TypeVar

from prefect import Flow, flow
from pydantic import BaseModel, Field

# LockTarget re-exported: a spec's `lock` returns one (tasks/locks.py has the builders).
from tasks.locks import LOCK_TIMEOUT_S
from tasks.locks import LockTarget as LockTarget

#: What a run came to. `nothing to do`: the plan was empty (nobody was asked); `planned`: a
#: dry run; `refused`: a human, a timeout or a guard said no before anything changed;
#: `skipped`: re-measured under the lock, nothing approved still held (or the alert resolved);
#: `acted`: changed something and verified it; `failed`: acted (or could not) and the check
#: afterwards says it is not fixed: escalated.
Outcome = Literal["nothing to do", "planned", "refused", "skipped", "acted", "failed"]
OUTCOMES: tuple[Outcome, ...] = typing.get_args(Outcome)

#: Who must agree before an action runs.
ApprovalPolicy = Literal["never", "unless-auto", "always"]

#: How an alert route runs its runbook: `plan` (dry run), `approve` (plans, then pauses the
#: alert's own run for an approval in the UI), `auto` (acts as the runbook's policies allow).
RouteMode = Literal["plan", "approve", "auto"]

Severity = Literal["critical", "high", "medium", "low"]


class Verdict(StrEnum):
    """One check's verdict, the same words in every runbook's evidence table."""

    PASS = "pass"  # noqa: S105 - a verdict, not a password
    FAIL = "FAIL"
    UNAVAILABLE = "unavailable"
    NOT_CONFIGURED = "not configured"


class Check(BaseModel):
    """One row of evidence: what was measured, against what, what was seen, and the verdict."""

    item: str
    observed: str = Field(description="The figure seen (or why none).")
    verdict: Verdict
    threshold: str = Field("", description="What it is judged against.")
    detail: str = ""


class RequestParams(BaseModel):
    """Who asked and why: the fields every runbook's parameters have (read-only ones too)."""

    requested_by: str = Field(
        "", max_length=200, description="Who asked for this run (name, alert); for the audit."
    )
    reason: str = Field("", max_length=2000, description="Why; recorded in the audit artifact.")


class RunbookParams(RequestParams):
    """The fields every acting runbook's parameters start with (the top of the Run form)."""

    dry_run: bool = Field(
        True, description="Only check and plan; change nothing (the plan is the artifact)."
    )
    auto_approve: bool = Field(
        False,
        description="Act without waiting for an approval where the action allows it; a"
        " database restart, certificate install or secret rotation always waits for one.",
    )
    approval_timeout_s: int = Field(
        1200, ge=10, le=86_400, description="Without an answer by then, nothing is done."
    )


class ActionRecord(BaseModel):
    """What one applied action did, with the value it replaced (the undo)."""

    kind: str
    target: str
    before: str
    after: str
    message: str
    undo: str = ""


class Action(BaseModel):
    """One planned change, pinned by a read: describe, dry run, undo record, apply.

    Subclasses carry the plan their write needs (a pinned revision, the sessions to end)
    and implement `apply`; a write is idempotent or not retried (its task says which).
    """

    kind: str
    target: str
    summary: str
    approval: ApprovalPolicy = "unless-auto"
    #: False: listed in the plan (why not, in `summary`) but never approved or applied.
    possible: bool = True
    #: The server-side dry run's answer, filled on dry runs (`dry_run`).
    dry_run_result: str = ""

    def describe(self) -> str:
        """One line for the plan table, the approval form and the page."""
        return f"{self.kind} {self.target}: {self.summary}"

    def try_dry_run(self) -> str:
        """The write sent as a server-side dry run where the system offers one."""
        return ""

    def undo(self) -> str:
        """What the write replaces and how to put it back, recorded before it is made."""
        return ""

    def same_as(self, approved: Action) -> bool:
        """Whether this (re-planned) action is the one approved (same kind, same target)."""
        return (self.kind, self.target) == (approved.kind, approved.target)

    def apply(self) -> ActionRecord:
        """Make the change (a task run) and say what it did."""
        raise NotImplementedError(f"{type(self).__name__} cannot be applied")


P = TypeVar("P", bound=RequestParams)

__all__ = [
    "LockTarget"
]  # re-exported: a spec's `lock` builds one (tasks/locks.py has the builders)


@dataclass(frozen=True)
class RunbookSpec(Generic[P]):
    """A runbook's identity, declared once in its flow module as `SPEC`."""

    name: str
    title: str
    #: Escalated with this severity and topic when it cannot fix what it found; None = never.
    severity: Severity | None
    topic: str = "platform"
    #: The parameter field (dotted for a nested model) that makes a run plan-only; None =
    #: the runbook never changes anything itself.
    dry_run_field: str | None = "dry_run"
    #: The target an acting run locks (and alerts coalesce on); None = no target lock.
    lock: Callable[[P], LockTarget] | None = None
    lock_timeout_s: float = LOCK_TIMEOUT_S
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def deployment(self) -> str:
        """The deployment's full name, `<flow-name>/<flow-name>`, as routes and flows use it."""
        return f"{self.name}/{self.name}"

    def target_of(self, params: P) -> str | None:
        """The key an acting run with these params locks, or None."""
        return self.lock(params).key if self.lock else None


def value_at(params: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted path of nested parameter dicts; None where a level is missing."""
    node: Any = params
    for name in dotted.split("."):
        if not isinstance(node, Mapping) or name not in node:
            return None
        node = node[name]
    return node


def dry_run_of(spec: RunbookSpec[Any] | None, params: Mapping[str, Any]) -> bool | None:
    """Whether a run with these params plans only: True, False, or None when the runbook
    has no dry-run field or the run's parameters do not say."""
    dotted = spec.dry_run_field if spec is not None else "dry_run"
    value = value_at(params, dotted) if dotted else None
    return value if isinstance(value, bool) else None


_R = TypeVar("_R")
_A = ParamSpec("_A")


def runbook_flow(
    spec: RunbookSpec[Any], **options: Any
) -> Callable[[Callable[_A, _R]], Flow[_A, _R]]:
    """`@flow` named by the spec, with the spec attached (the catalog reads it from there)."""

    def decorate(fn: Callable[_A, _R]) -> Flow[_A, _R]:
        made: Flow[_A, _R] = flow(**{"name": spec.name, "log_prints": False, **options})(fn)
        setattr(made, SPEC_ATTR, spec)
        return made

    return decorate


#: The attribute of a runbook's Flow object that holds its spec.
SPEC_ATTR = "runbook_spec"


def spec_of_flow(made: Flow[..., Any]) -> RunbookSpec[Any]:
    """The spec a flow was declared with; a flow without one (a stand-in) gets a plain spec
    named after it: no escalation, no lock, `dry_run` as its dry-run field."""
    found = getattr(made, SPEC_ATTR, None)
    if isinstance(found, RunbookSpec):
        return found
    return RunbookSpec(name=made.name, title=made.name, severity=None)


def spec_of(name: str) -> RunbookSpec[Any] | None:
    """The spec of the runbook `name`, from its module `flows/<name with _>.py`; None when
    there is no such runbook (a stand-in, a deleted one): callers fall back to defaults."""
    try:
        module = importlib.import_module("flows." + name.replace("-", "_"))
    except ImportError:
        return None
    found = getattr(module, "SPEC", None)
    return found if isinstance(found, RunbookSpec) and found.name == name else None
