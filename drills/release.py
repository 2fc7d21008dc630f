"""Drill `release`: a bad release, approved through its signed link, undone by the alert's run.

Fault: Deployment `akig-backend` of the sandbox platform is rolled to `:v2` (the backend
follows its image tag; `:v2` answers 30 % of /api with 500) under steady traffic. The drill
Prometheus scrapes the backend (job `akig-backend`) and fires the shipped `HighErrorRate`;
its run (`high-error-rate`, route `mode: approve` as shipped) gathers the evidence,
classifies scenario D (a rollout just before the 5xx), plans the rollout undo and pauses for
approval, paging the on-call with signed links. The drill takes the Approve link from the
page the on-call's local sink received, opens it, checks the plan and confirms with a
reason; the same run undoes the rollout, verifies the ratio and the alert resolves.
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
from drills.release_parts import Pages, channel_blocks, follow_link, platform_and_pages
from drills.timeline import ALERT_TO_RUN, DrillFailed, Step, Target, Timeline
from tests.fixtures.platform import JOB, Platform

ALERT = "HighErrorRate"
RUNBOOK = "high-error-rate"
#: The undo task (`kubectl rollout undo`) and the verification's query, as the run names them.
UNDO, CHECK = "apply-rollback", "prometheus-5xx-by-route"

STEPS = (
    *ALERT_TO_RUN,
    Step("page received", ("first task",)),
    Step("approval", ("page received",)),
    Step("action done", ("approval",)),
    Step("verify passed", ("action done",)),
    Step("alert resolved", ("action done",)),
)


class BadRelease(Drill):
    """`:v2` rolled out → HighErrorRate → scenario D → approved by link → rollout undone."""

    name = "release"
    title = "bad release (akig-backend :v2), approved through the on-call's signed link"
    steps = STEPS
    targets = (
        Target(
            "fault → recovered, less the approval wait",
            "fault injected",
            "verify passed",
            30.0,
            less=("page received", "approval"),
        ),
    )
    mttr = ("fault injected", "verify passed")
    # Time compressed 60x as in the pool drill: the shipped 1 min hold becomes 1 s. The
    # expression (a 1 min rate) is as shipped, so the alert resolves about 50 s after the
    # undo, once the bad minute has slid out of the window (docs/drills.md).
    holds = {ALERT: "1s"}

    def __init__(self) -> None:
        self.platform: Platform | None = None
        self.pages: Pages | None = None
        self.during = contextlib.ExitStack()
        #: The on-call's first channel: the page whose Approve link the drill follows.
        self.on_call = "on-call-pagerduty"

    @contextlib.contextmanager
    def _parts(self, ctx: Context) -> Iterator[None]:
        with platform_and_pages(ctx.cluster.admin_dsn) as (platform, pages):
            self.platform, self.pages = platform, pages
            try:
                yield
            finally:
                self.platform = self.pages = None

    def parts(self, ctx: Context) -> contextlib.AbstractContextManager[object]:
        ctx.say("release: starting the sandbox platform (Kubernetes API, kubelet, backend)")
        return self._parts(ctx)

    def _running(self) -> tuple[Platform, Pages]:
        assert self.platform is not None and self.pages is not None
        return self.platform, self.pages

    def scrape(self, ctx: Context, parts: contextlib.ExitStack) -> list[dict[str, Any]]:
        platform, _ = self._running()
        target = platform.backend.url.split("://", 1)[1]
        return [{"job_name": JOB, "static_configs": [{"targets": [target]}]}]

    def stack_env(self, ctx: Context) -> dict[str, str]:
        platform, _ = self._running()
        env = dict(platform.env)
        # The runbook reads the Prometheus that alerts (the drill's), and the pool usage of
        # the cluster the backend's database lives on (the same DSN the pool drill gives).
        env["RUNBOOKS_PROMETHEUS_URL"] = ctx.prometheus_url
        env["RUNBOOKS_PG_DSN"] = ctx.cluster.admin_dsn
        return env

    def routes(self, ctx: Context) -> list[dict[str, Any]]:
        return [
            {
                "alertname": ALERT,
                "match": {"job": JOB},
                "runbook": RUNBOOK,
                "mode": "approve",  # as shipped: the on-call approves the undo
                "cooldown": "10m",
                # The recovery is judged over the last 5 s (30 s shipped): 5 scrapes.
                "params": {"verify_window": "5s", "verify_timeout_s": 60},
            }
        ]

    def inject(self, ctx: Context, timeline: Timeline) -> None:
        platform, pages = self._running()
        stack, mon = ctx.running
        blocks, self.on_call = channel_blocks(ctx.env)
        pages.start(blocks)
        pages.save_blocks(stack.api_url)
        self.during.enter_context(platform.traffic())
        ratio = f'sum(rate(http_requests_total{{job="{JOB}",route=~"/api/.*"}}[1m]))'
        if poll(lambda: mon.query(ratio) or None, 30, 0.25) is None:
            raise DrillFailed("fault injected", "no /api traffic in the drill Prometheus")
        started = datetime.now(UTC)
        platform.roll_out("v2", 2)
        took = (datetime.now(UTC) - started).total_seconds()
        timeline.mark("fault injected", started, "drill", f":v1 -> :v2 rolled out in {took:.2f} s")
        ctx.say(f"release: akig-backend rolled to :v2 ({took:.2f} s); traffic running")

    def observe(self, ctx: Context, timeline: Timeline, outcome: Outcome) -> None:
        stack, mon = ctx.running
        platform, pages = self._running()

        def ours() -> list[dict[str, Any]]:
            return [a for a in mon.alertmanager_alerts(ALERT) if a["labels"].get("job") == JOB]

        alert = alert_to_webhook(timeline, stack.journal, ours, ALERT, 60)
        fp = str(alert["fingerprint"])
        run = poll(lambda: alert_run(stack.api_url, fp), 20)
        if run is None:
            raise DrillFailed("first task", f"no flow run tagged alert:{fp}")
        link = poll(lambda: pages.approve_link(self.on_call), 60, 0.05)
        if link is None:
            ended = final_run(stack.api_url, run["id"])
            why = f"run ended {ended['state']['name']}" if ended else "no page within 60 s"
            raise DrillFailed("page received", f"no Approve link reached the on-call: {why}")
        timeline.mark("page received", datetime.now(UTC), "the on-call's sink", self.on_call)
        followed = follow_link(
            link, "drill: :v2 is the bad release, undo it", "rollback deployment/akig-backend"
        )
        timeline.mark("approval", datetime.now(UTC), "receiver: confirm answered", followed.outcome)
        ctx.say(f"release: the page's plan: {followed.plan}; {followed.answered_with}")
        done = poll(lambda: final_run(stack.api_url, run["id"]), 120, 0.25)
        if done is None:
            raise DrillFailed("verify passed", f"run {run['name']} not final within 120 s")
        self._mark_run(ctx, timeline, done)
        image = platform.apps.read_namespaced_deployment("akig-backend", "default")
        now = image.spec.template.spec.containers[0].image
        if not str(now).endswith(":v1"):
            raise DrillFailed("action done", f"akig-backend runs {now}, not :v1")
        mark_resolved(timeline, stack.journal, fp, 120)
        outcome.record = incident_figures(stack.api_url, fp)

    def _mark_run(self, ctx: Context, timeline: Timeline, run: dict[str, Any]) -> None:
        """First task, the undo, the verification: from the run's task runs."""
        stack, _ = ctx.running
        started = mark_first_task(timeline, stack.api_url, run)
        ctx.say("release: run tasks: " + task_offsets(timeline.t0, started))
        undo = [t for t in started if t["name"].startswith(UNDO)]
        state = run["state"]
        if not undo or undo[0]["state"]["type"] != "COMPLETED" or not undo[0]["end_time"]:
            reason = f"run ended {state['name']}: {state.get('message') or 'no rollout undo'}"
            raise DrillFailed("action done", reason)
        undo_end = parse_time(undo[0]["end_time"])
        timeline.mark("action done", undo_end, "Prefect", undo[0]["name"])
        checks = [
            t for t in started if t["name"] == CHECK and parse_time(t["start_time"]) >= undo_end
        ]
        if state["type"] != "COMPLETED" or not checks or not checks[-1].get("end_time"):
            reason = f"run ended {state['name']}: {state.get('message') or 'no verification'}"
            raise DrillFailed("verify passed", reason)
        last = checks[-1]
        timeline.mark("verify passed", parse_time(last["end_time"]), "Prefect", last["name"])

    def cleanup(self, ctx: Context) -> None:
        self.during.close()  # the traffic stops
