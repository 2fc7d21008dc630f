"""The sandbox backend's settings, read from `SANDBOX_*` variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class SandboxSettings(BaseSettings):
    """One backend instance: its database, its Redis, its admin token, its release source."""

    model_config = SettingsConfigDict(env_prefix="SANDBOX_")

    database_dsn: str = Field(
        "postgresql://postgres@127.0.0.1:5432/rb_sandbox",
        description="The backend's own database (created by `sandbox.db.create_database`).",
    )
    db_pool_size: int = Field(10, ge=1, le=200, description="Connections in the backend's pool.")
    db_pool_wait_s: float = Field(
        2.0, gt=0, description="How long a request waits for a pooled connection (then 503)."
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="The backend's Redis.")
    key_prefix: str = Field("akig:", min_length=1, description="Prefix of every key it writes.")
    cache_ttl_s: int = Field(300, ge=1, description="TTL of cached reads, seconds.")
    admin_token: SecretStr | None = Field(
        None, description="Bearer token of /admin/*; unset = admin endpoints refuse everything."
    )
    release: str = Field("v1", description="The release when `release_source` is `fixed`.")
    release_source: Literal["fixed", "kube"] = Field(
        "fixed", description="`kube`: the image tag of the Deployment, polled from the API."
    )
    kube_url: str | None = Field(None, description="Kubernetes API server URL.")
    kube_token: SecretStr | None = Field(None, description="Bearer token for the API server.")
    kube_ca_file: Path | None = Field(None, description="CA bundle of the API server.")
    kube_namespace: str = Field("default", description="Namespace of the Deployment.")
    kube_deployment: str = Field("akig-backend", description="The Deployment whose tag we read.")
    kube_poll_s: float = Field(1.0, gt=0, description="Release poll period, seconds.")
    gzip: bool = Field(True, description="GZip responses (switchable at runtime via /admin).")
    log_file: Path | None = Field(
        None, description="Append the access log lines here (a kubelet serves this file)."
    )
    log_stdout: bool | None = Field(
        None,
        description="Access lines on stdout too; unset: only without `log_file` "
        "(`python -m sandbox.backend` sets it: a container's log is its stdout).",
    )
    payments_token: SecretStr | None = Field(
        None, description="Bearer token of /api/payments*; unset = those routes refuse (403)."
    )
    gateway_url: str | None = Field(
        None, description="The simulated payment gateway the backend charges through."
    )
    gateway_key: SecretStr | None = Field(
        None,
        description="The gateway's API key: the backend sends it, the gateway checks it"
        " (unset on the gateway = its /v1 API refuses everything).",
    )
    gateway_timeout_s: float = Field(
        2.0,
        gt=0,
        description="The backend's timeout per gateway call; the gateway's timeout modes"
        " sleep past it.",
    )
    gateway_latency_ms: float = Field(
        20.0, ge=0, le=10_000, description="Base latency of every gateway charge, ms."
    )
    idempotency_lock_s: float = Field(
        30.0,
        gt=0,
        description="A key locked longer than this counts as abandoned and is taken over.",
    )
    idempotency_key_ttl_s: int = Field(
        48 * 3600, ge=24 * 3600, description="How long idempotency keys are kept (>= 24 h)."
    )
