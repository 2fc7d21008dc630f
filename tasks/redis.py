"""Redis checks (PING, INFO figures) and the one guarded write: a cache clear by key pattern.

The clear SCANs the configured pattern and UNLINKs in batches (non-blocking on the server).
It is a dry run unless told otherwise, refuses a match-everything pattern unless the
settings declare the db cache-only, and never runs FLUSHALL: with `cache_only` and a
match-everything pattern it flushes this one db (FLUSHDB ASYNC), nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, cast

import redis
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from tasks.clients import redis_client
from tasks.errors import PermanentError, SafetyViolation, TransientError
from tasks.retry import RETRY_IDEMPOTENT_WRITE, RETRY_READ
from tasks.settings import RedisSettings

#: Keys per UNLINK (and SCAN COUNT hint): small enough to keep each command short.
BATCH = 500
SAMPLE_KEYS = 10


class PingResult(BaseModel):
    """PING round trip."""

    target: str
    ok: bool
    latency_ms: float


class KeyspaceDb(BaseModel):
    """One `dbN` line of INFO keyspace."""

    keys: int
    expires: int


class RedisInfo(BaseModel):
    """Figures from INFO server/stats/memory/keyspace (cumulative since the server started)."""

    target: str
    version: str | None = None
    used_memory: int
    used_memory_human: str | None = None
    maxmemory: int = Field(description="0 = no limit.")
    maxmemory_policy: str | None = None
    memory_ratio: float | None = Field(None, description="used/maxmemory; None without limit.")
    mem_fragmentation_ratio: float | None = None
    connected_clients: int | None = None
    keyspace_hits: int
    keyspace_misses: int
    hit_rate: float | None = Field(None, description="hits/(hits+misses); None before any read.")
    evicted_keys: int
    expired_keys: int
    keyspace: dict[str, KeyspaceDb] = Field(default_factory=dict)
    window_s: float | None = Field(None, description="Set when the window figures were measured.")
    window_hits: int | None = None
    window_misses: int | None = None
    window_hit_rate: float | None = None
    window_evictions: int | None = None


class CacheClearResult(BaseModel):
    """What a cache clear matched and (unless a dry run) removed."""

    target: str
    pattern: str
    dry_run: bool
    method: Literal["scan+unlink", "flushdb"]
    matched: int
    deleted: int
    sample_keys: list[str] = Field(default_factory=list, description="A few matched key names.")


def redis_target(settings: RedisSettings) -> str:
    """host:port/db of the configured Redis, never the password."""
    conn = redis_client(settings).connection_pool.connection_kwargs
    return f"{conn.get('host', '?')}:{conn.get('port', '?')}/{conn.get('db', 0)}"


@contextmanager
def redis_session(settings: RedisSettings) -> Iterator[tuple[redis.Redis, str]]:
    client = redis_client(settings)
    target = redis_target(settings)
    try:
        yield client, target
    except redis.AuthenticationError:
        raise PermanentError(f"Redis {target} refused our credentials") from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise TransientError(f"Redis {target} unavailable: {type(exc).__name__}") from None
    except redis.ResponseError as exc:
        text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if text.startswith(("LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN")):
            raise TransientError(f"Redis {target} busy: {text}") from None
        raise PermanentError(f"Redis {target} refused the command: {text}") from None
    finally:
        client.close()


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="redis-ping")
def redis_ping(settings: RedisSettings | None = None) -> PingResult:
    """PING the server and time the round trip."""
    settings = settings or RedisSettings()
    with redis_session(settings) as (client, target):
        start = time.perf_counter()
        ok = bool(client.ping())
        return PingResult(
            target=target, ok=ok, latency_ms=round((time.perf_counter() - start) * 1000, 2)
        )


def _info(client: redis.Redis) -> dict[str, Any]:
    info: dict[str, Any] = {}
    for section in ("server", "clients", "stats", "memory", "keyspace"):
        info.update(cast(dict[str, Any], client.info(section)))
    return info


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="redis-info")
def redis_info(window_s: float = 0.0, settings: RedisSettings | None = None) -> RedisInfo:
    """INFO figures: memory vs maxmemory, hit rate, evictions, keyspace; with `window_s` > 0,
    also the hit rate and evictions of that recent window (two INFO reads apart)."""
    if not 0 <= window_s <= 300:
        raise PermanentError(f"window_s must be between 0 and 300, not {window_s}")
    settings = settings or RedisSettings()
    with redis_session(settings) as (client, target):
        first = _info(client)
        last = first
        if window_s:
            time.sleep(window_s)
            last = _info(client)
    used, maxmemory = int(last["used_memory"]), int(last.get("maxmemory", 0))
    hits, misses = int(last["keyspace_hits"]), int(last["keyspace_misses"])
    keyspace = {
        name: KeyspaceDb(keys=int(v["keys"]), expires=int(v.get("expires", 0)))
        for name, v in last.items()
        if name.startswith("db") and name[2:].isdigit() and isinstance(v, dict)
    }
    result = RedisInfo(
        target=target,
        version=last.get("redis_version") and str(last["redis_version"]),
        used_memory=used,
        used_memory_human=last.get("used_memory_human"),
        maxmemory=maxmemory,
        maxmemory_policy=last.get("maxmemory_policy"),
        memory_ratio=_ratio(used, maxmemory),
        mem_fragmentation_ratio=last.get("mem_fragmentation_ratio"),
        connected_clients=last.get("connected_clients"),
        keyspace_hits=hits,
        keyspace_misses=misses,
        hit_rate=_ratio(hits, hits + misses),
        evicted_keys=int(last["evicted_keys"]),
        expired_keys=int(last["expired_keys"]),
        keyspace=keyspace,
    )
    if window_s:
        dh = hits - int(first["keyspace_hits"])
        dm = misses - int(first["keyspace_misses"])
        result.window_s = window_s
        result.window_hits, result.window_misses = dh, dm
        result.window_hit_rate = _ratio(dh, dh + dm)
        result.window_evictions = int(last["evicted_keys"]) - int(first["evicted_keys"])
    return result


class RedisPersistence(BaseModel):
    """INFO persistence: is AOF on, how its last rewrite went, and the last RDB save."""

    target: str
    aof_enabled: bool
    aof_rewrite_in_progress: bool
    aof_last_rewrite_time_sec: int | None = Field(
        None, description="Duration of the last AOF rewrite, seconds; None: never rewritten."
    )
    aof_last_bgrewrite_status: str | None = None
    aof_last_write_status: str | None = None
    aof_rewrites: int | None = Field(None, description="Rewrites since start (Redis 7+).")
    rdb_last_save_time: int | None = Field(None, description="Unix time of the last save.")
    rdb_last_save_age_s: float | None = None
    rdb_last_bgsave_status: str | None = None
    rdb_changes_since_last_save: int | None = None


def _opt_int(value: Any) -> int | None:
    """An INFO figure as an int; None where absent or -1 (Redis' "never")."""
    if value is None:
        return None
    number = int(value)
    return None if number == -1 else number


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="redis-persistence")
def redis_persistence(settings: RedisSettings | None = None) -> RedisPersistence:
    """INFO persistence: AOF on, last rewrite, last save and their statuses (read only)."""
    settings = settings or RedisSettings()
    with redis_session(settings) as (client, target):
        info = cast(dict[str, Any], client.info("persistence"))
        now = time.time()
    saved = _opt_int(info.get("rdb_last_save_time"))
    return RedisPersistence(
        target=target,
        aof_enabled=bool(int(info.get("aof_enabled", 0))),
        aof_rewrite_in_progress=bool(int(info.get("aof_rewrite_in_progress", 0))),
        aof_last_rewrite_time_sec=_opt_int(info.get("aof_last_rewrite_time_sec")),
        aof_last_bgrewrite_status=info.get("aof_last_bgrewrite_status"),
        aof_last_write_status=info.get("aof_last_write_status"),
        aof_rewrites=_opt_int(info.get("aof_rewrites")),
        rdb_last_save_time=saved,
        rdb_last_save_age_s=None if saved is None else round(max(0.0, now - saved), 1),
        rdb_last_bgsave_status=info.get("rdb_last_bgsave_status"),
        rdb_changes_since_last_save=_opt_int(info.get("rdb_changes_since_last_save")),
    )


def matches_everything(pattern: str) -> bool:
    """True for a glob that matches any key (`*`, `**`, `*?*`...): nothing but wildcards."""
    return "*" in pattern and set(pattern) <= {"*", "?"}


def scan_unlink(client: redis.Redis, pattern: str, dry_run: bool) -> tuple[int, int, list[str]]:
    """SCAN `pattern` and UNLINK in batches (count only on a dry run): matched, deleted, a
    few sample names. A retry finds the keys already gone."""
    matched = deleted = 0
    sample: list[str] = []
    batch: list[str] = []
    for key in client.scan_iter(match=pattern, count=BATCH):
        matched += 1
        if len(sample) < SAMPLE_KEYS:
            sample.append(str(key))
        if dry_run:
            continue
        batch.append(str(key))
        if len(batch) >= BATCH:
            deleted += int(cast(int, client.unlink(*batch)))
            batch = []
    if batch:
        deleted += int(cast(int, client.unlink(*batch)))
    return matched, deleted, sample


@task(
    **RETRY_IDEMPOTENT_WRITE,
    cache_policy=NO_CACHE,
    task_run_name="redis-cache-clear-{dry_run}",
)
def clear_cache(dry_run: bool = True, settings: RedisSettings | None = None) -> CacheClearResult:
    """Count (dry run) or UNLINK the keys matching the configured cache pattern.

    Idempotent: a retry finds the keys already gone. Never FLUSHALL."""
    settings = settings or RedisSettings()
    pattern = settings.cache_key_pattern
    if not pattern:
        raise SafetyViolation(
            "no cache key pattern configured (RUNBOOKS_REDIS_CACHE_KEY_PATTERN): "
            "refusing to guess which keys are cache"
        )
    everything = matches_everything(pattern)
    if everything and not settings.cache_only:
        raise SafetyViolation(
            f"pattern {pattern!r} matches every key, and the db is not declared cache-only "
            "(RUNBOOKS_REDIS_CACHE_ONLY): refusing"
        )
    sample: list[str] = []
    with redis_session(settings) as (client, target):
        if everything:
            # Cache-only db: DBSIZE is the count; FLUSHDB ASYNC frees it without blocking.
            matched = int(cast(int, client.dbsize()))
            _, first_keys = cast(tuple[int, list[str]], client.scan(0, count=SAMPLE_KEYS))
            sample = [str(k) for k in first_keys[:SAMPLE_KEYS]]
            deleted = 0
            if not dry_run:
                client.flushdb(asynchronous=True)
                deleted = matched
            return CacheClearResult(
                target=target,
                pattern=pattern,
                dry_run=dry_run,
                method="flushdb",
                matched=matched,
                deleted=deleted,
                sample_keys=sample,
            )
        matched, deleted, sample = scan_unlink(client, pattern, dry_run)
    return CacheClearResult(
        target=target,
        pattern=pattern,
        dry_run=dry_run,
        method="scan+unlink",
        matched=matched,
        deleted=deleted,
        sample_keys=sample,
    )
