"""The approval request one recipient receives: the plan, and their own signed links.

Webhook channels get `text()` (links in plain text); a channel that can show buttons (the
Slack app block) gets the whole message through its `notify_approval` method. The tokens
are this recipient's only: never logged, never in an artifact.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, Field, SecretStr


class ApprovalMessage(BaseModel):
    """One recipient's approval request."""

    run: str
    run_name: str = ""
    runbook: str
    recipient: str
    actions: list[str]
    needs: str = Field(description="Who must approve, one line per rule.")
    run_url: str = ""
    approve_url: SecretStr
    refuse_url: SecretStr
    approve_token: SecretStr
    refuse_token: SecretStr
    expires_at: float

    def subject(self) -> str:
        return f"[APPROVAL] {self.runbook}: {len(self.actions)} action(s) wait for you"[:250]

    def text(self) -> str:
        """The plain-text page: plan, who must approve, the two links, expiry."""
        until = datetime.fromtimestamp(self.expires_at, UTC).strftime("%Y-%m-%d %H:%M UTC")
        lines = [
            f"{self.runbook} run {self.run_name or self.run} asks {self.recipient} to approve:",
            *[f"- {a}" for a in self.actions],
            f"Needs: {self.needs}",
            f"Approve: {self.approve_url.get_secret_value()}",
            f"Refuse: {self.refuse_url.get_secret_value()}",
            f"These links are yours alone, work once, and expire at {until}.",
        ]
        if self.run_url:
            lines.append(f"The run: {self.run_url}")
        return "\n".join(lines)
