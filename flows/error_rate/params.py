"""The parameters of `high-error-rate`: the thresholds of its classification and its caps."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from flows.spec import RunbookParams

RUNBOOK = "high-error-rate"
DNS_1123 = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
WINDOW = r"^[1-9][0-9]{0,3}[smh]$"

Scenario = Literal["A", "B", "C", "D"]
SCENARIO_NAMES: dict[str, str] = {
    "A": "database",
    "B": "memory (OOMKilled / restarts)",
    "C": "cache (Redis)",
    "D": "code (bad rollout)",
}


class HighErrorRateParams(RunbookParams):
    """Thresholds of the classification, and what the run may do (`auto_approve` covers B, C
    and D; a database restart, A, always waits for an approval)."""

    window: str = Field("1m", pattern=WINDOW, description="Prometheus window of the 5xx ratio.")
    error_rate_max: float = Field(
        0.05, gt=0, lt=1, description="A 5xx ratio above this is a problem (0..1)."
    )
    rollout_window_minutes: float = Field(
        30, ge=1, le=1440, description="D: the 5xx began within this long after the rollout."
    )
    restart_threshold: int = Field(
        3, ge=1, le=1000, description="B: this many container restarts in total is a problem."
    )
    oom_window_minutes: float = Field(
        60, ge=1, le=10_080, description="B: an OOMKill counts when it happened this recently."
    )
    pool_usage_max_percent: float = Field(
        80, gt=0, le=100, description="A: PostgreSQL connection usage at or above this (%)."
    )
    redis_memory_max: float = Field(
        0.9, gt=0, le=1, description="C: Redis used/maxmemory at or above this (0..1)."
    )
    hit_rate_min: float = Field(
        0.5, ge=0, le=1, description="C: a recent hit rate below this is a collapse (0..1)."
    )
    redis_window_s: float = Field(
        1.0, ge=0, le=30, description="Redis hit rate and evictions over this recent window."
    )
    log_lines: int = Field(200, ge=10, le=5000, description="Log lines read per container.")
    database_statefulset: str = Field(
        "akig-postgres", pattern=DNS_1123, description="A: the database StatefulSet."
    )
    verify_window: str = Field(
        "30s", pattern=WINDOW, description="Prometheus window of the 5xx ratio when verifying."
    )
    verify_timeout_s: float = Field(
        180, ge=5, le=3600, description="The 5xx ratio must be below the threshold by then."
    )
    rollout_timeout_s: float = Field(
        300, ge=5, le=3600, description="How long to wait for a rollout to finish."
    )


def pct(value: float | None) -> str:
    """A ratio as the report says it."""
    return "no data" if value is None else f"{value:.1%}"
