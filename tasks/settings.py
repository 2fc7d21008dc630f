"""Typed settings, one class per system, read from `RUNBOOKS_<SYSTEM>_*` variables.

Defaults fit the akig platform (deployment `akig-backend`, label `app=akig`, backend
`http://backend:4000`); every one can be overridden by the environment. Secrets are
`SecretStr`, so they print as `**********` in logs, reprs and artifacts. A secret may
also come from a Prefect `Secret` block: set the matching `*_secret_block` field.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class RetrySettings(BaseSettings):
    """The task retry policy (read once, when `tasks.retry` is imported)."""

    model_config = SettingsConfigDict(env_prefix="RUNBOOKS_RETRY_")

    attempts: int = Field(3, ge=0, le=10, description="Retries after the first attempt.")
    backoff_s: float = Field(
        2.0, ge=0, description="First retry delay in seconds; doubles on each retry."
    )
    jitter_factor: float = Field(
        0.5, ge=0, le=2, description="Random extra delay, as a fraction of the delay."
    )


class PostgresSettings(BaseSettings):
    """How runbooks reach the platform's PostgreSQL (as a superuser or pg_signal_backend)."""

    model_config = SettingsConfigDict(env_prefix="RUNBOOKS_PG_")

    dsn: SecretStr = Field(
        SecretStr("postgresql://postgres@127.0.0.1:5432/postgres"),
        description="libpq connection string or URI; may hold a password, hence secret.",
    )
    dsn_secret_block: str | None = Field(
        None, description="Name of a Prefect Secret block holding the DSN (wins over `dsn`)."
    )
    connect_timeout_s: int = Field(
        5, ge=1, le=60, description="TCP + auth timeout; a dead server must fail fast."
    )
    statement_timeout_ms: int = Field(
        15_000, ge=100, description="Cap on any one statement, so a check never hangs."
    )
    lock_timeout_ms: int = Field(
        3_000, ge=100, description="Cap on lock waits; ALTER SYSTEM must not queue forever."
    )
    application_name: str = Field(
        "incident-runbooks", description="Shown in pg_stat_activity; our own sessions."
    )
    protected_roles: list[str] = Field(
        default_factory=lambda: ["postgres", "replication", "rdsadmin", "cloudsqladmin"],
        description="Roles whose sessions are never terminated, whatever the parameters.",
    )
    max_sessions_cap: int = Field(
        100,
        ge=1,
        le=5000,
        description="Ceiling on a run's `guard.max_sessions`: no parameter can go above it.",
    )
    min_idle_minutes: float = Field(
        1.0,
        ge=1 / 60,
        le=60,
        description="Floor on a run's `guard.idle_minutes` (1 min; the test suite lowers it).",
    )


class PgBouncerSettings(BaseSettings):
    """PgBouncer's admin console (read-only `SHOW POOLS`); optional."""

    model_config = SettingsConfigDict(env_prefix="RUNBOOKS_PGBOUNCER_")

    dsn: SecretStr | None = Field(
        None, description="DSN of the `pgbouncer` admin database; unset = not checked."
    )
    connect_timeout_s: int = Field(3, ge=1, le=60, description="Connect timeout, seconds.")


class RedisSettings(BaseSettings):
    """How runbooks reach Redis."""

    model_config = SettingsConfigDict(env_prefix="RUNBOOKS_REDIS_")

    url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"), description="redis:// URL; may hold a password."
    )
    url_secret_block: str | None = Field(None, description="Prefect Secret block with the URL.")
    connect_timeout_s: float = Field(3.0, gt=0, description="Socket connect timeout, seconds.")
    timeout_s: float = Field(5.0, gt=0, description="Per-command socket timeout, seconds.")
    cache_key_pattern: str | None = Field(
        None,
        description="SCAN MATCH pattern of the cache keys a cache clear may UNLINK "
        "(e.g. `akig:cache:*`); unset = cache clear refuses.",
    )
    cache_only: bool = Field(
        False,
        description="The db holds nothing but cache: only then may a clear match every key "
        "(and use FLUSHDB ASYNC on this db; never FLUSHALL).",
    )


class KubernetesSettings(BaseSettings):
    """How runbooks reach the Kubernetes API and which workloads they look after."""

    model_config = SettingsConfigDict(env_prefix="RUNBOOKS_K8S_")

    kubeconfig: Path | None = Field(
        None, description="kubeconfig file; unset = in-cluster config, then ~/.kube/config."
    )
    context: str | None = Field(None, description="kubeconfig context; unset = current.")
    namespace: str = Field("default", description="Namespace of the platform workloads.")
    backend_deployment: str = Field("akig-backend", description="The backend Deployment.")
    frontend_deployment: str = Field("akig-frontend", description="The frontend Deployment.")
    label_selector: str = Field("app=akig", description="Selects the platform's pods.")
    request_timeout_s: float = Field(10.0, gt=0, description="Per API request timeout.")
    rollout_timeout_s: float = Field(
        300.0, gt=0, description="How long to wait for a rollout to finish."
    )


class BackendSettings(BaseSettings):
    """The platform backend's HTTP API."""

    model_config = SettingsConfigDict(env_prefix="RUNBOOKS_BACKEND_")

    url: str = Field("http://backend:4000", description="Base URL of the backend.")
    health_path: str = Field("/api/health", description="Health endpoint path.")
    connect_timeout_s: float = Field(3.0, gt=0, description="TCP connect timeout, seconds.")
    timeout_s: float = Field(10.0, gt=0, description="Read/write timeout, seconds.")


class PaymentsSettings(BaseSettings):
    """The payments API behind the backend (`POST /api/payments/retry`)."""

    model_config = SettingsConfigDict(env_prefix="RUNBOOKS_PAYMENTS_")

    url: str = Field("http://backend:4000", description="Base URL of the payments API.")
    token: SecretStr = Field(SecretStr(""), description="Bearer token for the payments API.")
    token_secret_block: str | None = Field(None, description="Prefect Secret block, token.")
    timeout_s: float = Field(15.0, gt=0, description="Request timeout, seconds.")
    gateway_url: str | None = Field(
        None,
        description="The payment gateway's API (status, charges by payment); unset ="
        " reconciliation against the gateway is unavailable.",
    )
    gateway_token: SecretStr = Field(SecretStr(""), description="Bearer token, gateway API.")
    gateway_token_secret_block: str | None = Field(
        None, description="Prefect Secret block holding the gateway token."
    )
    gateway_timeout_s: float = Field(5.0, gt=0, description="Gateway request timeout, seconds.")
    ledger_prefix: str = Field(
        "runbooks:payments:",
        min_length=1,
        description="Prefix of the idempotency-key ledger in the runbooks' Redis.",
    )
    failed_stream_key: str = Field(
        "akig:payments:failed",
        min_length=1,
        description="Redis stream of the failed-transactions queue (`<prefix>payments:failed`).",
    )


class TlsSettings(BaseSettings):
    """Where certificates live and when to warn about them."""

    model_config = SettingsConfigDict(env_prefix="RUNBOOKS_TLS_")

    files: list[Path] = Field(
        default_factory=lambda: [Path("/etc/ssl/certs/akig.crt")],
        description="PEM files or directories to scan.",
    )
    endpoints: list[str] = Field(
        default_factory=list, description="Live endpoints as host:port (SNI = host)."
    )
    warn_days: list[int] = Field(
        default_factory=lambda: [30, 14, 7, 3, 1], description="Alert thresholds in days."
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="TLS connect+handshake timeout.")
    emergency_hours: float = Field(
        24.0, gt=0, description="Less time left than this (or expired) is critical: emergency."
    )
    high_days: float = Field(7.0, gt=0, description="At most this many days left is high.")
    medium_days: float = Field(14.0, gt=0, description="At most this many days left is medium.")
    lifetime_fraction_warn: float = Field(
        1 / 3,
        ge=0,
        le=1,
        description="Warn (low) below this fraction of lifetime left; cert-manager renews at 2/3.",
    )
    max_workers: int = Field(
        64, ge=1, le=512, description="Concurrent probes; each one is a thread mostly waiting."
    )
    # Revocation: each source can be switched off alone (air-gapped platforms: all three).
    ocsp: bool = Field(True, description="Ask the OCSP responder named in the AIA extension.")
    crl: bool = Field(True, description="Fetch the CRL from the distribution point (cached).")
    ocsp_stapling: bool = Field(True, description="Ask servers to staple OCSP; use the answer.")
    revocation_timeout_s: float = Field(
        3.0, gt=0, le=60, description="Per OCSP / CRL HTTP request: connect + read, seconds."
    )
    revocation_max_age_h: float = Field(
        168.0, gt=0, description="An OCSP answer without nextUpdate is stale after this."
    )


class PrometheusSettings(BaseSettings):
    """The Prometheus HTTP API the runbooks query; unset URL = "not configured", not an error."""

    model_config = SettingsConfigDict(env_prefix="RUNBOOKS_PROMETHEUS_")

    url: str | None = Field(None, description="Base URL, e.g. http://prometheus:9090; unset = off.")
    token: SecretStr | None = Field(None, description="Bearer token, if the API needs one.")
    token_secret_block: str | None = Field(None, description="Prefect Secret block, token.")
    selector: str = Field(
        'job="akig-backend"',
        description='Label matchers that pick the backend\'s series, e.g. job="akig-backend".',
    )
    connect_timeout_s: float = Field(3.0, gt=0, description="TCP connect timeout, seconds.")
    timeout_s: float = Field(10.0, gt=0, description="Read timeout, seconds (also the query's).")


class AlertSourceSettings(BaseSettings):
    """Where a run asks whether the alert that started it is still firing (staleness check).

    Alertmanager's API when `RUNBOOKS_ALERTS_ALERTMANAGER_URL` is set; otherwise the
    receiver's record of resolved alerts (`RUNBOOKS_ALERTS_RECEIVER_URL`, set by `make run`,
    authenticated with the receiver's own token); neither = "unknown", and the run says so.
    """

    model_config = SettingsConfigDict(env_prefix="RUNBOOKS_ALERTS_")

    alertmanager_url: str | None = Field(
        None, description="Alertmanager base URL, e.g. http://alertmanager:9093; unset = off."
    )
    alertmanager_token: SecretStr | None = Field(
        None, description="Bearer token, when Alertmanager sits behind an auth proxy."
    )
    receiver_url: str | None = Field(
        None, description="The alert receiver's base URL, e.g. http://127.0.0.1:9095."
    )
    receiver_token: SecretStr | None = Field(
        None, description="The receiver's bearer token (RUNBOOKS_RECEIVER_TOKEN)."
    )
    timeout_s: float = Field(3.0, gt=0, le=30, description="Per request, seconds.")


class OutageSettings(BaseSettings):
    """What the system-outage cascade checks, layer by layer, each within its own timeout."""

    model_config = SettingsConfigDict(env_prefix="RUNBOOKS_OUTAGE_")

    hostnames: list[str] = Field(
        default_factory=list, description="DNS names users resolve (e.g. akig.example.com)."
    )
    resolver: str | None = Field(
        None, description="DNS server as ip or ip:port; unset = the system's resolv.conf."
    )
    dns_timeout_s: float = Field(2.0, gt=0, le=30, description="Per name lookup, seconds.")
    endpoint_url: str | None = Field(
        None,
        description="The health URL through the load balancer / ingress, as a user reaches it"
        " (e.g. https://akig.example.com/api/health); unset = layer not configured.",
    )
    endpoint_ca_file: Path | None = Field(
        None, description="CA bundle for the endpoint's TLS; unset = the system's."
    )
    endpoint_timeout_s: float = Field(3.0, gt=0, le=60, description="TCP+TLS+HTTP, seconds.")
    ingress_namespace: str = Field("ingress-nginx", description="The ingress controller's ns.")
    ingress_deployment: str = Field(
        "ingress-nginx-controller", description="The ingress controller's Deployment."
    )
    dependencies: list[str] = Field(
        default_factory=list,
        description="External dependencies as URLs (the payment gateway and others); any"
        " HTTP answer below 500 counts as up. Credentials in a URL are never shown.",
    )
    dependency_timeout_s: float = Field(3.0, gt=0, le=60, description="Per URL, seconds.")
    layer_timeout_s: float = Field(
        5.0, gt=0, le=120, description="Cap on any one layer's check, whatever it waits for."
    )
    replica_dsn: SecretStr | None = Field(
        None, description="A replica's DSN for its replay lag; unset = the primary's view only."
    )
    backup_list_command: str | None = Field(
        None,
        description="Command printing the base backups, newest last (e.g. `pgbackrest info`"
        " or `wal-g backup-list`); unset = the base-backup age is not configured.",
    )
    restart_stagger_s: float = Field(
        10.0,
        ge=0,
        le=600,
        description="Pause between restarting the backend and the frontend, after the first"
        " rollout finished, so the database is not hit by every reconnect at once.",
    )


class PerformanceSettings(BaseSettings):
    """Where the performance report reads "slow for some users?" and where it keeps reports."""

    model_config = SettingsConfigDict(env_prefix="RUNBOOKS_PERFORMANCE_")

    audit_table: str = Field("audit_logs", description="Table (optionally schema.table).")
    user_column: str = Field("user_id", description="Who made the request.")
    response_time_column: str = Field("response_time", description="Milliseconds.")
    created_at_column: str = Field("created_at", description="When (timestamptz).")
    window_minutes: int = Field(60, ge=1, le=7 * 24 * 60, description="How far back to look.")
    report_dir: Path = Field(
        Path(".prefect/performance-reports"),
        description="Where each report is exported (markdown, JSON, PNG chart); the previous"
        " JSON there is what the next report compares against.",
    )


class SecuritySettings(BaseSettings):
    """What the security-breach runbook reads, where it keeps evidence, what it may reset."""

    model_config = SettingsConfigDict(env_prefix="RUNBOOKS_SECURITY_")

    evidence_dir: Path = Field(
        Path(".prefect/security-evidence"),
        description="Where evidence bundles are written (one folder per incident, files"
        " 0600, a manifest with a SHA-256 per file and one for the manifest).",
    )
    audit_table: str = Field("audit_logs", description="Table (optionally schema.table).")
    user_column: str = Field("user_id", description="Who acted.")
    ip_column: str = Field("ip", description="The source address.")
    action_column: str = Field("action", description="What was done (e.g. login).")
    status_column: str = Field("status", description="HTTP status of the request.")
    created_at_column: str = Field("created_at", description="When (timestamptz).")
    login_actions: list[str] = Field(
        default_factory=lambda: ["login"], description="Values of the action column: logins."
    )
    window_hours: float = Field(24.0, gt=0, le=24 * 90, description="How far back to assess.")
    failed_login_burst: int = Field(
        20, ge=1, description="Failed logins by one user or address in 5 minutes: a burst."
    )
    many_ips: int = Field(5, ge=2, description="Distinct source addresses: one account shared.")
    secret_change_hours: float = Field(
        72.0, gt=0, description="A Secret changed within this is listed as recently changed."
    )
    session_key_pattern: str | None = Field(
        None,
        description="SCAN MATCH pattern of the login session keys in Redis (e.g."
        " `akig:session:*`); unset = session revocation refuses.",
    )
    password_reset_path: str = Field(
        "/api/admin/users/force-password-reset",
        description="Backend endpoint (POST) that forces a password reset for all users.",
    )
    password_reset_token: SecretStr = Field(
        SecretStr(""), description="Bearer token of that endpoint."
    )
    password_reset_token_secret_block: str | None = Field(
        None, description="Prefect Secret block holding that token."
    )
    egress_bytes_query: str | None = Field(
        None,
        description="PromQL giving egress bytes per user (label `user`) over the window;"
        " unset = that exfiltration signal is not configured.",
    )
    requests_query: str | None = Field(
        None,
        description="PromQL giving requests per user (label `user`) over the window; unset ="
        " not configured. Each is compared with the same query offset by a week (baseline).",
    )
    exfiltration_factor: float = Field(
        5.0, gt=1, description="A user above this multiple of their own baseline is flagged."
    )
