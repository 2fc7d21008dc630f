"""The checklist of `security-breach`: each step's status with who and when, the human
Communicate / Improve form, and the WAF item (an instruction, never a fake call).

The checklist is the run's artifact `security-breach-checklist`, published on every path:
one row per step (done, skipped, refused, failed; `planned` on a dry run, `open` for a
human item nobody answered), who did or decided it, and when (UTC).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from prefect.input import RunInput
from pydantic import BaseModel, Field

from flows.common import table

ARTIFACT_KEY = "security-breach-checklist"
#: Characters of a checklist row's detail shown in the artifact.
DETAIL_LIMIT = 2000

Status = Literal["done", "skipped", "refused", "failed", "planned", "open"]


class StepRecord(BaseModel):
    """One checklist row: what, how it ended, who did or decided it, when, and why."""

    number: str
    step: str
    status: Status
    who: str = "-"
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    detail: str = ""


class Checklist(BaseModel):
    """The rows so far, in the runbook's order."""

    incident: str
    rows: list[StepRecord] = Field(default_factory=list)

    def add(
        self, number: str, step: str, status: Status, who: str = "-", detail: str = ""
    ) -> StepRecord:
        row = StepRecord(number=number, step=step, status=status, who=who, detail=detail)
        self.rows.append(row)
        return row

    def markdown(self) -> str:
        """The checklist table: one row per step and human item."""
        rows = [
            [
                r.number,
                r.step,
                r.status.upper() if r.status in {"failed", "refused"} else r.status,
                r.who,
                f"{r.at:%Y-%m-%d %H:%M:%S}",
                r.detail,
            ]
            for r in self.rows
        ]
        # The detail ends with the approval and its reasons: kept whole (a 200-character cell
        # would cut off why a change was approved or refused).
        return table(
            ["#", "step", "status", "who", "when (UTC)", "detail"], rows, cell_limit=DETAIL_LIMIT
        )

    def summary(self) -> str:
        """The artifact's description: how many steps ended how."""
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r.status] = counts.get(r.status, 0) + 1
        return f"security-breach {self.incident}: " + ", ".join(
            f"{n} {status}" for status, n in counts.items()
        )


#: The human items of step 6 (the on-call runbook's COMMUNICATE and IMPROVE): field prefix,
#: checklist text.
HUMAN_ITEMS: dict[str, str] = {
    "users_informed": "Communicate: affected users told what happened and what to do"
    " (wording agreed with legal)",
    "public_statement": "Communicate: public statement / status page (PR / communications)",
    "support_briefed": "Communicate: customer support briefed (what to tell customers)",
    "root_cause": "Improve: root cause found (forensics on the evidence bundle)",
    "review_scheduled": "Improve: post-incident review scheduled, owners named",
    "controls_improved": "Improve: the gap closed (control, monitoring or alert added)",
}


class HumanChecklist(RunInput):
    """Step 6: tick each item done and say how; your name is recorded with the time."""

    by: str = Field(..., min_length=1, max_length=200, description="Your name, for the audit.")
    users_informed: bool = False
    users_informed_note: str = Field("", max_length=1000)
    public_statement: bool = False
    public_statement_note: str = Field("", max_length=1000)
    support_briefed: bool = False
    support_briefed_note: str = Field("", max_length=1000)
    root_cause: bool = False
    root_cause_note: str = Field("", max_length=1000)
    review_scheduled: bool = False
    review_scheduled_note: str = Field("", max_length=1000)
    controls_improved: bool = False
    controls_improved_note: str = Field("", max_length=1000)

    def answers(self) -> list[tuple[str, bool, str]]:
        """(item text, done, note) per item, in order."""
        return [
            (text, bool(getattr(self, key)), str(getattr(self, f"{key}_note")))
            for key, text in HUMAN_ITEMS.items()
        ]


def waf_instruction(namespace: str, addresses: list[str]) -> str:
    """The WAF item: exactly what to do by hand (this runbook cannot reach the WAF)."""
    found = ", ".join(addresses[:20]) if addresses else "none flagged by the assessment"
    return (
        "By hand, in the WAF's own console or rules repository (this runbook has no access to"
        " it and makes no call): 1) add a block rule for the source addresses the assessment"
        f" flagged ({found}); 2) add a rate limit on the login endpoint (failed-login bursts);"
        " 3) block the request paths seen in the attack in the evidence bundle's logs;"
        f" 4) note the rule ids here and in the post-incident record (namespace {namespace})."
    )
