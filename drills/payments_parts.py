"""What the payments drill runs beside the harness: the sandbox backend and gateway processes.

Both are started as processes (`python -m sandbox.backend`, `python -m sandbox.gateway`),
as in a deployment, on loopback ports, their database made on the drill's private cluster,
their Redis keys under a prefix of their own (removed afterwards, with the runbook's key
ledger). Tokens are made per drill and never printed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from drills.procs import free_port, spawn, stop, wait_http
from sandbox.db import create_database, drop_database

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("RUNBOOKS_PLATFORM_REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASE = "drill_payments"
#: The backend's wait for a gateway answer (2 s default): a timed-out charge costs this much.
GATEWAY_TIMEOUT_S = 0.5


@dataclass(frozen=True)
class PaymentsSandbox:
    """Where the drill's payments backend and gateway answer, and their credentials."""

    backend_url: str
    gateway_url: str
    dsn: str
    key_prefix: str
    ledger_prefix: str
    payments_token: str
    gateway_key: str
    admin_token: str

    def api(self) -> httpx.Client:
        """The payments API as the checkout (drill traffic) calls it."""
        return httpx.Client(
            base_url=self.backend_url,
            headers={"Authorization": f"Bearer {self.payments_token}"},
            timeout=10,
        )

    def behaviour(self, mode: str, share: float = 1.0, **more: Any) -> dict[str, Any]:
        """Switch the gateway's behaviour (`PUT /admin/behaviour`); what it now says."""
        r = httpx.put(
            f"{self.gateway_url}/admin/behaviour",
            json={"mode": mode, "share": share, **more},
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=5,
        )
        r.raise_for_status()
        body: dict[str, Any] = r.json()
        return body

    def status(self) -> str:
        """The gateway's public status page: operational, degraded or major_outage."""
        r = httpx.get(f"{self.gateway_url}/status", timeout=5)
        r.raise_for_status()
        return str(r.json()["status"])

    def attempts(self, kind: str, result: str) -> float:
        """The backend's `akig_payment_attempts_total{kind, result}` now (its /metrics)."""
        r = httpx.get(f"{self.backend_url}/metrics", timeout=5)
        r.raise_for_status()
        for family in text_string_to_metric_families(r.text):
            for sample in family.samples:
                if sample.name == "akig_payment_attempts_total" and sample.labels == {
                    "kind": kind,
                    "result": result,
                }:
                    return float(sample.value)
        return 0.0

    def env(self) -> dict[str, str]:
        """The `RUNBOOKS_*` settings the payment-failure runbook needs to work on it."""
        return {
            "RUNBOOKS_PAYMENTS_URL": self.backend_url,
            "RUNBOOKS_PAYMENTS_TOKEN": self.payments_token,
            "RUNBOOKS_PAYMENTS_GATEWAY_URL": self.gateway_url,
            "RUNBOOKS_PAYMENTS_GATEWAY_TOKEN": self.gateway_key,
            "RUNBOOKS_PAYMENTS_TIMEOUT_S": "5",
            "RUNBOOKS_PAYMENTS_GATEWAY_TIMEOUT_S": "5",
            "RUNBOOKS_PAYMENTS_LEDGER_PREFIX": self.ledger_prefix,
            "RUNBOOKS_PAYMENTS_FAILED_STREAM_KEY": f"{self.key_prefix}payments:failed",
            "RUNBOOKS_REDIS_URL": REDIS_URL,
            # The failed-transactions view is read in the payments database (read only).
            "RUNBOOKS_PG_DSN": self.dsn,
        }


def _sandbox_env(base: dict[str, str], values: dict[str, str]) -> dict[str, str]:
    """The caller's environment without its `SANDBOX_*`, with the drill's."""
    env = {k: v for k, v in base.items() if not k.startswith(("SANDBOX_", "RUNBOOKS_"))}
    return {**env, **values, "PYTHONUNBUFFERED": "1"}


@contextlib.contextmanager
def running_payments(admin_dsn: str, workdir: Path) -> Iterator[PaymentsSandbox]:
    """Database, gateway and backend up; all stopped and removed (keys included) after."""
    workdir.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    with contextlib.ExitStack() as stack:
        dsn = create_database(admin_dsn, DATABASE, users=10, products=10, orders=10)
        stack.callback(drop_database, admin_dsn, DATABASE)
        sandbox = PaymentsSandbox(
            backend_url=f"http://127.0.0.1:{free_port()}",
            gateway_url=f"http://127.0.0.1:{free_port()}",
            dsn=dsn,
            key_prefix=f"drillpay{tag}:",
            ledger_prefix=f"runbooks:payments:drill{tag}:",
            payments_token=secrets.token_urlsafe(24),
            gateway_key=secrets.token_urlsafe(24),
            admin_token=secrets.token_urlsafe(24),
        )
        stack.callback(forget_keys, sandbox.key_prefix, sandbox.ledger_prefix)
        env = _sandbox_env(
            dict(os.environ),
            {
                "SANDBOX_DATABASE_DSN": dsn,
                "SANDBOX_REDIS_URL": REDIS_URL,
                "SANDBOX_KEY_PREFIX": sandbox.key_prefix,
                "SANDBOX_ADMIN_TOKEN": sandbox.admin_token,
                "SANDBOX_PAYMENTS_TOKEN": sandbox.payments_token,
                "SANDBOX_GATEWAY_URL": sandbox.gateway_url,
                "SANDBOX_GATEWAY_KEY": sandbox.gateway_key,
                "SANDBOX_GATEWAY_TIMEOUT_S": str(GATEWAY_TIMEOUT_S),
                "SANDBOX_LOG_FILE": str(workdir / "backend-access.log"),
                "SANDBOX_LOG_STDOUT": "false",
                # Few connections each: the pool drill fills the same private cluster.
                "SANDBOX_DB_POOL_SIZE": "3",
            },
        )
        for name, module, url in (
            ("payment gateway", "sandbox.gateway", sandbox.gateway_url),
            ("payments backend", "sandbox.backend", sandbox.backend_url),
        ):
            port = url.rsplit(":", 1)[1]
            proc = spawn(
                name,
                [sys.executable, "-m", module, "--port", port],
                workdir / f"{module.split('.')[1]}.log",
                env=env,
                cwd=ROOT,
            )
            stack.callback(stop, proc, 15)
            health = "/status" if module == "sandbox.gateway" else "/api/health"
            wait_http(proc, f"{url}{health}", 60)
        yield sandbox


def forget_keys(*prefixes: str) -> None:
    """Remove every Redis key under `prefixes` (the failed-queue stream, the key ledger)."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    with contextlib.suppress(redis.ConnectionError):
        for prefix in prefixes:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            for i in range(0, len(keys), 500):
                client.unlink(*keys[i : i + 500])
    client.close()
