"""Runbook `system-outage`: the on-call runbook's "Complete System Outage".

Trigger: alert `AkigUnreachable` (the public health URL failing from a blackbox probe for
1 min, or every backend target down; route `mode: approve`), or by hand from the Prefect UI.

Check: the check cascade (`flows.outage.cascade.run_cascade`), seven layers in the runbook's
order, each a task bounded by its own timeout and checked at once: DNS, the load balancer /
ingress endpoint (TCP, TLS, HTTP timed), the ingress controller, Kubernetes (API, Nodes,
pods not Running/Ready in all namespaces), the backend pods, the database (connect,
`SELECT 1`, replication lag), the external dependencies. The first broken layer is named
the likely cause, every later one "downstream of" it. Then the cluster's events from all
namespaces, newest last (`kubectl get events --sort-by=.lastTimestamp`), and the
disaster-recovery readiness (`flows/outage/dr.py`: WAL archive and base backup age, Redis
persistence, the five-step checklist artifact; read only). A broken layer pages critical
(topic platform) at once, with the run's link.

May change: `kubectl rollout restart` of the backend, then of the frontend Deployment
(names from settings), with the existing restart semantics (`restartedAt` pinned when
planned, idempotent), only when a restart can help: the likely cause is the backend, or
the endpoint with the ingress, cluster, backend and database all answering. Never when DNS,
the ingress, the cluster, the database or a dependency is the cause: the plan says why and
nobody is asked (`flows/outage/recovery.py`).

Safety limits: dry run by default (the restarts go to the API server as server-side dry
runs); otherwise an approval (`unless-auto`); an alert's run pauses for it (`mode:
approve`). Under the target lock (`k8s:<ns>/<backend>+<frontend>`, then the backend's own
`k8s:<ns>/<backend>` that the other runbooks changing it take) the cascade runs again
and only an approved restart still called for is made (none when the platform answers
again). Staggered: the backend's rollout finishes, `restart_stagger_s` passes, then the
frontend restarts, so the database never sees both reconnect waves at once.

Verify: the health URL from outside through the endpoint (`endpoint_url`; the backend's
own URL when none is configured, and the report says so) must answer 2xx/3xx within
`verify_timeout_s`; otherwise a follow-up page on the same incident and the run fails
(`OutageNotRecovered`).

Undo: the artifact records each Deployment's previous `restartedAt`; a restart replaces
pods with identical ones, there is nothing to roll back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from prefect import get_run_logger
from prefect.context import FlowRunContext
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny

from flows.common import Report, Unavailable, collect, md_escape, run_link, table
from flows.driver import Held, NotFixed, Runbook, RunResult, Verification, checks_md, drive
from flows.escalate import escalate_incident, escalate_update
from flows.outage.cascade import Cascade, CascadeTargets, run_cascade
from flows.outage.dr import Readiness, checklist_md, publish_checklist, readiness
from flows.outage.params import RUNBOOK, SystemOutageParams
from flows.outage.recovery import (
    OutageVerification,
    not_planned,
    plan_restarts,
    restart_helps,
    verify_from_outside,
)
from flows.restart import DeploymentRestart
from flows.spec import (
    Action,
    ActionRecord,
    Check,
    LockTarget,
    Outcome,
    RunbookSpec,
    Severity,
    runbook_flow,
)
from tasks.cascade.models import LAYER_TITLES, LayerName, LayerResult
from tasks.kubernetes import EventInfo
from tasks.kubernetes.pods import cluster_events
from tasks.locks import kube_lock_target, target_lock
from tasks.settings import (
    KubernetesSettings,
    OutageSettings,
    PostgresSettings,
    RedisSettings,
)

__all__ = [
    "RUNBOOK",
    "SPEC",
    "Findings",
    "OutageNotRecovered",
    "SystemOutage",
    "SystemOutageOutcome",
    "SystemOutageParams",
    "system_outage",
    "target_of",
]

TOPIC = "platform"


def target_of(params: SystemOutageParams) -> str:
    """What the runbook changes: the platform's backend and frontend Deployments."""
    k8s = KubernetesSettings()
    return f"k8s:{k8s.namespace}/{k8s.backend_deployment}+{k8s.frontend_deployment}"


SPEC: RunbookSpec[SystemOutageParams] = RunbookSpec(
    name=RUNBOOK,
    title="Complete system outage",
    severity="critical",
    topic=TOPIC,
    lock=lambda p: LockTarget(target_of(p)),
    lock_timeout_s=600.0,
)


class OutageNotRecovered(NotFixed):
    """After the restarts the platform still does not answer from outside; paged again."""


class Findings(BaseModel):
    """The cascade, the cluster's events and (first check only) the DR readiness."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    cascade: Cascade
    events: list[EventInfo] | None = None
    events_error: str | None = None
    dr_checks: list[Check] = Field(default_factory=list)


class StaggerTimes(BaseModel):
    """When each restart started and rolled out, and the pause between them."""

    stagger_s: float
    backend_started_at: datetime | None = None
    backend_rolled_out_at: datetime | None = None
    frontend_started_at: datetime | None = None
    frontend_rolled_out_at: datetime | None = None


class SystemOutageOutcome(BaseModel):
    """What the run found and did."""

    outcome: Outcome
    note: str
    first_broken: LayerName | None
    layers: list[LayerResult]
    cascade_seconds: float
    checks: list[Check]
    dr_checks: list[Check]
    plan: list[SerializeAsAny[Action]]
    actions: list[ActionRecord] = Field(default_factory=list)
    approval: str | None = None
    paged: bool = False
    updates: list[str] = Field(default_factory=list)
    stagger: StaggerTimes | None = None
    verify: OutageVerification | None = None


def _targets() -> CascadeTargets:
    return CascadeTargets(outage=OutageSettings(), kube=KubernetesSettings(), pg=PostgresSettings())


def events_md(events: list[EventInfo]) -> str:
    """The events table, newest last, as `kubectl get events -A --sort-by` lists them."""
    rows = [
        [
            f"{e.last_seen:%Y-%m-%d %H:%M:%S}",
            getattr(e, "namespace", None) or "-",
            e.type or "-",
            e.reason or "-",
            f"{e.kind or '?'}/{e.name or '?'}",
            e.count if e.count is not None else "-",
            (e.message or "")[:160],
        ]
        for e in events
    ]
    return table(
        ["last seen (UTC)", "namespace", "type", "reason", "object", "count", "message"], rows
    )


class SystemOutage(Runbook[SystemOutageParams, Findings]):
    """The cascade, events and DR readiness; a staggered restart when it can help; verified
    from outside."""

    spec = SPEC
    not_fixed = OutageNotRecovered

    def __init__(self) -> None:
        self.paged = False
        self.updates: list[str] = []
        self.stagger: StaggerTimes | None = None
        self.readiness: Readiness | None = None

    # ------------------------------------------------------------------ evidence

    def check(self, params: SystemOutageParams, report: Report) -> Findings:
        found = self._cascade(params, report, "")
        if found.cascade.first_broken is not None and not self.paged:
            self._page(found.cascade, report)
        self._events(params, found, report)
        self._dr(params, found, report)
        return found

    def remeasure(self, params: SystemOutageParams, report: Report) -> Findings:
        return self._cascade(params, report, " (re-measured under the lock)")

    def _cascade(self, params: SystemOutageParams, report: Report, when: str) -> Findings:
        cascade = run_cascade(_targets(), concurrent=params.concurrent)
        cause = cascade.first_broken
        verdict = (
            f"Likely cause: **{LAYER_TITLES[cause]}** (the first broken layer; every later"
            f" layer is checked too and marked downstream of it)."
            if cause
            else "Every layer answers: no broken layer found."
        )
        how = "at once" if cascade.concurrent else "one after another"
        report.add(
            "Check cascade" + when,
            f"{verdict}\n\n{checks_md(cascade.checks())}\n\n_Seven layers checked {how} in"
            f" {cascade.seconds:.2f} s._",
        )
        if not when:
            report.add("Layer figures", cascade.probes_md())
        get_run_logger().info(
            "cascade in %.2f s: first broken %s", cascade.seconds, cause or "none"
        )
        return Findings(cascade=cascade)

    def _events(self, params: SystemOutageParams, found: Findings, report: Report) -> None:
        got = collect(cluster_events.submit(params.events_limit, KubernetesSettings()))
        if isinstance(got, Unavailable):
            found.events_error = got.reason
            report.add("Cluster events (all namespaces)", f"_unavailable_: {got.reason}")
            return
        found.events = list(got)
        report.add(
            "Cluster events (all namespaces)",
            f"The {len(got)} newest, newest last (lastTimestamp, else eventTime, else"
            f" creation).\n\n{events_md(found.events)}",
        )

    def _dr(self, params: SystemOutageParams, found: Findings, report: Report) -> None:
        outage = OutageSettings()
        self.readiness = readiness(params, outage)
        found.dr_checks = self.readiness.checks
        report.add("Disaster-recovery readiness (read only)", checks_md(found.dr_checks))
        text = checklist_md(
            self.readiness, outage, KubernetesSettings(), PostgresSettings(), RedisSettings()
        )
        publish_checklist(text)
        report.add(
            "Disaster-recovery checklist",
            "Published as the artifact `system-outage-dr-checklist` (the five steps with this"
            " platform's commands).",
        )

    # ------------------------------------------------------------------ paging

    def _page(self, cascade: Cascade, report: Report) -> None:
        """Critical at the start, with the run's link: later pages are follow-ups."""
        ctx = FlowRunContext.get()
        link = run_link(ctx.flow_run.id) if ctx and ctx.flow_run else ""
        cause = cascade.first_broken
        assert cause is not None
        layer = next(r for r in cascade.layers if r.layer == cause)
        paged = escalate_incident(
            "critical",
            TOPIC,
            f"System outage: likely cause {LAYER_TITLES[cause]}: {layer.summary}"
            + (f"\nThe run: {link}" if link else ""),
        )
        self.paged = True
        sent = sorted({d.contact for d in paged.deliveries if d.status == "sent"}) if paged else []
        report.add(
            "Paged",
            f"**critical** (topic {TOPIC}): "
            + (md_escape(", ".join(sent)) if sent else "nobody newly reached")
            + ". Later pages of this run are follow-ups on the same incident.",
        )

    def _update(self, reason: str, summary: str, report: Report) -> None:
        if reason in self.updates:
            return
        self.updates.append(reason)
        escalate_update(reason, TOPIC, summary)
        report.add(f"Follow-up page ({reason})", md_escape(summary))

    # ------------------------------------------------------------------ plan and act

    @contextmanager
    def hold(self, params: SystemOutageParams, report: Report) -> Iterator[Held]:
        """The spec's lock, then the backend's own workload lock: one change to the backend
        at a time, whichever runbook makes it (high-error-rate and db-pool-exhausted take it)."""
        k8s = KubernetesSettings()
        backend = kube_lock_target(k8s.namespace, k8s.backend_deployment).key
        with (
            super().hold(params, report) as held,
            target_lock(backend, timeout_s=self.spec.lock_timeout_s) as waited,
        ):
            report.add("Backend lock", f"Held {md_escape(backend)} (waited {waited:.1f} s).")
            held.waited_s += waited
            yield held

    def plan(self, params: SystemOutageParams, findings: Findings) -> list[Action]:
        cascade = findings.cascade
        cause = cascade.first_broken
        if cause is None:
            return []
        kube = KubernetesSettings()
        if not restart_helps(cascade.layers, cause):
            return [not_planned(cascade.layers, cause, kube)]
        return plan_restarts(params, kube)

    def act(
        self, params: SystemOutageParams, actions: list[Action], report: Report, held: Held
    ) -> list[ActionRecord]:
        """Backend, its rollout, the stagger, then the frontend: never both waves at once."""
        stagger = OutageSettings().restart_stagger_s
        times = self.stagger = StaggerTimes(stagger_s=stagger)
        kube = KubernetesSettings()
        records: list[ActionRecord] = []
        for i, action in enumerate(actions):
            if i > 0 and stagger > 0:
                report.add("Stagger", f"{stagger:g} s before the next restart.")
                time.sleep(stagger)
            records += super().act(params, [action], report, held)
            if isinstance(action, DeploymentRestart):
                if action.restart.deployment == kube.backend_deployment:
                    times.backend_started_at = action.started_at
                    times.backend_rolled_out_at = action.rolled_out_at
                elif action.restart.deployment == kube.frontend_deployment:
                    times.frontend_started_at = action.started_at
                    times.frontend_rolled_out_at = action.rolled_out_at
        return records

    def verify(
        self,
        params: SystemOutageParams,
        findings: Findings,
        records: list[ActionRecord],
        report: Report,
    ) -> Verification | None:
        if not records:
            return None  # nothing restarted: the page at the start stands
        result = verify_from_outside(params, OutageSettings())
        report.add(
            "Verify (from outside)",
            ("**recovered**: " if result.healthy else "**NOT recovered**: ")
            + md_escape(result.summary),
        )
        if not result.healthy:
            self._update(
                "not-recovered", f"still down after the restarts: {result.summary}", report
            )
        return result

    def escalation_severity(
        self, params: SystemOutageParams, verification: Verification
    ) -> Severity | None:
        """None once paged at the start (`verify` sent the follow-up); else critical."""
        return None if self.paged else self.spec.severity

    def not_fixed_message(self, params: SystemOutageParams, verification: Verification) -> str:
        return (
            f"system outage not recovered after the restarts ({verification.summary});"
            " the on-call was paged (see the run's artifact)"
        )


def outcome_of(result: RunResult[Findings], runbook: SystemOutage) -> SystemOutageOutcome:
    """The flow's return value from the driver's result."""
    cascade = result.findings.cascade
    verify = result.verification if isinstance(result.verification, OutageVerification) else None
    return SystemOutageOutcome(
        outcome=result.outcome,
        note=result.note,
        first_broken=cascade.first_broken,
        layers=cascade.layers,
        cascade_seconds=cascade.seconds,
        checks=cascade.checks(),
        dr_checks=result.findings.dr_checks,
        plan=result.plan,
        actions=result.records,
        approval=result.approval_line,
        paged=runbook.paged,
        updates=runbook.updates,
        stagger=runbook.stagger,
        verify=verify,
    )


@runbook_flow(SPEC)
def system_outage(
    params: SystemOutageParams = SystemOutageParams(),  # noqa: B008
) -> SystemOutageOutcome:
    """Check the cascade, page, restart backend then frontend if it helps, verify from outside."""
    runbook = SystemOutage()
    return outcome_of(drive(runbook, params), runbook)
