"""The payments runbook's read-only checks: the token, the gateway (status and a timed
probe), the failed-transactions queue (SQL view and Redis stream) and the payment lines of
the backend's logs (error classes counted, credentials scrubbed)."""

from __future__ import annotations

import re
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any, cast

import httpx
import redis
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.clients import gateway_http, payments_http, pg_connect, redis_client
from tasks.errors import TransientError
from tasks.kubernetes import TailLogsResult
from tasks.logs import scrub_secrets
from tasks.payments.api import Payment, check_token, gateway_status, list_failed
from tasks.retry import RETRY_READ
from tasks.settings import PaymentsSettings, PostgresSettings, RedisSettings

#: The failed-transactions view of the payments database (the backend's contract).
FAILED_VIEW_SQL = "SELECT count(*) AS depth, min(failed_at) AS oldest FROM failed_transactions"
#: What selects a payment line in the backend's logs.
PAYMENT_LINE = r"(?i)payment"

_ERROR_FIELD = re.compile(r"""(?i)\berror[=:]\s*["']?([A-Za-z_][\w.\-]{0,60})""")
_KEYWORDS: list[tuple[str, re.Pattern[str]]] = [
    ("gateway_outcome_unknown", re.compile(r"(?i)outcome.?unknown")),
    ("timeout", re.compile(r"(?i)time(d)?.?out")),
    ("card_declined", re.compile(r"(?i)declin")),
    ("rate_limited", re.compile(r"(?i)rate.?limit|\b429\b")),
    ("gateway_5xx", re.compile(r"(?i)status=5\d\d|\b50[0-4]\b")),
    ("connection", re.compile(r"(?i)connect(ion)?\s*(refused|reset|error)")),
]
_FAILURE = re.compile(r"(?i)\b(error|fail(ed|ure)?|declined|timed?.?out|unknown|rate.?limited)\b")


class PaymentLogCounts(BaseModel):
    """Payment lines in the logs, the failing ones by error class, one scrubbed sample."""

    lines: int
    failures: int
    classes: dict[str, int]
    sample: str


def error_class(line: str) -> str | None:
    """The error class of a failing payment line (`error=<class>` or a known keyword)."""
    if not _FAILURE.search(line) and not _ERROR_FIELD.search(line):
        return None
    found = _ERROR_FIELD.search(line)
    if found:
        return found[1]
    return next((name for name, rx in _KEYWORDS if rx.search(line)), "other")


def count_payment_errors(logs: TailLogsResult) -> PaymentLogCounts:
    """Count the failing payment lines by class; the sample is scrubbed of credentials."""
    lines = [scrub_secrets(line) for p in logs.logs for line in p.lines]
    classes: Counter[str] = Counter()
    sample = ""
    for line in lines:
        cls = error_class(line)
        if cls is not None:
            classes[cls] += 1
            sample = line[:200]
    return PaymentLogCounts(
        lines=len(lines), failures=sum(classes.values()), classes=dict(classes), sample=sample
    )


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="payments-token")
def payments_token_check(settings: PaymentsSettings | None = None) -> None:
    """A cheap authenticated read; `PaymentsAuthError` (never retried) on 401/403."""
    with payments_http(settings) as client:
        check_token(client)


class GatewayCheck(BaseModel):
    """The gateway's status page and a timed authenticated probe."""

    status: str
    status_ms: float
    probe_ok: bool
    probe_ms: float
    probe_error: str = ""

    @property
    def down(self) -> bool:
        """The status says major outage, or the probe could not reach it."""
        return self.status == "major_outage" or not self.probe_ok


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="payment-gateway")
def gateway_check(settings: PaymentsSettings | None = None) -> GatewayCheck:
    """`GET /status`, then a timed read of the charges API (connectivity and auth)."""
    with gateway_http(settings) as client:
        status = gateway_status(client)
        started = time.monotonic()
        error = ""
        try:
            resp = client.get("/v1/charges", params={"payment_ref": "runbook-probe"})
            if resp.status_code >= 400:
                error = f"HTTP {resp.status_code}"
        except httpx.HTTPError as exc:
            error = f"no answer ({type(exc).__name__})"
        elapsed = (time.monotonic() - started) * 1000
    return GatewayCheck(
        status=status.status,
        status_ms=round(status.elapsed_ms, 1),
        probe_ok=not error,
        probe_ms=round(elapsed, 1),
        probe_error=error,
    )


class QueueDepth(BaseModel):
    """The failed-transactions queue as one source sees it."""

    source: str
    depth: int
    oldest: datetime | None

    def oldest_age_s(self, now: datetime) -> float | None:
        """Seconds since the oldest entry failed."""
        return (now - self.oldest).total_seconds() if self.oldest else None


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="failed-queue-sql")
def failed_queue_sql(settings: PostgresSettings | None = None) -> QueueDepth:
    """Depth and oldest failure of the `failed_transactions` view, in a read-only transaction."""
    with pg_connect(settings, autocommit=False) as conn, conn.cursor() as cur:
        cur.execute("SET TRANSACTION READ ONLY")
        cur.execute(FAILED_VIEW_SQL)
        row = cur.fetchone()
        conn.rollback()
    assert row is not None
    oldest = row["oldest"]
    if isinstance(oldest, datetime) and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=UTC)
    return QueueDepth(source="SQL view failed_transactions", depth=int(row["depth"]), oldest=oldest)


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="failed-queue-stream")
def failed_queue_stream(
    settings: PaymentsSettings | None = None, redis_settings: RedisSettings | None = None
) -> QueueDepth:
    """Length of the failed-payments stream and the age of its oldest entry (its id's time)."""
    key = (settings or PaymentsSettings()).failed_stream_key
    try:
        client = redis_client(redis_settings)
        depth = int(cast(int, client.xlen(key)))
        first = cast(list[tuple[str, Any]], client.xrange(key, count=1))
    except redis.RedisError as exc:
        raise TransientError(f"Redis unreachable ({type(exc).__name__})") from None
    oldest = None
    if first:
        ms = int(str(first[0][0]).split("-")[0])
        oldest = datetime.fromtimestamp(ms / 1000, UTC)
    return QueueDepth(source=f"Redis stream {key}", depth=depth, oldest=oldest)


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="failed-payments")
def failed_payments(limit: int, settings: PaymentsSettings | None = None) -> list[Payment]:
    """Up to `limit` failed payments from the API (the plan pins their ids)."""
    with payments_http(settings) as client:
        return list_failed(client, limit)
