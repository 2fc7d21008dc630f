"""system-outage's decisions that need no system: when a restart can help, what the DR rows
say, the newest backup in a tool's listing, and the checklist's commands."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from flows.common import Unavailable
from flows.outage.dr import Readiness, _backup_row, _redis_row, _wal_row, checklist_md
from flows.outage.recovery import NO_RESTART, not_planned, restart_helps
from flows.spec import Verdict
from tasks.cascade.models import LAYERS, LayerName, LayerResult, LayerStatus
from tasks.postgres.backups import BaseBackups, newest_stamp
from tasks.postgres.storage import ArchiverState, ArchiverStatus
from tasks.redis import RedisPersistence
from tasks.settings import KubernetesSettings, OutageSettings, PostgresSettings, RedisSettings

REPO = Path(__file__).resolve().parents[2]


def layers(**status: LayerStatus) -> list[LayerResult]:
    return [
        LayerResult(layer=name, status=status.get(name, "ok"), summary="", seconds=0.01)
        for name in LAYERS
    ]


def test_a_restart_helps_only_when_the_platforms_own_pods_are_the_cause() -> None:
    assert restart_helps(layers(backend="broken"), "backend")
    assert restart_helps(layers(endpoint="broken"), "endpoint")
    # The endpoint fails and so does the database below it: restarting cannot help.
    assert not restart_helps(layers(endpoint="broken", database="broken"), "endpoint")
    # An unknown layer below the endpoint is not "ok": no restart on a guess.
    assert not restart_helps(layers(endpoint="broken", ingress="unavailable"), "endpoint")
    causes: list[LayerName] = ["dns", "ingress", "kubernetes", "database", "dependencies"]
    for cause in causes:
        broken: dict[str, LayerStatus] = {cause: "broken"}
        assert not restart_helps(layers(**broken), cause), cause
    assert not restart_helps(layers(), None)
    # The backend crash-loops because the database is down: a restart would only storm it.
    assert not restart_helps(layers(backend="broken", database="broken"), "backend")


@pytest.mark.parametrize("cause", ["dns", "kubernetes", "database", "dependencies"])
def test_no_restart_is_an_impossible_action_with_the_reason(cause: LayerName) -> None:
    broken: dict[str, LayerStatus] = {cause: "broken"}
    action = not_planned(layers(**broken), cause, KubernetesSettings(namespace="prod"))
    assert action.possible is False
    assert action.target == "prod/akig-backend+akig-frontend"
    assert action.summary.startswith("not planned: the likely cause is")
    assert NO_RESTART[cause] in action.summary
    both = not_planned(layers(backend="broken", database="broken"), "backend", KubernetesSettings())
    assert "Database is broken too" in both.summary


def test_newest_stamp_reads_the_backup_tools_listings() -> None:
    walg = (
        "name modified wal_segment_backup_start\n"
        "base_000000010000000000000002 2026-12-05T01:00:00Z 000000010000000000000002\n"
        "base_000000010000000000000009 2026-12-06T01:00:03Z 000000010000000000000009\n"
    )
    assert newest_stamp(walg) == datetime(2026, 12, 6, 1, 0, 3, tzinfo=UTC)
    pgbackrest = (
        "stanza: main\n    full backup: 20261206-020000F\n"
        "        timestamp start/stop: 2026-12-06 02:00:00+01 / 2026-12-06 02:10:00+01\n"
    )
    assert newest_stamp(pgbackrest) == datetime(2026, 12, 6, 2, 0, tzinfo=UTC)
    assert newest_stamp("no backups") is None


def _archiver(age: float | None, status: ArchiverStatus = "ok") -> ArchiverState:
    return ArchiverState(
        target="db:5432/akig",
        status=status,
        detail="last segment archived",
        archive_mode="on",
        archived_count=3,
        last_archived_wal="000000010000000000000007",
        last_archived_time=datetime(2026, 12, 7, 1, 0, tzinfo=UTC) if age is not None else None,
        last_archived_age_s=age,
        failed_count=0,
        last_failed_wal=None,
        last_failed_time=None,
        stats_reset=None,
    )


def _redis(aof: bool = True, save: str = "ok") -> RedisPersistence:
    return RedisPersistence(
        target="cache:6379/0",
        aof_enabled=aof,
        aof_rewrite_in_progress=False,
        aof_last_rewrite_time_sec=0 if aof else None,
        aof_last_bgrewrite_status="ok",
        aof_last_write_status="ok",
        rdb_last_save_time=1,
        rdb_last_save_age_s=120.0,
        rdb_last_bgsave_status=save,
        rdb_changes_since_last_save=5,
    )


def test_dr_rows_judge_age_status_and_persistence() -> None:
    assert _wal_row(_archiver(60), 900).verdict == Verdict.PASS
    stale = _wal_row(_archiver(3600), 900)
    assert stale.verdict == Verdict.FAIL and "0:15:00" in stale.threshold
    assert _wal_row(_archiver(None, "off"), 900).verdict == Verdict.FAIL
    assert _wal_row(Unavailable("down"), 900).verdict == Verdict.UNAVAILABLE
    assert _backup_row(None, 3600).verdict == Verdict.NOT_CONFIGURED
    old = BaseBackups(
        command="wal-g", lines=2, newest=datetime(2026, 1, 1, tzinfo=UTC), newest_age_s=9e6
    )
    assert _backup_row(old, 3600).verdict == Verdict.FAIL
    fresh = old.model_copy(update={"newest_age_s": 60.0})
    assert _backup_row(fresh, 3600).verdict == Verdict.PASS
    assert _redis_row(_redis()).verdict == Verdict.PASS
    off = _redis_row(_redis(aof=False))
    assert off.verdict == Verdict.FAIL and "AOF is off" in off.detail
    assert "last RDB save: err" in _redis_row(_redis(save="err")).detail


def test_checklist_has_five_steps_with_this_platforms_commands_and_pitr_first() -> None:
    found = Readiness(
        archiver=_archiver(60),
        backups=None,
        redis=_redis(aof=False),
        checks=[_wal_row(_archiver(60), 900), _backup_row(None, 3600), _redis_row(_redis(False))],
    )
    outage = OutageSettings(
        endpoint_url="https://akig.example.com/api/health", backup_list_command="wal-g backup-list"
    )
    text = checklist_md(
        found,
        outage,
        KubernetesSettings(namespace="prod"),
        PostgresSettings(dsn="postgresql://postgres:pw-secret@db.internal:5433/akig"),
        RedisSettings(url="redis://:redis-secret@cache.internal:6380/0"),
    )
    steps = [line for line in text.splitlines() if line.startswith("### ")]
    assert len(steps) == 5 and "point-in-time recovery" in steps[0]
    assert "kubectl -n prod scale deployment/akig-backend deployment/akig-frontend" in text
    assert "wal-g backup-fetch $PGDATA LATEST" in text
    assert "redis-cli -h cache.internal -p 6380 INFO persistence" in text
    assert "curl -fsS" in text and "https://akig.example.com/api/health" in text
    assert "pg_amcheck -h db.internal -p 5433" in text
    assert "cannot meet an RPO of 0" in text
    assert "AOF off" in text  # the figure filled in
    assert "pw-secret" not in text and "redis-secret" not in text
    assert "last archived segment \\(2026-12-07 01:00:00 UTC\\)" in text
    off = Readiness(
        archiver=_archiver(None, "off"),
        backups=None,
        redis=_redis(),
        checks=[_wal_row(_archiver(None, "off"), 900), _backup_row(None, 1), _redis_row(_redis())],
    )
    text = checklist_md(off, outage, KubernetesSettings(), PostgresSettings(), RedisSettings())
    assert "point-in-time recovery is impossible" in text


def test_the_alert_route_runs_system_outage_for_approval_never_unattended() -> None:
    from deployments.catalog import RUNBOOKS, by_name
    from deployments.routing import build_params, load_routing

    table = load_routing(REPO / "deployments" / "routing.yaml", RUNBOOKS)
    labels = {"alertname": "AkigUnreachable", "instance": "https://akig.example.com/api/health"}
    route = table.route_for(labels)
    assert route is not None and (route.runbook, route.mode) == ("system-outage", "approve")
    params = build_params(route, by_name(RUNBOOKS)["system-outage"], labels)
    assert params["dry_run"] is False and params["auto_approve"] is False
