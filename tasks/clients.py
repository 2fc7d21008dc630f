"""The one place that builds clients, each with explicit timeouts and no retry layer.

Retries belong to `@task` (`tasks.retry`); clients fail fast so a dead target costs one
timeout per attempt, not a hidden stack of them. Tests swap settings, not this code.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import dns.resolver
import httpx
import psycopg
import redis
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.config.config_exception import ConfigException
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from pydantic import SecretStr
from redis.backoff import NoBackoff
from redis.retry import Retry

from tasks.errors import PermanentError, TransientError
from tasks.settings import (
    BackendSettings,
    KubernetesSettings,
    OutageSettings,
    PaymentsSettings,
    PostgresSettings,
    PrometheusSettings,
    RedisSettings,
)

# SQLSTATEs that no retry will fix: bad password / role / database / privilege.
_PG_PERMANENT_STATES = {"28000", "28P01", "3D000", "42501", "42704"}


def secret_from_block(block_name: str) -> str:
    """Read a secret from a Prefect `Secret` block (never logged)."""
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(block_name, _sync=True)  # type: ignore[call-arg]
    except ValueError:
        raise PermanentError(f"Prefect Secret block {block_name!r} not found") from None
    return str(value.get())  # type: ignore[union-attr]


def resolve_secret(value: SecretStr, block_name: str | None) -> str:
    """The secret's value: from the named Prefect Secret block if any, else from settings."""
    return secret_from_block(block_name) if block_name else value.get_secret_value()


def pg_dsn(settings: PostgresSettings) -> str:
    """The DSN to connect with, from the Secret block when one is named."""
    return resolve_secret(settings.dsn, settings.dsn_secret_block)


# What a parsed host / port may look like. libpq "parses" some malformed URLs (a raw `/` or
# `@` in the password) into fields holding pieces of the password: such fields are refused.
_PG_HOST = re.compile(r"^[A-Za-z0-9._:/%\[\]-]+$")
_PG_PORT = re.compile(r"^[0-9]{1,5}$")
_PG_DBNAME = re.compile(r"^[A-Za-z0-9_$.-]{1,63}$")
_PG_MALFORMED = (
    "PostgreSQL DSN is malformed (not shown): check RUNBOOKS_PG_DSN or its Secret block;"
    " in a URL, percent-encode special characters of the password (/ @ % : space)"
)


def _pg_parts(dsn: str) -> dict[str, str]:
    """The DSN's fields as libpq parses them; a fixed message (never libpq's) when malformed."""
    try:
        parts = {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}
    except psycopg.Error:
        # libpq's parse errors quote the offending fragment, which may be the password.
        raise PermanentError(_PG_MALFORMED) from None
    hosts = [h for h in parts.get("host", "").split(",") if h]
    ports = [p for p in parts.get("port", "").split(",") if p]
    if not all(_PG_HOST.match(h) and "@" not in h for h in hosts) or not all(
        _PG_PORT.match(p) for p in ports
    ):
        raise PermanentError(_PG_MALFORMED)
    return parts


def pg_target(settings: PostgresSettings) -> str:
    """A printable name of the PostgreSQL target, `host:port/dbname`, from parsed fields only."""
    try:
        parts = _pg_parts(pg_dsn(settings))
    except PermanentError:
        return "<malformed DSN>"
    host = parts.get("host") or "localhost"
    port = parts.get("port") or "5432"
    dbname = parts.get("dbname") or parts.get("user") or ""
    # A database name is shown only when it looks like one: never a fragment of a mis-parse.
    return f"{host}:{port}/{dbname if _PG_DBNAME.match(dbname) else '?'}"


def _scrub(text: str, secret: str | None) -> str:
    """`text` with the password (as written and percent-encoded) blotted out."""
    if secret and len(secret) >= 3:
        for form in {secret, quote(secret, safe=""), quote(secret)}:
            text = text.replace(form, "***")
    return text


def classify_pg_error(
    exc: psycopg.Error, target: str, secret: str | None = None
) -> TransientError | PermanentError:
    """Map a psycopg error to our error types, with a message free of secrets."""
    state = exc.sqlstate
    if state in _PG_PERMANENT_STATES:
        return PermanentError(f"PostgreSQL {target} refused the request (SQLSTATE {state})")
    detail = _scrub(_first_line(exc), secret)
    if isinstance(exc, psycopg.OperationalError | psycopg.errors.LockNotAvailable) or (
        state is not None and state[:2] in {"08", "53", "57", "40", "55"}
    ):
        # 08 connection, 53 resources (too many connections), 57 shutdown/cancel,
        # 40 serialization/deadlock, 55 lock not available: all worth another try.
        return TransientError(f"PostgreSQL {target} unavailable: {detail}")
    return PermanentError(f"PostgreSQL {target} error (SQLSTATE {state}): {detail}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


@contextmanager
def pg_connect(
    settings: PostgresSettings | None = None, *, autocommit: bool = True
) -> Iterator[psycopg.Connection[DictRow]]:
    """Open a PostgreSQL connection with connect, statement and lock timeouts set."""
    settings = settings or PostgresSettings()
    target = pg_target(settings)
    dsn = pg_dsn(settings)
    password = _pg_parts(dsn).get("password")
    options = (
        f"-c statement_timeout={settings.statement_timeout_ms} "
        f"-c lock_timeout={settings.lock_timeout_ms}"
    )
    try:
        conn = psycopg.connect(
            dsn,
            connect_timeout=settings.connect_timeout_s,
            application_name=settings.application_name,
            options=options,
            autocommit=autocommit,
            row_factory=dict_row,
        )
    except psycopg.Error as exc:
        raise classify_pg_error(exc, target, password) from None
    try:
        with conn:
            yield conn
    except psycopg.Error as exc:
        raise classify_pg_error(exc, target, password) from None


def redis_client(settings: RedisSettings | None = None) -> redis.Redis:
    """A Redis client with explicit timeouts and redis-py's own retries switched off."""
    settings = settings or RedisSettings()
    url = resolve_secret(settings.url, settings.url_secret_block)
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=settings.connect_timeout_s,
        socket_timeout=settings.timeout_s,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


def kube_configured(settings: KubernetesSettings | None = None) -> bool:
    """Whether any Kubernetes configuration source exists (cheap: nothing is parsed).

    The sources `kube_api_client` tries: the configured kubeconfig, in-cluster, then
    `$KUBECONFIG` or ~/.kube/config. Runbooks whose Kubernetes step is optional skip it
    without a failed task run when there is none at all.
    """
    settings = settings or KubernetesSettings()
    if settings.kubeconfig is not None or os.environ.get("KUBERNETES_SERVICE_HOST"):
        return True
    paths = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    return any(Path(p).expanduser().is_file() for p in paths.split(os.pathsep) if p)


def kube_api_client(settings: KubernetesSettings | None = None) -> k8s.ApiClient:
    """An `ApiClient` from the configured kubeconfig, else in-cluster, else ~/.kube/config."""
    settings = settings or KubernetesSettings()
    configuration = k8s.Configuration()
    try:
        if settings.kubeconfig is not None:
            k8s_config.load_kube_config(
                config_file=str(settings.kubeconfig),
                context=settings.context,
                client_configuration=configuration,
            )
        else:
            try:
                k8s_config.load_incluster_config(client_configuration=configuration)
            except ConfigException:
                k8s_config.load_kube_config(
                    context=settings.context, client_configuration=configuration
                )
    except (ConfigException, OSError) as exc:
        raise PermanentError(f"Kubernetes configuration unusable: {_first_line(exc)}") from None
    # urllib3 would otherwise retry 3 times under our task retries.
    configuration.retries = False
    return k8s.ApiClient(configuration)


def kube_request_timeout(settings: KubernetesSettings | None = None) -> tuple[float, float]:
    """`_request_timeout` for kubernetes calls: (connect, read) seconds."""
    settings = settings or KubernetesSettings()
    return (min(5.0, settings.request_timeout_s), settings.request_timeout_s)


def backend_http(settings: BackendSettings | None = None, **kwargs: Any) -> httpx.Client:
    """An HTTP client for the backend with explicit connect and read timeouts."""
    settings = settings or BackendSettings()
    return httpx.Client(
        base_url=settings.url,
        timeout=httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s),
        **kwargs,
    )


def payments_http(settings: PaymentsSettings | None = None) -> httpx.Client:
    """An HTTP client for the payments API; the bearer token rides in a header only."""
    settings = settings or PaymentsSettings()
    token = resolve_secret(settings.token, settings.token_secret_block)
    return httpx.Client(
        base_url=settings.url,
        timeout=httpx.Timeout(settings.timeout_s, connect=min(5.0, settings.timeout_s)),
        headers={"Authorization": f"Bearer {token}"} if token else {},
    )


def gateway_http(settings: PaymentsSettings | None = None) -> httpx.Client:
    """An HTTP client for the payment gateway's API (read-only use); token in a header only."""
    settings = settings or PaymentsSettings()
    if not settings.gateway_url:
        raise PermanentError(
            "the payment gateway is not configured (RUNBOOKS_PAYMENTS_GATEWAY_URL)"
        )
    token = resolve_secret(settings.gateway_token, settings.gateway_token_secret_block)
    return httpx.Client(
        base_url=settings.gateway_url,
        timeout=httpx.Timeout(
            settings.gateway_timeout_s, connect=min(5.0, settings.gateway_timeout_s)
        ),
        headers={"Authorization": f"Bearer {token}"} if token else {},
    )


def prometheus_http(settings: PrometheusSettings) -> httpx.Client:
    """An HTTP client for the Prometheus API (URL required); the token rides in a header only."""
    if not settings.url:
        raise PermanentError("Prometheus is not configured (RUNBOOKS_PROMETHEUS_URL)")
    token = resolve_secret(settings.token or SecretStr(""), settings.token_secret_block)
    return httpx.Client(
        base_url=settings.url,
        timeout=httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s),
        headers={"Authorization": f"Bearer {token}"} if token else {},
    )


def resolver_address(resolver: str) -> tuple[str, int]:
    """`ip`, `ip:port`, `[v6]` or `[v6]:port` as (ip, port); anything else a clear error."""
    text = resolver.strip()
    host, port = text, "53"
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise PermanentError(f"DNS resolver {resolver!r} is not ip, ip:port or [v6]:port")
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        ip = str(ipaddress.ip_address(host))
    except ValueError:
        raise PermanentError(
            f"DNS resolver {resolver!r} is not an IP address (ip, ip:port or [v6]:port)"
        ) from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise PermanentError(f"DNS resolver {resolver!r}: port must be 1-65535")
    return ip, int(port)


def dns_resolver(settings: OutageSettings) -> dns.resolver.Resolver:
    """A stub resolver: the configured server (no search domains, no cache), else the
    system's resolv.conf; every lookup bounded by `dns_timeout_s`."""
    if settings.resolver:
        ip, port = resolver_address(settings.resolver)
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [ip]
        resolver.port = port
    else:
        resolver = dns.resolver.Resolver(configure=True)
    resolver.cache = None
    resolver.timeout = settings.dns_timeout_s
    resolver.lifetime = settings.dns_timeout_s
    return resolver
