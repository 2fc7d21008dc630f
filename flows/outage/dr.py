"""Disaster-recovery readiness of `system-outage`: read only, it restores nothing.

Three figures, each a row (a source that fails is "unavailable", never a crash): the age of
the last archived WAL segment (`pg_stat_archiver`), the newest base backup's age (the
backup-listing command from settings, when set), and Redis persistence (`INFO
persistence`: AOF on, its last rewrite and write, the last RDB save). Then the on-call
runbook's five DR steps as a checklist artifact, each with the command for this platform,
filled in with those figures.

Why the checklist leads with point-in-time recovery: "restore from the latest backup" loses
every write since that backup was taken (an RPO of the backup's age, hours), never 0. Only
replaying the archived WAL after the base backup reaches the last archived segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from prefect.artifacts import create_markdown_artifact

from flows.common import Unavailable, collect, md_escape
from flows.outage.params import SystemOutageParams
from flows.spec import Check, Verdict
from tasks.clients import pg_target
from tasks.postgres.backups import BaseBackups, base_backups
from tasks.postgres.storage import ArchiverState, archiver_status
from tasks.redis import RedisPersistence, redis_persistence, redis_target
from tasks.settings import KubernetesSettings, OutageSettings, PostgresSettings, RedisSettings

ARTIFACT_KEY = "system-outage-dr-checklist"


def age(seconds: float | None) -> str:
    """An age as the report says it (`2:05:00`)."""
    return "-" if seconds is None else str(timedelta(seconds=int(seconds)))


@dataclass
class Readiness:
    """The DR figures (or why each is missing) and their rows."""

    archiver: ArchiverState | Unavailable
    backups: BaseBackups | Unavailable | None  # None: no backup-list command configured
    redis: RedisPersistence | Unavailable
    checks: list[Check]


def _wal_row(found: ArchiverState | Unavailable, max_age_s: float) -> Check:
    item, threshold = "WAL archive (pg_stat_archiver)", f"last segment <= {age(max_age_s)} old"
    if isinstance(found, Unavailable):
        return Check(item=item, observed="-", verdict=Verdict.UNAVAILABLE, detail=found.reason)
    observed = (
        f"{found.last_archived_wal or 'none'} archived {age(found.last_archived_age_s)} ago"
        if found.last_archived_time
        else f"archive_mode {found.archive_mode}, nothing archived"
    )
    fresh = found.status == "ok" and (found.last_archived_age_s or 0) <= max_age_s
    return Check(
        item=item,
        threshold=threshold,
        observed=observed,
        verdict=Verdict.PASS if fresh else Verdict.FAIL,
        detail=found.detail
        + (
            "; point-in-time recovery loses what is not archived yet"
            if found.status in ("stale", "failing")
            else ""
        ),
    )


def _backup_row(found: BaseBackups | Unavailable | None, max_age_s: float) -> Check:
    item, threshold = "Base backup (newest)", f"<= {age(max_age_s)} old"
    if found is None:
        return Check(
            item=item,
            threshold=threshold,
            observed="-",
            verdict=Verdict.NOT_CONFIGURED,
            detail="set RUNBOOKS_OUTAGE_BACKUP_LIST_COMMAND (e.g. `pgbackrest info`)",
        )
    if isinstance(found, Unavailable):
        return Check(item=item, observed="-", verdict=Verdict.UNAVAILABLE, detail=found.reason)
    if found.newest is None:
        return Check(
            item=item,
            threshold=threshold,
            observed=f"{found.lines} line(s), no time stamp",
            verdict=Verdict.FAIL,
            detail=f"{found.command} listed no backup with a date",
        )
    ok = (found.newest_age_s or 0) <= max_age_s
    return Check(
        item=item,
        threshold=threshold,
        observed=f"{found.newest:%Y-%m-%d %H:%M:%S} UTC, {age(found.newest_age_s)} ago",
        verdict=Verdict.PASS if ok else Verdict.FAIL,
        detail=f"from {found.command}",
    )


def _redis_row(found: RedisPersistence | Unavailable) -> Check:
    item, threshold = "Redis persistence (INFO persistence)", "AOF on, last rewrite/write/save ok"
    if isinstance(found, Unavailable):
        return Check(item=item, observed="-", verdict=Verdict.UNAVAILABLE, detail=found.reason)
    problems = []
    if not found.aof_enabled:
        problems.append("AOF is off: there is no AOF to restore from, only the last RDB save")
    for name, status in (
        ("last AOF rewrite", found.aof_last_bgrewrite_status),
        ("last AOF write", found.aof_last_write_status),
        ("last RDB save", found.rdb_last_bgsave_status),
    ):
        if status not in (None, "ok"):
            problems.append(f"{name}: {status}")
    rewrite = (
        f"{found.aof_last_rewrite_time_sec} s"
        if found.aof_last_rewrite_time_sec is not None
        else "never"
    )
    observed = (
        f"AOF {'on' if found.aof_enabled else 'off'}; last rewrite {rewrite} "
        f"({found.aof_last_bgrewrite_status}); last save {age(found.rdb_last_save_age_s)} ago "
        f"({found.rdb_last_bgsave_status}), {found.rdb_changes_since_last_save} change(s) since"
    )
    return Check(
        item=item,
        threshold=threshold,
        observed=observed,
        verdict=Verdict.FAIL if problems else Verdict.PASS,
        detail="; ".join(problems) or found.target,
    )


def readiness(params: SystemOutageParams, outage: OutageSettings) -> Readiness:
    """The three DR figures, read at once; each source that fails is one row, not a crash."""
    # No retries: in an outage a source that does not answer is a row, not a wait.
    wal = archiver_status.with_options(retries=0).submit(params.wal_archive_max_age_s)
    redis = redis_persistence.with_options(retries=0).submit()
    listing = (
        base_backups.submit(outage.backup_list_command) if outage.backup_list_command else None
    )
    archiver = collect(wal)
    backups: BaseBackups | Unavailable | None = None
    if listing is not None:
        backups = collect(listing)
    persistence = collect(redis)
    checks = [
        _wal_row(archiver, params.wal_archive_max_age_s),
        _backup_row(backups, params.base_backup_max_age_s),
        _redis_row(persistence),
    ]
    return Readiness(archiver=archiver, backups=backups, redis=persistence, checks=checks)


def _restore_commands(tool: str | None, pg: str) -> list[str]:
    """Step 1's commands for the backup tool the listing command names."""
    host, _, rest = pg.partition(":")
    port = rest.split("/", 1)[0]
    if tool == "pgbackrest":
        return [
            "pgbackrest --stanza=<stanza> info",
            "pgbackrest --stanza=<stanza> --delta --type=time"
            ' --target="<last good time, UTC>" --target-action=promote restore',
        ]
    if tool == "wal-g":
        return [
            "wal-g backup-fetch $PGDATA LATEST",
            "echo \"restore_command = 'wal-g wal-fetch %f %p'\" >> $PGDATA/postgresql.auto.conf",
            "echo \"recovery_target_time = '<last good time, UTC>'\" >> "
            "$PGDATA/postgresql.auto.conf",
            "touch $PGDATA/recovery.signal && pg_ctl -D $PGDATA start",
        ]
    return [
        "# unpack the newest base backup into an empty $PGDATA, then:",
        "echo \"restore_command = 'cp <wal archive>/%f %p'\" >> $PGDATA/postgresql.auto.conf",
        "echo \"recovery_target_time = '<last good time, UTC>'\" >> $PGDATA/postgresql.auto.conf",
        "touch $PGDATA/recovery.signal && pg_ctl -D $PGDATA start",
        f"psql -h {host} -p {port} -U postgres -c 'SELECT pg_is_in_recovery(),"
        " pg_last_wal_replay_lsn(), pg_last_xact_replay_timestamp()'",
    ]


def checklist_md(
    found: Readiness,
    outage: OutageSettings,
    kube: KubernetesSettings,
    pg: PostgresSettings,
    redis: RedisSettings,
) -> str:
    """The five DR steps of the on-call runbook, each with this platform's commands and the
    figures read just now."""
    ns, backend, frontend = kube.namespace, kube.backend_deployment, kube.frontend_deployment
    pg_name = pg_target(pg)
    host, _, rest = pg_name.partition(":")
    port, _, db = rest.partition("/")
    rhost, _, rrest = redis_target(redis).partition(":")
    rport = rrest.split("/", 1)[0]
    tool = (
        outage.backup_list_command.split()[0].rsplit("/", 1)[-1]
        if outage.backup_list_command
        else None
    )
    wal, base, aof = (
        c.observed if c.observed != "-" else f"{c.verdict.value} ({c.detail})" for c in found.checks
    )
    archiver = found.archiver
    if isinstance(archiver, Unavailable):
        reach = "replaying the archived WAL reaches the last archived segment (unknown now)"
    elif archiver.archive_mode == "off" or archiver.last_archived_time is None:
        reach = (
            "no WAL is archived: point-in-time recovery is impossible, the base backup is all"
            " there is (turn archive_mode on)"
        )
    else:
        at = archiver.last_archived_time.strftime("%Y-%m-%d %H:%M:%S UTC")
        reach = f"replaying the archived WAL reaches the last archived segment ({at})"
    url = outage.endpoint_url or "<RUNBOOKS_OUTAGE_ENDPOINT_URL>/api/health"

    def cmds(lines: list[str]) -> str:
        return "```bash\n" + "\n".join(lines) + "\n```"

    steps = [
        (
            "Restore PostgreSQL: point-in-time recovery, not just the latest backup",
            f"WAL archive: {md_escape(wal)}. Base backup: {md_escape(base)}. Restoring the"
            f" base backup alone loses every write since it was taken; {md_escape(reach)}."
            " Stop the writers first.",
            [
                f"kubectl -n {ns} scale deployment/{backend} deployment/{frontend} --replicas=0",
                *_restore_commands(tool, pg_name),
            ],
        ),
        (
            "Restore Redis from its AOF",
            f"{md_escape(aof)}. With AOF off, only the last RDB snapshot (dump.rdb) exists.",
            [
                f"redis-cli -h {rhost} -p {rport} CONFIG GET appendonly",
                f"redis-cli -h {rhost} -p {rport} INFO persistence",
                "redis-check-aof --fix <dir>/appendonlydir/appendonly.aof.manifest",
                "# start redis-server with the same dir and `appendonly yes`",
            ],
        ),
        (
            "Redeploy the application",
            "Back to the replicas it had, backend first; wait for each rollout.",
            [
                f"kubectl -n {ns} scale deployment/{backend} --replicas=<replicas before>",
                f"kubectl -n {ns} rollout status deployment/{backend} --timeout=300s",
                f"kubectl -n {ns} scale deployment/{frontend} --replicas=<replicas before>",
                f"kubectl -n {ns} rollout status deployment/{frontend} --timeout=300s",
            ],
        ),
        (
            "Run the health checks",
            "From outside, through the path a user takes; then this runbook's cascade again.",
            [
                f"curl -fsS -w '%{{http_code}} %{{time_total}}s\\n' {url}",
                "prefect deployment run system-outage/system-outage",
            ],
        ),
        (
            "Verify data integrity",
            "Where the restored data ends, and that it reads back whole.",
            [
                f"psql -h {host} -p {port} -U postgres -d {db} -c 'SELECT"
                " pg_last_xact_replay_timestamp(), now()'",
                f"pg_amcheck -h {host} -p {port} -U postgres --all --heapallindexed",
                # A command for a human to run, not a query this runbook sends.
                f"psql -h {host} -p {port} -U postgres -d {db} -c 'SELECT max(created_at)"  # noqa: S608
                " FROM audit_logs'",
                f"redis-cli -h {rhost} -p {rport} DBSIZE",
            ],
        ),
    ]
    parts = [
        "Read only: this runbook restores nothing. RPO: restoring the latest base backup"
        " alone cannot meet an RPO of 0; point-in-time recovery from the archived WAL loses"
        " only what was not archived yet.",
    ]
    for number, (title, why, lines) in enumerate(steps, start=1):
        parts.append(f"### {number}. [ ] {title}\n\n{why}\n\n{cmds(lines)}")
    return "\n\n".join(parts)


def publish_checklist(text: str) -> None:
    """The checklist as its own artifact (keyed, so each run's sits in one history)."""
    create_markdown_artifact(
        key=ARTIFACT_KEY,
        markdown="# Disaster recovery checklist\n\n" + text,
        description="system-outage: DR readiness and the five restore steps",
    )
