"""Runbook `security-breach`: the on-call runbook's "Security: Potential Breach".

Trigger: by hand from the Prefect UI (no alert routes to it: a breach is declared by a
human). Parameters: the affected pods' label selector (required), the incident id (the
run's id by default), the Secrets to rotate, a flag per step.

The checklist, in one flow, each step ending done / skipped / refused / failed (`planned` on
a dry run) with who and when, in the artifact `security-breach-checklist`:

1. Investigate: the evidence bundle (`tasks.security.evidence.capture_evidence`), always
   first and on a dry run too: read-only on every system, files 0600 in a new folder of
   the incident with a SHA-256 manifest, every file and its hash listed in the checklist
   artifact (the bundle's index); a re-run first verifies every earlier bundle of
   the incident (a changed or missing file fails this step). Without a bundle, every
   changing step is refused: nothing changes before the pods' state is kept.
2. Isolate: a deny-all ingress+egress NetworkPolicy on the pods the selector picks,
   optionally cordoning their nodes (`tasks.kubernetes.netpol`). Never scales to 0,
   deletes or restarts a pod.
3. Assess: logins from the audit table, image drift, recently changed Secrets, possible
   exfiltration (`tasks.security.assess`), as evidence rows.
4. Notify: `escalate` critical, topic security, and the runbook's contacts (CTO or
   security lead, legal, PR, customer support), each once per incident, with the run's
   link. A dry run names them and pages nobody.
5. Secure, each its own approval: rotate the named Secrets (backup Secret first, then
   exactly their users restarted), force a password reset for all users, revoke the login
   sessions in Redis.
6. Communicate / Improve: the human items, answered in a Prefect form (who, when, notes).
7. WAF rules: a checklist item with the exact instruction (the runbook cannot reach a WAF).

May change (steps 2 and 5 only): the NetworkPolicy `runbooks-isolate-<incident>` (and node
cordons), the named Secrets and their backups, restarts of the workloads that use them,
every user's password state, the session keys. Each through `drive()` (`flows/security/
steps.py`): dry run by default; an approval of its own (`always`: no route or
`auto_approve` skips it; Secret rotation needs two verified approvers, security team and
leadership); a refusal or a timeout ends that step refused with nothing changed and the
next step is still offered; under the lock `security:<namespace>` the plan is read again
and only what was approved and still holds is done: a Secret already rotated for the
incident is never rotated again. Secret values never reach logs, artifacts, parameters or
exceptions.

Undo: `undo_isolation(incident)` deletes exactly the incident's policies and uncordons what
it cordoned; each Secret's old values stay in `<name>-backup-<incident>`; a password reset
or a revoked session cannot be undone (users log in again).
"""

from __future__ import annotations

from prefect import get_run_logger
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from pydantic import BaseModel, Field

from flows.common import (
    Report,
    _end_expired_pause,
    failure_text,
    md_escape,
    publish_on_exit,
    run_link,
    table,
    tag_run,
)
from flows.driver import checks_md, drive
from flows.escalate import escalate_incident, notify_contact
from flows.security.assessment import Assessment, assess
from flows.security.checklist import (
    ARTIFACT_KEY,
    HUMAN_ITEMS,
    Checklist,
    HumanChecklist,
    Status,
    StepRecord,
    waf_instruction,
)
from flows.security.params import RUNBOOK, SPEC, TOPIC, SecurityBreachParams, target_of
from flows.security.steps import IsolateStep, ResetStep, RevokeStep, RotateStep, Step
from flows.spec import Check, Outcome, Verdict, runbook_flow
from tasks.contacts import load_config
from tasks.errors import RunbookError
from tasks.security.evidence import (
    BundleCheck,
    EvidenceBundle,
    bundles_of,
    capture_evidence,
    verify_bundle,
)
from tasks.settings import KubernetesSettings

__all__ = [
    "ARTIFACT_KEY",
    "RUNBOOK",
    "SPEC",
    "BreachStepsFailed",
    "SecurityBreachOutcome",
    "SecurityBreachParams",
    "security_breach",
    "target_of",
]

_STATUS: dict[Outcome, Status] = {
    "acted": "done",
    "planned": "planned",
    "refused": "refused",
    "skipped": "skipped",
    "nothing to do": "skipped",
    "failed": "failed",
}


class BreachStepsFailed(RunbookError):
    """A step of the checklist failed (the others ran); the checklist says which and why."""


class SecurityBreachOutcome(BaseModel):
    """The checklist and what stands behind it."""

    incident: str
    dry_run: bool
    steps: list[StepRecord]
    evidence: EvidenceBundle | None = None
    earlier_bundles: list[BundleCheck] = Field(default_factory=list)
    assessments: list[Check] = Field(default_factory=list)
    notified: list[str] = Field(default_factory=list)

    def step(self, name: str) -> StepRecord:
        """The row of a step by its name (the last one when a step has several rows)."""
        return [s for s in self.steps if s.step == name][-1]


def _run_id() -> str | None:
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else None


class _Run:
    """One run of the checklist: the rows, the evidence, what each step came to."""

    def __init__(self, params: SecurityBreachParams) -> None:
        self.params = params
        self.run_id = _run_id()
        self.incident = params.incident or self.run_id or "local"
        self.namespace = KubernetesSettings().namespace
        self.checklist = Checklist(incident=self.incident)
        self.sections: list[str] = []
        self.out = SecurityBreachOutcome(incident=self.incident, dry_run=params.dry_run, steps=[])
        self.failed: list[str] = []
        self.assessment: Assessment | None = None

    def row(self, number: str, step: str, status: Status, who: str = "-", detail: str = "") -> None:
        self.checklist.add(number, step, status, who, detail)
        if status == "failed":
            self.failed.append(step)
        get_run_logger().info("step %s %s: %s", number, step, status)

    def section(self, heading: str, body: str) -> None:
        self.sections.append(f"## {heading}\n\n{body.strip()}\n")

    def fill(self, report: Report) -> None:
        """The report's sections: the checklist first, then the evidence behind it."""
        report.sections = [f"## Checklist\n\n{self.checklist.markdown()}\n", *self.sections]

    # ------------------------------------------------------------------ 1 investigate

    def investigate(self) -> None:
        earlier: list[BundleCheck] = []
        for directory in bundles_of(self.incident):
            earlier.append(verify_bundle(directory))
        self.out.earlier_bundles = earlier
        broken = [c for c in earlier if not c.ok]
        lines = [
            f"- {md_escape(c.directory)}: "
            + (
                f"hashes verify ({c.checked} file(s))"
                if c.ok
                else f"**CHANGED**: {md_escape(', '.join(c.mismatched) or '-')};"
                f" missing: {md_escape(', '.join(c.missing) or '-')}"
            )
            for c in earlier
        ]
        bundle = capture_evidence(self.incident, self.params.selector, namespace=self.namespace)
        self.out.evidence = bundle
        self.section(
            "1 Evidence",
            f"Bundle **{md_escape(bundle.directory)}**, captured"
            f" {bundle.captured_at:%Y-%m-%d %H:%M:%S} UTC: {len(bundle.files)} file(s), pods"
            f" {md_escape(', '.join(bundle.pods) or 'none')}; manifest sha256"
            f" `{bundle.manifest_sha256}`; audit: {md_escape(bundle.audit_status)}."
            + (
                "\n\nCapture errors: " + md_escape("; ".join(bundle.errors[:10]))
                if bundle.errors
                else ""
            )
            + ("\n\nEarlier bundles of this incident:\n\n" + "\n".join(lines) if lines else "")
            + "\n\nFiles (as in its manifest):\n\n"
            + table(
                ["file", "kind", "bytes", "sha256"],
                [[f.path, f.kind, f.bytes, f.sha256] for f in bundle.files],
            ),
        )
        detail = (
            f"{len(bundle.files)} file(s) of {len(bundle.pods)} pod(s) in {bundle.directory};"
            f" manifest sha256 {bundle.manifest_sha256[:16]}..."
        )
        if earlier:
            detail += f"; {len(earlier) - len(broken)}/{len(earlier)} earlier bundle(s) verify"
        if broken:
            # The reason first: the rest (paths, hashes) is in the evidence section.
            changed = (
                f"{len(broken)} earlier bundle(s) of this incident CHANGED"
                " (a file altered or missing)"
            )
            self.row("1", "investigate", "failed", "runbook", f"{changed}; {detail}")
        else:
            self.row("1", "investigate", "done", "runbook", detail)

    # ------------------------------------------------------------------ 2, 5 changing steps

    def change(self, number: str, step: Step, offered: bool, why_not: str) -> None:
        label = step.name
        if not offered:
            self.row(number, label, "skipped", "-", why_not)
            return
        if self.out.evidence is None:
            self.row(
                number,
                label,
                "refused",
                "runbook",
                "no evidence bundle was captured: nothing changes before the pods' state is kept",
            )
            return
        try:
            result = drive(step, self.params)
        except Exception as exc:  # noqa: BLE001 - one step failing must not hide the next ones
            # The type (and our own errors' secret-free message); a library's text may quote
            # anything, so no traceback.
            get_run_logger().error("step %s %s failed: %s", number, label, failure_text(exc))
            self.row(number, label, "failed", "-", failure_text(exc))
            return
        decision = result.approval
        who = decision.approver if decision is not None else "-"
        plans = "; ".join(a.summary for a in result.plan)
        records = "; ".join(r.message for r in result.records)
        detail = f"{result.note} {('Plan: ' + plans) if plans else ''}"
        if records:
            detail += f" Result: {records}"
        if decision is not None:
            detail += f" Approval: {decision.summary}"
            reasons = [c.vote.reason for c in decision.votes if c.counted and c.vote.reason]
            if reasons:
                detail += f" (why: {'; '.join(reasons)})"
        self.row(number, label, _STATUS[result.outcome], who, detail.strip())

    # ------------------------------------------------------------------ 3 assess

    def assess(self) -> None:
        found = assess(self.params.selector, self.namespace)
        self.assessment = found
        self.out.assessments = found.rows
        self.section("3 Assessment", checks_md(found.rows))
        flagged = [r.item for r in found.rows if r.verdict == Verdict.FAIL]
        unavailable = [r.item for r in found.rows if r.verdict == Verdict.UNAVAILABLE]
        detail = (f"flagged: {', '.join(flagged)}" if flagged else "nothing flagged") + (
            f"; unavailable: {', '.join(unavailable)}" if unavailable else ""
        )
        self.row("3", "assess", "done", "runbook", detail)

    # ------------------------------------------------------------------ 4 notify

    def notify(self) -> None:
        params = self.params
        config = load_config()
        known = [c for c in params.notify_contacts if c in config.contacts]
        unknown = [c for c in params.notify_contacts if c not in config.contacts]
        missing = f"; not in the escalation config: {', '.join(unknown)}" if unknown else ""
        if not params.notify:
            self.row("4", "notify", "skipped", "-", "notify is off")
            return
        if params.dry_run:
            self.row(
                "4",
                "notify",
                "planned",
                "-",
                f"would page critical (topic {TOPIC}) and tell {', '.join(known) or 'nobody'}"
                + missing,
            )
            return
        link = run_link(self.run_id) if self.run_id else ""
        summary = (
            f"Security breach declared (incident {self.incident}): affected pods"
            f" `{params.selector}` in {self.namespace}. The run: {link}"
        )
        paged = escalate_incident("critical", TOPIC, summary, incident_key=self.incident)
        sent = sorted({d.contact for d in paged.deliveries if d.status == "sent"}) if paged else []
        told: list[str] = []
        for contact in known:
            rows = notify_contact(
                config,
                contact,
                self.incident,
                f"[CRITICAL] security breach: {self.incident}",
                summary,
                stage="security-breach",
            )
            if any(r.status in {"sent", "unconfirmed"} or r.repeated for r in rows):
                told.append(contact)
        self.out.notified = sorted({*sent, *told})
        not_reached = [c for c in known if c not in told]
        status: Status = "done" if not not_reached and not unknown else "failed"
        self.row(
            "4",
            "notify",
            status,
            "runbook",
            f"critical, topic {TOPIC}: {', '.join(sent) or 'nobody newly paged'}; the runbook's"
            f" contacts told: {', '.join(told) or 'none'}"
            + (f"; NOT reached: {', '.join(not_reached)}" if not_reached else "")
            + missing,
        )

    # ------------------------------------------------------------------ 6, 7 humans

    def human_form(self) -> None:
        if self.params.dry_run:
            for text in HUMAN_ITEMS.values():
                self.row("6", text, "planned", "-", "asked in a form on a real run")
            return
        if not self.params.ask_form:
            for text in HUMAN_ITEMS.values():
                self.row("6", text, "open", "-", "form not asked (ask_form off): for the humans")
            return
        try:
            answer = pause_flow_run(
                wait_for_input=HumanChecklist.with_initial_data(
                    description=_form_text(self.incident), by=""
                ),
                timeout=self.params.form_timeout_s,
                poll_interval=2,
                key="security-breach-human-checklist",
            )
        except FlowPauseTimeout:
            _end_expired_pause()
            for text in HUMAN_ITEMS.values():
                self.row(
                    "6", text, "open", "-", f"form unanswered within {self.params.form_timeout_s} s"
                )
            return
        for text, done, note in answer.answers():
            self.row("6", text, "done" if done else "open", answer.by, note)

    def waf(self) -> None:
        addresses = self.assessment.flagged_addresses() if self.assessment else []
        self.row("7", "WAF rules", "open", "-", waf_instruction(self.namespace, addresses))


def _form_text(incident: str) -> str:
    items = "\n".join(f"- {text}" for text in HUMAN_ITEMS.values())
    return (
        f"**security-breach**, incident {incident}: tick what is done, say how in the note,"
        f" and give your name (recorded with the time).\n\n{items}"
    )


@runbook_flow(SPEC)
def security_breach(params: SecurityBreachParams) -> SecurityBreachOutcome:
    """Evidence first, then isolate, assess, notify, secure (each change approved on its
    own), the human items and the WAF instruction; the checklist artifact on every path."""
    tag_run(RUNBOOK)
    run = _Run(params)
    namespace = run.namespace
    report = Report(ARTIFACT_KEY, f"Security breach checklist: incident {run.incident}")
    with publish_on_exit(report, run.checklist.summary):
        try:
            try:
                run.investigate()
            except Exception as exc:  # noqa: BLE001 - the row says why; every change refuses
                run.row("1", "investigate", "failed", "runbook", failure_text(exc))
            run.change("2", IsolateStep(run.incident, namespace), params.isolate, "isolate is off")
            try:
                run.assess()
            except Exception as exc:  # noqa: BLE001
                run.row("3", "assess", "failed", "runbook", failure_text(exc))
            try:
                run.notify()
            except Exception as exc:  # noqa: BLE001
                run.row("4", "notify", "failed", "runbook", failure_text(exc))
            run.change(
                "5a",
                RotateStep(
                    run.incident, namespace, run.out.evidence.unkept if run.out.evidence else {}
                ),
                params.rotate and bool(params.secrets),
                "rotate is off" if not params.rotate else "no Secret named",
            )
            run.change(
                "5b",
                ResetStep(run.incident, namespace),
                params.reset_passwords,
                "reset_passwords is off",
            )
            run.change(
                "5c",
                RevokeStep(run.incident, namespace),
                params.revoke_sessions,
                "revoke_sessions is off",
            )
            run.human_form()
            run.waf()
        finally:
            run.out.steps = list(run.checklist.rows)
            run.fill(report)
    if run.failed:
        raise BreachStepsFailed(
            f"step(s) failed: {', '.join(run.failed)} (see the {ARTIFACT_KEY} artifact)"
        )
    return run.out
