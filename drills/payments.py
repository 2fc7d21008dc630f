"""Drill `payments`: the gateway fails, failed payments pile up, `payment-failure` retries them.

Fault: the sandbox backend and its payment gateway run as processes; a checkout creates
payments at a steady rate (`POST /api/payments`, one `Idempotency-Key` each). The gateway
is switched to `fails` (5xx, nothing charged): every payment fails and joins the
failed-transactions queue. The drill Prometheus scrapes the backend's `/metrics` every 1 s
(job `akig-payments`); the shipped `PaymentFailuresHigh` fires; Alertmanager sends it to
the receiver, whose drill route (`mode: auto`, scoped to the drill's job) starts
`payment-failure`. When the alert fires the gateway comes back flaky (it charges, then
times out, for half the charges: `drills.payments_recovery`) until the run's retries met
that, then `ok`. The run checks, pages the payments on-call (a local sink), retries the
failed payments (one pinned key per payment, the same key again after an unknown outcome)
and reconciles. The drill then reads the ledgers itself: every payment failed at the alert
ended succeeded with exactly one gateway charge (or failed with a reason: the declined
cards), no payment has two charges, the backend's and the gateway's charges agree. Then
the alert resolves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from drills.base import Context, Drill, Outcome
from drills.evidence import (
    alert_run,
    alert_to_webhook,
    final_run,
    incident_figures,
    mark_first_task,
    mark_resolved,
    parse_time,
    poll,
    task_offsets,
)
from drills.monitoring import compressed_hold
from drills.payments_ledger import all_payments, verdict
from drills.payments_pages import first_delivery, topic_blocks
from drills.payments_parts import PaymentsSandbox, running_payments
from drills.payments_recovery import Recovery
from drills.payments_traffic import Checkout
from drills.release_parts import Pages, channel_blocks
from drills.timeline import ALERT_TO_RUN, DrillFailed, Step, Target, Timeline

ALERT = "PaymentFailuresHigh"
RUNBOOK = "payment-failure"
JOB = "akig-payments"
#: The run's retry batches and its reconciliation, as the run names its task runs.
RETRY, RECONCILE = "retry-batch-", "reconcile-payments"
#: The share of charges the recovering gateway charges, then answers too late for.
FLAKY_SHARE = 0.5
#: Cards the gateway declines (customers `cus_decline*`): they must end failed, with a reason.
DECLINED = 3

STEPS = (
    *ALERT_TO_RUN,
    Step("gateway flaky", ("alert firing",)),
    Step("page delivered", ("first task",)),
    Step("gateway ok", ("gateway flaky",)),
    Step("action done", ("first task",)),
    Step("verify passed", ("action done",)),
    Step("alert resolved", ("action done",)),
)


class PaymentFailures(Drill):
    """Gateway fails → failed queue → PaymentFailuresHigh → retried once each → resolved."""

    name = "payments"
    title = "payment gateway failing (failed payments queued), retried without a double charge"
    steps = STEPS
    targets = (
        Target("fault → payments recovered", "fault injected", "verify passed", 30.0),
        Target("fault → alert resolved", "fault injected", "alert resolved", 90.0),
    )
    mttr = ("fault injected", "verify passed")
    # Time compressed 60x as in the other drills: the shipped hold, minutes read as seconds.
    holds = {ALERT: compressed_hold(ALERT)}

    def __init__(self) -> None:
        self.sandbox: PaymentsSandbox | None = None
        self.checkout: Checkout | None = None
        #: The payments in the failed queue when the alert fired: the run's work.
        self.failed_at_alert: list[str] = []
        self.recovery: Recovery | None = None
        self.pages = Pages()
        #: The contact of topic `payments` and its blocks (whose sinks must get the page).
        self.on_call: tuple[str, list[str]] = ("", [])

    @contextlib.contextmanager
    def _parts(self, ctx: Context) -> Iterator[None]:
        with running_payments(ctx.cluster.admin_dsn, ctx.workdir / "payments") as sandbox:
            self.sandbox = sandbox
            try:
                yield
            finally:
                self.sandbox = None

    def parts(self, ctx: Context) -> contextlib.AbstractContextManager[object]:
        ctx.say("payments: starting the sandbox backend and payment gateway (processes)")
        return self._parts(ctx)

    def _running(self) -> PaymentsSandbox:
        assert self.sandbox is not None
        return self.sandbox

    def scrape(self, ctx: Context, parts: contextlib.ExitStack) -> list[dict[str, Any]]:
        target = self._running().backend_url.split("://", 1)[1]
        return [{"job_name": JOB, "static_configs": [{"targets": [target]}]}]

    def stack_env(self, ctx: Context) -> dict[str, str]:
        return self._running().env()

    def routes(self, ctx: Context) -> list[dict[str, Any]]:
        return [
            {
                "alertname": ALERT,
                "match": {"job": JOB},
                "runbook": RUNBOOK,
                "mode": "auto",  # the drill's own backend only (the shipped route approves)
                "cooldown": "10m",
                # Caps sized to the drill: a few dozen payments of at most 200 EUR each.
                "params": {"max_payments": 500, "max_amount": 5_000_000},
            }
        ]

    def inject(self, ctx: Context, timeline: Timeline) -> None:
        sandbox = self._running()
        stack, mon = ctx.running
        # The stack's contacts page through local sinks (before the fault: saving takes time).
        blocks, _ = channel_blocks(ctx.env)
        self.pages.start(blocks)
        self.pages.save_blocks(stack.api_url)
        self.on_call = topic_blocks(ctx.env)
        self.checkout = Checkout(sandbox.api)
        self.checkout.start()
        paid = f'sum(akig_payment_attempts_total{{job="{JOB}",result="succeeded"}}) > 0'
        if poll(lambda: mon.query(paid) or None, 30, 0.25) is None:
            raise DrillFailed("fault injected", "no payment succeeded in the drill Prometheus")
        started = datetime.now(UTC)
        sandbox.behaviour("fails")
        with sandbox.api() as api:
            declined = [
                self.checkout.pay(api, f"cus_decline_drill_{i}", 4_200, retries=0)
                for i in range(DECLINED)
            ]
        timeline.mark(
            "fault injected",
            started,
            "drill",
            f"gateway mode fails (5xx, nothing charged); checkout {self.checkout.rate:g}/s;"
            f" {DECLINED} more from cards the gateway declines (answered {', '.join(declined)})",
        )
        ctx.say(f"payments: the gateway fails every charge; status page: {sandbox.status()}")

    def observe(self, ctx: Context, timeline: Timeline, outcome: Outcome) -> None:
        stack, mon = ctx.running
        sandbox = self._running()
        assert self.checkout is not None

        def ours() -> list[dict[str, Any]]:
            return [a for a in mon.alertmanager_alerts(ALERT) if a["labels"].get("job") == JOB]

        def firing() -> list[dict[str, Any]]:
            alerts = mon.prometheus_alerts(ALERT)
            return [a for a in alerts if a["labels"].get("job") == JOB and a["state"] == "firing"]

        # The gateway comes back the moment Prometheus fires, before the run starts: flaky
        # (charges, then times out, for a share) until the run's retries met it, then ok.
        if poll(lambda: firing() or None, 60, 0.05) is None:
            raise DrillFailed("alert firing", f"{ALERT} not firing in Prometheus within 60 s")
        recovery = self.recovery = Recovery(sandbox, self.checkout, FLAKY_SHARE)
        recovery.begin()
        if recovery.flaky_at is None:
            raise DrillFailed("gateway flaky", f"gateway not switched: {recovery.error}")
        self.failed_at_alert = recovery.failed_at_alert
        timeline.mark(
            "gateway flaky",
            recovery.flaky_at,
            "drill",
            f"gateway mode charge_then_timeout for {FLAKY_SHARE:.0%} of charges;"
            f" {len(self.failed_at_alert)} payments in the failed queue; checkout holds",
        )
        ctx.say(
            f"payments: gateway flaky (charges, then times out, for {FLAKY_SHARE:.0%});"
            f" failed queue: {len(self.failed_at_alert)}"
        )
        alert = alert_to_webhook(timeline, stack.journal, ours, ALERT, 10)
        fp = str(alert["fingerprint"])
        run = poll(lambda: alert_run(stack.api_url, fp), 20)
        if run is None:
            raise DrillFailed("first task", f"no flow run tagged alert:{fp}")
        done = poll(lambda: final_run(stack.api_url, run["id"]), 120, 0.25)
        if done is None:
            raise DrillFailed("verify passed", f"run {run['name']} not final within 120 s")
        recovery.finish()
        if recovery.ok_at is None:
            raise DrillFailed("gateway ok", f"gateway not back to ok: {recovery.error}")
        met = recovery.unknown_met()
        timeline.mark(
            "gateway ok",
            recovery.ok_at,
            "drill",
            f"gateway mode ok; the run's retries met {met} charged-then-timed-out answer(s)",
        )
        self._mark_run(ctx, timeline, done)
        contact, channels = self.on_call
        page = poll(lambda: first_delivery(self.pages, channels), 10)
        if page is None:
            raise DrillFailed("page delivered", f"{contact} ({', '.join(channels)}) got no page")
        timeline.mark("page delivered", page[1], "sink", f"{contact} ({page[0]})")
        self._check_ledgers(ctx)
        mark_resolved(timeline, stack.journal, fp, 120)
        outcome.record = incident_figures(stack.api_url, fp)

    def _mark_run(self, ctx: Context, timeline: Timeline, run: dict[str, Any]) -> None:
        """First task, the retries, the reconciliation: from the run's task runs."""
        stack, _ = ctx.running
        started = mark_first_task(timeline, stack.api_url, run)
        ctx.say("payments: run tasks: " + task_offsets(timeline.t0, started))
        retries = [t for t in started if t["name"].startswith(RETRY)]
        state = run["state"]
        if not retries or any(t["state"]["type"] != "COMPLETED" for t in retries):
            reason = f"run ended {state['name']}: {state.get('message') or 'no retries'}"
            raise DrillFailed("action done", reason)
        last = max(retries, key=lambda t: t["end_time"])
        retried = parse_time(last["end_time"])
        timeline.mark("action done", retried, "Prefect", last["name"])
        checks = [
            t
            for t in started
            if t["name"].startswith(RECONCILE) and parse_time(t["start_time"]) >= retried
        ]
        if state["type"] != "COMPLETED" or not checks or not checks[-1].get("end_time"):
            reason = f"run ended {state['name']}: {state.get('message') or 'no reconciliation'}"
            raise DrillFailed("verify passed", reason)
        timeline.mark(
            "verify passed", parse_time(checks[-1]["end_time"]), "Prefect", checks[-1]["name"]
        )

    def _check_ledgers(self, ctx: Context) -> None:
        """Each payment failed at the alert charged once or failed with a reason; none twice."""
        sandbox = self._running()
        assert self.checkout is not None
        if not self.failed_at_alert:
            raise DrillFailed("action done", "no payment was in the failed queue at the alert")
        with self.checkout.quiet():  # no payment half made (charged, not yet recorded)
            mine = verdict(sandbox.dsn, self.failed_at_alert)
            everything = verdict(sandbox.dsn, all_payments(sandbox.dsn))
        # The ledger-wide lines (doubles, one-sided charges) come in both: said once.
        problems = list(dict.fromkeys(mine.problems() + everything.problems()))
        if problems:
            more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
            raise DrillFailed("verify passed", "; ".join(problems[:5]) + more)
        if mine.by_retry == 0:
            raise DrillFailed("action done", "no failed payment succeeded under the run's keys")
        declined = mine.by_status.get("failed", 0)
        ctx.say(
            f"payments: of {len(mine.payments)} failed at the alert"
            f" ({mine.amount('succeeded') + mine.amount('failed')} EUR cents),"
            f" {mine.by_status.get('succeeded', 0)} succeeded"
            f" ({mine.amount('succeeded')} cents; {mine.by_retry} under the run's keys),"
            f" {declined} still failed with a reason"
            f" (declined); gateway charges per payment at most {everything.most_charges}"
            f" over all {len(everything.payments)} payments; backend and gateway agree"
        )

    def cleanup(self, ctx: Context) -> None:
        if self.recovery is not None:
            self.recovery.finish()
            self.recovery = None
        self.pages.stop()
        if self.checkout is not None:
            self.checkout.stop()
            self.checkout = None
        if self.sandbox is not None:
            with contextlib.suppress(Exception):  # the gateway may be gone already
                self.sandbox.behaviour("ok")
