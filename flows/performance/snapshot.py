"""What one performance report found, as exported to JSON: the next report's "before".

Each of the runbook's three questions holds its answer or why there is none (`*_unavailable`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from tasks.performance import EndpointStats, HealthTimings, ParsedLogs, RequestTiming, SlowUsers
from tasks.postgres import TopStatements

#: Bumped when a field changes meaning; an older file is still read where it parses.
VERSION = 1


class PerformanceSnapshot(BaseModel):
    """The report's figures: health phases, statements, endpoints, the slowest requests, users."""

    version: int = VERSION
    taken_at: datetime
    health: HealthTimings | None = None
    health_unavailable: str | None = None
    statements: TopStatements | None = None
    statements_unavailable: str | None = None
    endpoints: list[EndpointStats] = Field(default_factory=list)
    slowest: list[RequestTiming] = Field(default_factory=list)
    logs: ParsedLogs | None = Field(None, description="Which pods were read (requests dropped).")
    logs_unavailable: str | None = None
    users: SlowUsers | None = None
    users_unavailable: str | None = None


def stamp_of(at: datetime) -> str:
    """A file stem that sorts by time: `20261207T013512.123456Z`."""
    return at.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def previous_snapshot(report_dir: Path, before: str) -> tuple[Path, PerformanceSnapshot] | None:
    """The newest readable `<stamp>.json` in `report_dir` whose stamp sorts before `before`."""
    if not report_dir.is_dir():
        return None
    for path in sorted(report_dir.glob("*.json"), reverse=True):
        if path.stem >= before:
            continue
        try:
            return path, PerformanceSnapshot.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, ValidationError):
            continue  # a foreign or torn file: the one before it still compares
    return None
