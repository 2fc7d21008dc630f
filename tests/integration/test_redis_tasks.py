"""tasks/redis.py against a real Redis: the sandbox's private server (never the shared one's
data), plus read-only PING/INFO on the shared server."""

from __future__ import annotations

import uuid

import pytest
from pydantic import SecretStr

from sandbox.server import free_port
from tasks.errors import SafetyViolation, TransientError
from tasks.redis import clear_cache, matches_everything, redis_info, redis_ping
from tasks.settings import RedisSettings

DB = 3  # our own db number on the private server


@pytest.fixture
def rs(sandbox_redis):
    """Settings for db 3 of the private Redis, with a fresh key prefix; cleaned up after."""
    prefix = f"rt{uuid.uuid4().hex[:8]}:"
    client = sandbox_redis.client(DB)
    yield prefix, client, RedisSettings(url=SecretStr(sandbox_redis.url(DB)))
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.unlink(*keys)


def test_ping(sandbox_redis):
    r = redis_ping.fn(settings=RedisSettings(url=SecretStr(sandbox_redis.url(DB))))
    assert r.ok and r.latency_ms >= 0 and r.target.endswith(f":{sandbox_redis.port}/{DB}")


def test_ping_and_info_on_the_shared_redis_read_only():
    s = RedisSettings(url=SecretStr("redis://127.0.0.1:6379/0"))
    assert redis_ping.fn(settings=s).ok
    info = redis_info.fn(settings=s)
    assert info.used_memory > 0 and info.version


def test_unreachable_is_transient_and_hides_the_password():
    s = RedisSettings(url=SecretStr(f"redis://:hunter2@127.0.0.1:{free_port()}/0"))
    with pytest.raises(TransientError) as info:
        redis_ping.fn(settings=s)
    assert "hunter2" not in str(info.value)


def test_info_memory_hit_rate_evictions_keyspace(rs, sandbox_redis):
    prefix, client, s = rs
    client.set(f"{prefix}a", "1", ex=60)
    client.set(f"{prefix}b", "2")
    info = redis_info.fn(settings=s)
    assert info.maxmemory == 64 * 1024 * 1024 and info.maxmemory_policy == "allkeys-lru"
    assert info.memory_ratio is not None and 0 < info.memory_ratio < 1
    assert info.keyspace[f"db{DB}"].keys >= 2 and info.keyspace[f"db{DB}"].expires >= 1
    assert info.hit_rate is None or 0 <= info.hit_rate <= 1
    assert info.evicted_keys >= 0 and info.window_s is None


def test_window_hit_rate_sees_a_cache_that_misses(sandbox_backend, sandbox_redis):
    s = RedisSettings(url=SecretStr(sandbox_redis.url()))
    sandbox_backend.faults(cache_miss=True)
    with sandbox_backend.background_traffic(("/api/users/2",)):
        info = redis_info.fn(window_s=1.0, settings=s)
    assert info.window_misses and info.window_misses > 0
    assert info.window_hit_rate == 0.0


def test_window_hit_rate_of_a_warm_cache(sandbox_backend, sandbox_redis):
    s = RedisSettings(url=SecretStr(sandbox_redis.url()))
    sandbox_backend.traffic(1, "/api/users/2")
    with sandbox_backend.background_traffic(("/api/users/2",)):
        info = redis_info.fn(window_s=1.0, settings=s)
    assert info.window_hits and info.window_hit_rate is not None and info.window_hit_rate > 0.9


def test_no_maxmemory_means_no_ratio():
    info = redis_info.fn(settings=RedisSettings(url=SecretStr("redis://127.0.0.1:6379/0")))
    if info.maxmemory == 0:
        assert info.memory_ratio is None


def test_cache_clear_dry_run_then_real(rs):
    prefix, client, s = rs
    for i in range(1203):
        client.set(f"{prefix}cache:user:{i}", "x")
    client.set(f"{prefix}session:42", "keep me")
    s = s.model_copy(update={"cache_key_pattern": f"{prefix}cache:*"})
    dry = clear_cache.fn(dry_run=True, settings=s)
    assert (dry.matched, dry.deleted, dry.method) == (1203, 0, "scan+unlink")
    assert len(dry.sample_keys) == 10 and all(
        k.startswith(f"{prefix}cache:") for k in dry.sample_keys
    )
    assert client.exists(f"{prefix}cache:user:7")  # the dry run changed nothing
    real = clear_cache.fn(dry_run=False, settings=s)
    assert (real.matched, real.deleted) == (1203, 1203)
    assert not list(client.scan_iter(match=f"{prefix}cache:*"))
    assert client.get(f"{prefix}session:42") == "keep me"
    again = clear_cache.fn(dry_run=False, settings=s)  # idempotent: nothing left to do
    assert (again.matched, again.deleted) == (0, 0)


def test_cache_clear_refusals(rs):
    prefix, client, s = rs
    client.set(f"{prefix}precious", "1")
    with pytest.raises(SafetyViolation, match="no cache key pattern"):
        clear_cache.fn(dry_run=False, settings=s)
    for pattern in ("*", "**", "?*"):
        with pytest.raises(SafetyViolation, match="cache-only"):
            clear_cache.fn(
                dry_run=False, settings=s.model_copy(update={"cache_key_pattern": pattern})
            )
    assert client.get(f"{prefix}precious") == "1"


def test_cache_only_db_is_flushed_alone(sandbox_redis):
    # db 5 of the private server is "cache-only"; db 6 must keep its keys (no FLUSHALL).
    cache, other = sandbox_redis.client(5), sandbox_redis.client(6)
    for i in range(20):
        cache.set(f"c{i}", "x")
    other.set("keep", "1")
    s = RedisSettings(url=SecretStr(sandbox_redis.url(5)), cache_key_pattern="*", cache_only=True)
    dry = clear_cache.fn(dry_run=True, settings=s)
    assert (dry.method, dry.matched, dry.deleted) == ("flushdb", 20, 0) and cache.dbsize() == 20
    real = clear_cache.fn(dry_run=False, settings=s)
    assert real.deleted == 20
    assert cache.dbsize() == 0
    assert other.get("keep") == "1"
    other.delete("keep")


@pytest.mark.parametrize(
    ("pattern", "everything"),
    [("*", True), ("**", True), ("?*", True), ("akig:*", False), ("*:cache", False), ("?", False)],
)
def test_matches_everything(pattern, everything):
    assert matches_everything(pattern) is everything


def test_memory_near_maxmemory_and_evictions(sandbox_backend, sandbox_redis):
    s = RedisSettings(url=SecretStr(sandbox_redis.url()))
    sandbox_backend.admin("POST", "/admin/redis-fill", json={"fraction": 0.95})
    try:
        before = redis_info.fn(settings=s)
        assert before.memory_ratio is not None and before.memory_ratio >= 0.95
        # 8 MB more than fits: allkeys-lru must evict (the filler keys, least recently used).
        client = sandbox_redis.client()
        big = "y" * (1024 * 1024)
        for i in range(8):
            client.set(f"{sandbox_backend.settings.key_prefix}big:{i}", big)
        after = redis_info.fn(settings=s)
        assert after.evicted_keys > before.evicted_keys
        assert after.memory_ratio is not None and after.memory_ratio <= 1.05
    finally:
        sandbox_backend.admin("DELETE", "/admin/redis-fill")


def test_clear_of_a_poisoned_backend_cache_ends_its_errors(sandbox_backend):
    sandbox_backend.traffic(1, "/api/users/30")  # a healthy entry, also cache
    sandbox_backend.admin("POST", "/admin/cache-poison", params={"users": 20})
    assert sandbox_backend.traffic(2, "/api/users/3") == [500, 500]
    s = sandbox_backend.redis_settings()
    dry = clear_cache.fn(dry_run=True, settings=s)
    assert dry.matched >= 26 and dry.deleted == 0
    assert sandbox_backend.traffic(1, "/api/users/3") == [500]  # the dry run changed nothing
    real = clear_cache.fn(dry_run=False, settings=s)
    assert real.deleted == real.matched >= 26
    assert sandbox_backend.traffic(3, "/api/users/3") == [200] * 3
