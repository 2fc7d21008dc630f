"""Drill `cert`: a TLS endpoint whose certificate expires in 2 days; probed, alerted, paged.

Fault: a real TLS server appears on a loopback port the blackbox exporter already probes,
presenting a leaf (under a drill CA the exporter trusts) that expires in 2 days. The probe's
`probe_ssl_earliest_cert_expiry` makes the shipped `CertificateExpiringInDays` (warning,
< 30 days) fire; Alertmanager sends the webhook; the drill route (the shipped one, matched
to the drill endpoint) runs `cert-expiry`, which finds the certificate `high` (<= 7 days)
and pages through `escalate`: team lead, the incident channel, the security team (Slack
sinks on loopback, `tests/fixtures/sinks.py`). The drill then plays the human who renews the
certificate: the server presents a fresh 90-day leaf without closing its port, so the alert
resolves because of the new certificate, never because the probe lost the endpoint.
"""

from __future__ import annotations

import contextlib
import ssl
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect.settings import PREFECT_API_URL, temporary_settings

from drills.base import Context, Drill, Outcome
from drills.blackbox import BLACKBOX, running_blackbox, scrape_config
from drills.evidence import (
    alert_run,
    alert_to_webhook,
    epoch,
    final_run,
    incident_figures,
    mark_first_task,
    parse_time,
    poll,
    seen,
)
from drills.procs import free_port
from drills.timeline import ALERT_TO_RUN, DrillFailed, Step, Target, Timeline
from drills.tls_endpoint import TlsEndpoint
from tests.fixtures.sinks import Sinks, World
from tests.fixtures.tls import CertFactory, Issued, server_context

ALERT = "CertificateExpiringInDays"
DAYS_LEFT = 2.0

STEPS = (
    *ALERT_TO_RUN,
    Step("page delivered", ("first task",)),
    Step("cert renewed", ("page delivered",)),
    Step("alert resolved", ("cert renewed",)),
)


def _context(leaf: Issued) -> ssl.SSLContext:
    return server_context(leaf.chain_pem(), leaf.key_pem)


class CertExpiring(Drill):
    """Certificate 2 days from expiry → probe → alert → `cert-expiry` → page → renewed."""

    name = "cert"
    title = f"TLS certificate expiring in {DAYS_LEFT:g} days (blackbox probe)"
    steps = STEPS
    targets = (
        Target("fault → page delivered", "fault injected", "page delivered", 20.0),
        Target("renewed → alert resolved", "cert renewed", "alert resolved", 10.0),
    )
    # The alert is the incident's end: recovery is the renewal (the drill's, at once).
    mttr = ("fault injected", "alert resolved")
    # Time compressed 60x, as in the pool drill: the shipped holds (10 min, 5 min) in s.
    binaries = (BLACKBOX,)
    holds = {f"{ALERT}{{severity=warning}}": "10s", f"{ALERT}{{severity=critical}}": "5s"}

    def __init__(self) -> None:
        self.pki = CertFactory()
        self.endpoint = TlsEndpoint(free_port())
        self.sinks = Sinks()
        self.world: World | None = None

    @property
    def target(self) -> str:
        """The endpoint as the probe, the alert and the runbook name it."""
        return f"127.0.0.1:{self.endpoint.port}"

    def stack_env(self, ctx: Context) -> dict[str, str]:
        return {
            # The endpoints the runbook scans (the shipped route passes no params): this one.
            "RUNBOOKS_TLS_ENDPOINTS": f'["{self.target}"]',
            "RUNBOOKS_TLS_FILES": "[]",
            "RUNBOOKS_ESCALATION_CONFIG_FILE": str(self._escalation_dir(ctx) / "escalation.yaml"),
        }

    def _escalation_dir(self, ctx: Context) -> Path:
        return ctx.workdir / "escalation"

    def prepare(self, ctx: Context) -> None:
        self._escalation_dir(ctx).mkdir(exist_ok=True)

    def scrape(self, ctx: Context, parts: contextlib.ExitStack) -> list[dict[str, Any]]:
        ca = ctx.workdir / "drill-ca.pem"
        ca.write_bytes(self.pki.root.cert_pem)
        exporter = parts.enter_context(running_blackbox(ctx.workdir / "blackbox", ca))
        return [scrape_config("blackbox-tls", exporter, [self.target])]

    def routes(self, ctx: Context) -> list[dict[str, Any]]:
        # The shipped route (`cert-expiry`, auto, read-only), scoped to the drill endpoint.
        return [
            {
                "alertname": ALERT,
                "match": {"instance": self.target},
                "runbook": "cert-expiry",
                "mode": "auto",
                "cooldown": "1h",
                "params": {},
            }
        ]

    def inject(self, ctx: Context, timeline: Timeline) -> None:
        stack, mon = ctx.running
        # The sinks' blocks live in the stack's Prefect (the escalation file names them).
        with temporary_settings(updates={PREFECT_API_URL: stack.api_url}):
            self.world = World(self.sinks, self._escalation_dir(ctx))
        probed = f'probe_success{{instance="{self.target}"}} == 0'
        if poll(lambda: mon.query(probed) or None, 30) is None:
            raise DrillFailed("fault injected", f"the blackbox probe of {self.target} not seen")
        leaf = self.pki.leaf(days_left=DAYS_LEFT)
        self.endpoint.start(_context(leaf))
        at = datetime.now(UTC)
        not_after = leaf.cert.not_valid_after_utc.isoformat(timespec="seconds")
        timeline.mark("fault injected", at, "drill", f"{self.target} up, not after {not_after}")
        ctx.say(f"cert: {self.target} serves a leaf expiring {not_after} ({DAYS_LEFT:g} days)")

    def observe(self, ctx: Context, timeline: Timeline, outcome: Outcome) -> None:
        stack, mon = ctx.running

        def ours() -> list[dict[str, Any]]:
            alerts = mon.alertmanager_alerts(ALERT)
            return [a for a in alerts if a["labels"].get("instance") == self.target]

        alert = alert_to_webhook(timeline, stack.journal, ours, ALERT, 60, "severity")
        fp = str(alert["fingerprint"])
        page = poll(self._first_page, 60, 0.05)
        if page is None:
            raise DrillFailed("page delivered", "no sink received a page within 60 s")
        contact, at = page
        # The human's part, at once: the renewed certificate (90 days) is served.
        self.endpoint.renew(_context(self.pki.leaf(days_left=90)))
        timeline.mark("cert renewed", datetime.now(UTC), "drill", "a 90-day leaf, same port")
        timeline.mark("page delivered", at, "sink", contact)
        run = alert_run(stack.api_url, fp)
        if run is None:
            raise DrillFailed("first task", f"no flow run tagged alert:{fp}")
        done = poll(lambda: final_run(stack.api_url, run["id"]), 60, 0.25)
        if done is None:
            raise DrillFailed("first task", f"run {run['name']} not final within 60 s")
        self._mark_run(ctx, timeline, done)
        gone = poll(lambda: seen(stack.journal, fp, "resolved_ts"), 60)
        if gone is None:
            raise DrillFailed("alert resolved", "no resolved notification within 60 s")
        ends = parse_time(gone["ends_at"]) if gone.get("ends_at") else epoch(gone["resolved_ts"])
        days = mon.query(f'(probe_ssl_earliest_cert_expiry{{instance="{self.target}"}}'
                         " - time()) / 86400")  # fmt: skip
        left = f"probe now reads {float(days[0]['value'][1]):.1f} days" if days else "no probe"
        timeline.mark("alert resolved", ends, "endsAt of the resolved webhook", left)
        outcome.record = incident_figures(stack.api_url, fp)

    def _first_page(self) -> tuple[str, datetime] | None:
        """The first payload a sink accepted: its contact and when it arrived."""
        assert self.world is not None
        got = [
            (req.at, name)
            for name, sink in self.world.sink.items()
            for req in list(sink.requests)
            if req.delivered
        ]
        if not got:
            return None
        at, name = min(got)
        return name, epoch(at)

    def _mark_run(self, ctx: Context, timeline: Timeline, run: dict[str, Any]) -> None:
        """First task from the run's task runs; its end state and the pages sent, said."""
        stack, _ = ctx.running
        mark_first_task(timeline, stack.api_url, run)
        state = run["state"]
        assert self.world is not None
        ctx.say(
            f"cert: run {run['name']} ended {state['name']} ({(state.get('message') or '')[:160]});"
            f" pages delivered per contact: {self.world.counts()}"
        )

    def cleanup(self, ctx: Context) -> None:
        self.endpoint.stop()
        for sink in self.sinks.started:
            sink.stop()
