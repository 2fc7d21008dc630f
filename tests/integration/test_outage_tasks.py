"""system-outage's own tasks on real things: Redis' INFO persistence (the local server), the
backup-listing command (real programs, no shell), the health URL from outside (the sandbox
backend, then a port nobody listens on), the database layer's replication lag (a private
primary and its streaming standby)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from pydantic import SecretStr

from drills.pg_cluster import private_cluster, standby_of
from flows.outage.params import SystemOutageParams
from flows.outage.recovery import verify_from_outside
from tasks.cascade.layers import check_database
from tasks.endpoint import endpoint_health
from tasks.errors import PermanentError, TransientError
from tasks.postgres.backups import base_backups
from tasks.redis import redis_persistence
from tasks.settings import BackendSettings, OutageSettings, PostgresSettings, RedisSettings
from tests.fixtures.sandbox import Sandbox
from tests.integration.kube_helpers import wait_until

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_redis_persistence_reads_info_persistence() -> None:
    found = redis_persistence.fn(RedisSettings())
    assert found.target == "127.0.0.1:6379/0"
    assert isinstance(found.aof_enabled, bool)
    assert found.rdb_last_bgsave_status in {"ok", "err"}
    assert found.aof_last_bgrewrite_status in {"ok", "err"}
    assert found.rdb_last_save_age_s is not None and found.rdb_last_save_age_s >= 0


def test_redis_persistence_unreachable_is_a_clear_error() -> None:
    down = RedisSettings(url="redis://:secret-pw@127.0.0.1:1/0", connect_timeout_s=0.5)
    with pytest.raises(TransientError, match="unavailable") as err:
        redis_persistence.fn(down)
    assert "secret-pw" not in str(err.value)


def test_base_backups_reads_the_newest_stamp_of_a_real_listing() -> None:
    newest = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    older = newest - timedelta(days=1)
    listing = (
        f"name modified\\nbase_1 {older:%Y-%m-%dT%H:%M:%SZ}\\nbase_2 {newest:%Y-%m-%dT%H:%M:%SZ}\\n"
    )
    found = base_backups.fn(f"printf '{listing}'")
    assert (found.command, found.lines, found.newest) == ("printf", 3, newest)
    assert found.newest_age_s is not None and 7190 <= found.newest_age_s <= 7300


def test_base_backups_failures_are_clear_and_quote_no_output() -> None:
    with pytest.raises(PermanentError, match="not found"):
        base_backups.fn("no-such-backup-tool list")
    script = "import sys; print('s3://key:secret@bucket'); sys.exit(3)"
    with pytest.raises(PermanentError, match="exited 3") as err:
        base_backups.fn(f'{sys.executable} -c "{script}"')
    assert "secret" not in str(err.value)
    with pytest.raises(TransientError, match="timed out"):
        base_backups.fn("sleep 5", timeout_s=0.3)
    with pytest.raises(PermanentError, match="empty"):
        base_backups.fn("   ")


def test_health_from_outside_through_the_endpoint_or_the_backend(sandbox_backend: Sandbox) -> None:
    health = sandbox_backend.url + "/api/health"
    through = endpoint_health.fn(OutageSettings(endpoint_url=health), BackendSettings())
    assert (through.via, through.ok, through.status_code) == ("endpoint", True, 200)
    assert through.timings is not None and through.timings.total_ms > 0
    # No endpoint configured: the backend's own health URL.
    backend = endpoint_health.fn(OutageSettings(), BackendSettings(url=sandbox_backend.url))
    assert (backend.via, backend.ok) == ("backend", True)


def test_verify_from_outside_polls_until_its_deadline_and_says_which_url(
    monkeypatch: pytest.MonkeyPatch, sandbox_backend: Sandbox
) -> None:
    monkeypatch.setenv("RUNBOOKS_BACKEND_URL", sandbox_backend.url)
    ok = verify_from_outside(SystemOutageParams(verify_timeout_s=2), OutageSettings())
    assert ok.healthy and ok.attempts == 1
    assert "no endpoint URL is configured" in ok.summary
    down = OutageSettings(endpoint_url="http://127.0.0.1:1/api/health", endpoint_timeout_s=0.5)
    bad = verify_from_outside(SystemOutageParams(verify_timeout_s=2), down)
    assert not bad.healthy and bad.attempts >= 2 and 2 <= bad.waited_s < 4
    assert "unreachable" in bad.check.detail and "the path a user takes" in bad.summary


def test_database_layer_reports_replication_lag_where_there_is_a_replica() -> None:
    """Replication lag where there is a replica: the primary's pg_stat_replication row and the
    standby's own replay lag; none where there is none; a "replica" that is a primary is said."""
    with private_cluster() as primary, standby_of(primary) as standby:
        pg = PostgresSettings(dsn=SecretStr(primary.admin_dsn), connect_timeout_s=2)
        with psycopg.connect(primary.admin_dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE replicated (id int)")  # a transaction to replay

            def streaming() -> bool:
                rows = conn.execute("SELECT state FROM pg_stat_replication").fetchall()
                return [r[0] for r in rows] == ["streaming"]

            wait_until(streaming, what="the standby streaming", timeout=30)

        def replayed() -> bool:
            with psycopg.connect(standby.admin_dsn) as conn:
                row = conn.execute("SELECT pg_last_xact_replay_timestamp()").fetchone()
            return row is not None and row[0] is not None

        wait_until(replayed, what="the standby replaying", timeout=30)
        alone = check_database.fn(OutageSettings(), pg)
        both = check_database.fn(OutageSettings(replica_dsn=SecretStr(standby.admin_dsn)), pg)
        wrong = check_database.fn(OutageSettings(replica_dsn=SecretStr(primary.admin_dsn)), pg)

    assert alone.status == "ok" and "1 replica(s) streaming" in alone.summary
    (sent,) = [p for p in alone.probes if p.item.startswith("replication to ")]
    assert sent.ok and sent.observed.startswith("streaming, replay lag ")
    assert "bytes behind" in sent.observed
    assert not any(p.item.startswith("replica ") for p in alone.probes)
    assert both.status == "ok"
    (replica,) = [p for p in both.probes if p.item.startswith("replica ")]
    assert replica.ok and f":{standby.port}/" in replica.item
    assert replica.observed.startswith("replay lag ") and replica.ms is not None
    (not_one,) = [p for p in wrong.probes if p.item.startswith("replica ")]
    assert not_one.ok is False and "not in recovery" in not_one.observed
    # The primary decides the layer: a wrong replica is a figure, not an outage.
    assert wrong.status == "ok"
