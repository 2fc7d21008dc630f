"""Report text the runbooks share: tasks return data, the flows word it for the on-call."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the cert runbooks use this module too: no PostgreSQL driver for them
    from tasks.postgres import TerminationGuard


def guard_summary(guard: TerminationGuard) -> str:
    """The guard in words, for the plan artifact and the approval form."""
    parts = [
        "client backends only",
        "never this session",
        "never superusers",
        f"states {', '.join(guard.states)}",
        f"idle > {guard.idle_minutes:g} min",
        f"at most {guard.max_sessions}",
    ]
    if guard.database:
        parts.append(f"database = {guard.database}")
    if guard.username:
        parts.append(f"role = {guard.username}")
    if guard.protected_roles:
        parts.append(f"also protected: {', '.join(guard.protected_roles)}")
    return "; ".join(parts)


def short_days(days: float) -> str:
    """Days as a table cell: two decimals under two days, else one."""
    return f"{days:.2f}" if abs(days) < 2 else f"{days:.1f}"


def age_text(seconds: float | None) -> str:
    """A duration as the on-call reads it (`3m05s`)."""
    if seconds is None:
        return "-"
    return str(timedelta(seconds=int(seconds)))
