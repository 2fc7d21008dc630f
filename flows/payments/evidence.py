"""The evidence of `payment-failure`, gathered all at once (a source that fails is a row
`unavailable`, never a crash), after one cheap authenticated read: a missing or wrong token
stops the run before anything is planned, with a clear error and nothing retried."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect.futures import PrefectFuture

from flows.common import Unavailable, collect
from flows.payments.params import PaymentFailureParams, amounts_text
from flows.spec import Check, Verdict
from tasks.kubernetes import (
    RolloutHistory,
    TailLogsResult,
    began_after_rollout,
    current_and_previous,
    rollout_history,
    tail_logs,
)
from tasks.payments.api import Payment
from tasks.payments.checks import (
    PAYMENT_LINE,
    GatewayCheck,
    QueueDepth,
    count_payment_errors,
    failed_payments,
    failed_queue_sql,
    failed_queue_stream,
    gateway_check,
    payments_token_check,
)
from tasks.settings import KubernetesSettings

PASS, FAIL = Verdict.PASS, Verdict.FAIL


@dataclass
class Findings:
    """The evidence table and the failed payments it found."""

    checks: list[Check]
    failed: list[Payment]
    onset: datetime | None
    gateway_down: bool
    queue_depth: int | None = None
    notes: list[str] = field(default_factory=list)

    def amounts(self) -> dict[str, int]:
        """The failed payments' amounts by currency (minor units)."""
        out: dict[str, int] = {}
        for p in self.failed:
            out[p.currency] = out.get(p.currency, 0) + p.amount
        return out


def gather(params: PaymentFailureParams) -> dict[str, Any]:
    """The token first (fails the run on 401/403), then every check at once."""
    payments_token_check()
    k8s = KubernetesSettings()
    futures: dict[str, PrefectFuture[Any]] = {
        "failed": failed_payments.submit(params.max_payments),
        "gateway": gateway_check.submit(),
        "sql": failed_queue_sql.submit(),
        "stream": failed_queue_stream.submit(),
        "logs": tail_logs.submit(
            k8s.backend_deployment, lines=params.log_lines, grep=PAYMENT_LINE, namespace=None
        ),
        "rollout": rollout_history.submit(k8s.backend_deployment, k8s.namespace),
    }
    return {name: collect(fut) for name, fut in futures.items()}


def _ago(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "none"
    return f"{when:%H:%M:%S} UTC ({(now - when).total_seconds():.0f} s ago)"


def classify(params: PaymentFailureParams, got: dict[str, Any], now: datetime) -> Findings:
    """Rows with verdicts from the checks' results."""
    rows: list[Check] = []

    def unavailable(item: str, u: Unavailable) -> None:
        rows.append(Check(item=item, observed="-", verdict=Verdict.UNAVAILABLE, detail=u.reason))

    failed: list[Payment] = []
    if isinstance(got["failed"], Unavailable):
        unavailable("failed payments (API)", got["failed"])
    else:
        failed = got["failed"]
        amounts: dict[str, int] = {}
        for p in failed:
            amounts[p.currency] = amounts.get(p.currency, 0) + p.amount
        rows.append(
            Check(
                item="failed payments (API)",
                threshold=f"0 (reads at most {params.max_payments})",
                observed=f"{len(failed)} failed: {amounts_text(amounts)}",
                verdict=FAIL if failed else PASS,
                detail=", ".join(p.id for p in failed[:5]),
            )
        )
    gateway_down = _gateway_row(rows, got["gateway"], unavailable)
    depths = [_queue_row(rows, got[name], now, unavailable) for name in ("sql", "stream")]
    _logs_row(rows, got["logs"], unavailable)
    times = [d.oldest for d in depths if d and d.oldest] + [
        p.failed_at for p in failed if p.failed_at
    ]
    onset = min(times) if times else None
    _rollout_row(rows, got["rollout"], onset, params, now, unavailable)
    depth = next((d.depth for d in depths if d is not None), None)
    return Findings(
        checks=rows, failed=failed, onset=onset, gateway_down=gateway_down, queue_depth=depth
    )


def _gateway_row(rows: list[Check], gw: GatewayCheck | Unavailable, unavailable: Any) -> bool:
    if isinstance(gw, Unavailable):
        unavailable("payment gateway", gw)
        return False  # unknown is not "down": the retry's failure-rate stop still guards
    rows.append(
        Check(
            item="payment gateway",
            threshold="operational; probe answers",
            observed=f"status {gw.status} ({gw.status_ms:.0f} ms); probe "
            + (f"ok in {gw.probe_ms:.0f} ms" if gw.probe_ok else f"FAILED ({gw.probe_error})"),
            verdict=FAIL if gw.down or gw.status != "operational" else PASS,
        )
    )
    return gw.down


def _queue_row(
    rows: list[Check], q: QueueDepth | Unavailable, now: datetime, unavailable: Any
) -> QueueDepth | None:
    item = "failed-transactions queue"
    if isinstance(q, Unavailable):
        unavailable(item, q)
        return None
    rows.append(
        Check(
            item=f"{item} ({q.source})",
            threshold="0",
            observed=f"{q.depth} queued; oldest {_ago(q.oldest, now)}",
            verdict=FAIL if q.depth else PASS,
        )
    )
    return q


def _logs_row(rows: list[Check], logs: TailLogsResult | Unavailable, unavailable: Any) -> None:
    item = "backend logs (payment lines)"
    if isinstance(logs, Unavailable):
        unavailable(item, logs)
        return
    n = count_payment_errors(logs)
    classes = ", ".join(f"{k} {v}" for k, v in sorted(n.classes.items(), key=lambda kv: -kv[1]))
    rows.append(
        Check(
            item=item,
            observed=f"{n.failures} of {n.lines} payment line(s) failing"
            + (f": {classes}" if classes else ""),
            verdict=FAIL if n.failures else PASS,
            detail=n.sample,  # scrubbed of credentials
        )
    )


def _rollout_row(
    rows: list[Check],
    history: RolloutHistory | Unavailable,
    onset: datetime | None,
    params: PaymentFailureParams,
    now: datetime,
    unavailable: Any,
) -> None:
    item = "recent rollouts"
    if isinstance(history, Unavailable):
        unavailable(item, history)
        return
    latest, prev = current_and_previous(history.revisions)
    if latest is None:
        rows.append(Check(item=item, observed=f"revision {history.current_revision}", verdict=PASS))
        return
    since = latest.became_current
    window = timedelta(minutes=params.rollout_window_minutes)
    suspect = prev is not None and began_after_rollout(onset, since, window)
    detail = f"previous: revision {prev.revision}" if prev else "no previous revision"
    if suspect and onset and since:
        detail = (
            f"the first failure ({onset:%H:%M:%S} UTC) came "
            f"{(onset - since).total_seconds():.0f} s after revision {latest.revision} became "
            f"current: a release suspect; {detail}"
        )
    rows.append(
        Check(
            item=item,
            threshold=f"none within {params.rollout_window_minutes:g} min before the first failure",
            observed=f"revision {latest.revision} ({', '.join(latest.images)}) current since "
            f"{_ago(since, now)}",
            verdict=FAIL if suspect else PASS,
            detail=detail,
        )
    )


def measure(params: PaymentFailureParams) -> Findings:
    """Gather and classify, now."""
    return classify(params, gather(params), datetime.now(UTC))
