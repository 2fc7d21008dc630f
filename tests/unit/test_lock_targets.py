"""The lock target builders: the keys stay what journals and held limits already name."""

from __future__ import annotations

from pydantic import SecretStr

from tasks.locks import LockTarget, kube_lock_target, pg_lock_target, redis_lock_target
from tasks.settings import PostgresSettings, RedisSettings

DSN = "postgresql://app:p%40ss-w0rd@db.internal:6432/orders"


def test_a_database_sits_within_its_server() -> None:
    settings = PostgresSettings(dsn=SecretStr(DSN))
    assert pg_lock_target(settings, "billing") == LockTarget(
        "pg:db.internal:6432/billing", within="pg:db.internal:6432"
    )


def test_without_a_database_the_target_is_the_whole_server() -> None:
    settings = PostgresSettings(dsn=SecretStr(DSN))
    assert pg_lock_target(settings, None) == LockTarget(
        "pg:db.internal:6432", within="pg:db.internal:6432"
    )


def test_a_pg_key_never_shows_the_password() -> None:
    settings = PostgresSettings(dsn=SecretStr(DSN))
    assert "w0rd" not in repr(pg_lock_target(settings, "orders"))


def test_the_cache_key_names_host_port_and_db() -> None:
    settings = RedisSettings(url=SecretStr("redis://:hunter2@cache.internal:6380/3"))
    assert redis_lock_target(settings) == LockTarget("redis:cache.internal:6380/3")


def test_a_workload_key_names_namespace_and_deployment() -> None:
    assert kube_lock_target("shop", "backend") == LockTarget("k8s:shop/backend")
