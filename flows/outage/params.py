"""The parameters of `system-outage`: what a run may wait for, and the DR readiness limits."""

from __future__ import annotations

from pydantic import Field

from flows.spec import RunbookParams

RUNBOOK = "system-outage"


class SystemOutageParams(RunbookParams):
    """How long a run waits for each rollout and for the endpoint afterwards, how many events
    it shows, and the ages past which the disaster-recovery figures read as stale."""

    concurrent: bool = Field(
        True, description="Check the layers at once (the verdict still reads in order)."
    )
    events_limit: int = Field(
        30, ge=1, le=500, description="Cluster events shown, newest last (all namespaces)."
    )
    rollout_timeout_s: float = Field(
        300, ge=5, le=3600, description="How long to wait for each rollout to finish."
    )
    verify_timeout_s: float = Field(
        60, ge=1, le=1800, description="The endpoint must answer 2xx/3xx within this long."
    )
    wal_archive_max_age_s: float = Field(
        900, gt=0, le=7 * 86_400, description="DR: the last archived WAL segment older: stale."
    )
    base_backup_max_age_s: float = Field(
        26 * 3600, gt=0, le=31 * 86_400, description="DR: the newest base backup older: stale."
    )
