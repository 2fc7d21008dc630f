"""Runbook "SSL Certificate Expiring", the emergency step: `cert-replace`.

Trigger: by hand only (the UI), from step 3 of the emergency checklist that `cert-expiry`
(`flows/cert_expiry.py`) publishes when a certificate is critical.

What it may change: one Kubernetes TLS Secret (tls.crt + tls.key), after copying it to a
backup Secret `<name>-backup-<UTC timestamp>`; then a rollout restart of the ingress
Deployment so it serves the new pair.

Safety limits: a dry run unless `dry_run` is false, and it acts only after an approver says
yes in the UI (timeout = refused). The new pair is refused unless the key matches the leaf,
the chain is in order and unexpired, the leaf is valid now, expires later than the current
one and its SANs cover every host the current one covered. The write carries the Secret's
resourceVersion from the plan: if cert-manager or a human changed it meanwhile (while the
run waited for approval, say), nothing is written. After the approval the new pair is read
again and installed only if it is the approved one (the SHA-256 fingerprint of each of its
certificates): a staged Secret or files changed during the wait stop the run with nothing
written. The ingress is checked (server-side dry
run of the restart) before approval is asked, so a missing or paused Deployment stops the
run before anything changes. Private keys never appear in parameters (the new pair comes
from a staged Secret or from files on the worker), logs or artifacts. The audit artifact is
published on every exit path and, before the write, already names the backup Secret and the
current certificate's serial and SHA-256 fingerprint: the undo.

Undo: the backup Secret holds the previous pair. Put it back with
`kubectl -n NS get secret NAME-backup-TS -o json | jq '.metadata.name="NAME" |
del(.metadata.uid,.metadata.resourceVersion,.metadata.creationTimestamp,.metadata.labels)'
| kubectl replace -f -`, then `kubectl -n INGRESS_NS rollout restart deployment/INGRESS`.
(`cert-replace` itself refuses to go back to an earlier-expiring certificate.) The report
of each run prints these commands with its own names filled in.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from prefect import get_run_logger
from pydantic import BaseModel, Field

from flows.common import Report, md_escape, publish_on_exit, request_approval, table, tag_run
from flows.report_text import short_days
from flows.spec import RunbookSpec, runbook_flow
from tasks.errors import PermanentError, SafetyViolation
from tasks.kubernetes import restart_rollout, wait_for_rollout
from tasks.settings import KubernetesSettings
from tasks.tls import (
    CertificateInfo,
    KubeName,
    Namespace,
    ReplacementCheck,
    SecretReplacement,
    SourceScan,
    backup_secret_name,
    changed_since_approval,
    check_tls_replacement,
    read_tls_secret,
    replace_tls_secret,
)

RUNBOOK = "cert-replace"
_BEFORE = "Before the change (the undo)"
#: The report section written just before the write: present means the Secret may have changed.
BEFORE_HEADING = _BEFORE


class CertReplaceParams(BaseModel):
    """Replace one Kubernetes TLS Secret with a new pair, then restart the ingress."""

    namespace: Namespace = Field(
        default_factory=lambda: KubernetesSettings().namespace,
        description="Namespace of the TLS Secret to replace.",
    )
    secret: KubeName = Field(description="Name of the kubernetes.io/tls Secret to replace.")
    new_secret: KubeName | None = Field(
        None,
        description="Staged TLS Secret in the same namespace holding the new pair "
        "(kubectl create secret tls NAME-new --cert=... --key=...).",
    )
    new_cert_file: str | None = Field(
        None, description="Or: path on the worker of the new fullchain PEM (leaf first)."
    )
    new_key_file: str | None = Field(
        None, description="Or: path on the worker of the new private key PEM."
    )
    extra_hosts: list[str] = Field(
        default_factory=list,
        description="Host names the new certificate must cover besides the current SANs.",
    )
    ingress_deployment: KubeName = Field(
        "ingress-nginx-controller", description="Deployment to restart afterwards."
    )
    ingress_namespace: Namespace = Field("ingress-nginx", description="Its namespace.")
    restart_ingress: bool = Field(True, description="Restart the ingress after replacing.")
    dry_run: bool = Field(True, description="Plan and validate only; change nothing.")
    approval_timeout_s: int = Field(
        1200, ge=10, le=86_400, description="How long to wait for an approver; then refuse."
    )
    reason: str = Field("", description="Why (incident id, alert); recorded in the audit.")


class CertReplaceResult(BaseModel):
    """The outcome of one `cert-replace` run."""

    outcome: Literal["refused", "dry run", "not approved", "replaced"]
    check: ReplacementCheck
    replacement: SecretReplacement | None = None
    approver: str | None = None


def _cert_table(certs: list[CertificateInfo]) -> str:
    return table(
        ["#", "subject", "serial", "SHA-256", "not after (UTC)", "days left", "SANs", "issuer"],
        [
            [
                c.position,
                c.subject,
                c.serial,
                c.fingerprint_sha256,
                c.not_after.strftime("%Y-%m-%d %H:%M"),
                short_days(c.days_left),
                ", ".join(c.sans),
                c.issuer,
            ]
            for c in certs
        ],
    )


def _undo(params: CertReplaceParams, backup: str) -> str:
    """The kubectl commands that put the backup back (names are DNS-1123: nothing to quote)."""
    fields = ".metadata.uid,.metadata.resourceVersion,.metadata.creationTimestamp,.metadata.labels"
    lines = [
        f"kubectl -n {params.namespace} get secret {backup} -o json \\",
        f"  | jq '.metadata.name=\"{params.secret}\" | del({fields})' \\",
        "  | kubectl replace -f -",
    ]
    if params.restart_ingress:
        lines.append(
            f"kubectl -n {params.ingress_namespace} rollout restart "
            f"deployment/{params.ingress_deployment}"
        )
    return "```bash\n" + "\n".join(lines) + "\n```"


def _before(current: SourceScan, params: CertReplaceParams, backup: str) -> str:
    """Every value the write replaces, and where the copy goes: written before the write."""
    leaf = current.certificates[0]
    rows = [
        ["Secret", f"{params.namespace}/{params.secret}"],
        ["resourceVersion", current.resource_version or ""],
        ["leaf serial", leaf.serial],
        ["leaf SHA-256", leaf.fingerprint_sha256],
        ["leaf not after (UTC)", leaf.not_after.strftime("%Y-%m-%d %H:%M")],
        ["backup Secret (copy of the current pair)", f"{params.namespace}/{backup}"],
    ]
    return table(["what", "value"], rows) + "\n\nUndo:\n\n" + _undo(params, backup)


SPEC: RunbookSpec[Any] = RunbookSpec(
    name=RUNBOOK,
    title="TLS certificate replacement",
    severity="critical",
    topic="security",
)


@runbook_flow(SPEC)
def cert_replace(params: CertReplaceParams) -> CertReplaceResult:
    """Replace a Kubernetes TLS Secret with a validated new pair and restart the ingress."""
    tag_run(RUNBOOK)
    target = f"{params.namespace}/{params.secret}"
    report = Report(RUNBOOK, f"Replace TLS Secret {target}")
    report.add(
        "Request",
        f"- why: {md_escape(params.reason) or '_not given_'}\n- dry run: {params.dry_run}\n"
        "- new pair from: "
        + (
            f"Secret {params.namespace}/{params.new_secret}"
            if params.new_secret
            else f"file {md_escape(params.new_cert_file)} + a key file"
        ),
    )
    outcome = "stopped"
    # Every exit path leaves its record: refusal, timeout, an exception in any step.
    with publish_on_exit(report, lambda: f"{RUNBOOK} {target}: {outcome}"):
        try:
            result = _replace(params, report)
        except Exception:
            written = any(s.startswith(f"## {_BEFORE}") for s in report.sections)
            report.add(
                "Stopped",
                f"The Secret may have been changed: **{_BEFORE}** names the backup and the undo."
                if written
                else "Nothing was changed.",
            )
            raise
        outcome = result.outcome
        return result


def replace_pair(params: CertReplaceParams, report: Report) -> CertReplaceResult:
    """cert-replace's read → validate → plan → approve → back up → write → restart → verify
    path, for a flow that stages the new pair itself (`cert-renew`); writes into `report`."""
    return _replace(params, report)


def _check_new_pair(params: CertReplaceParams, current: SourceScan) -> ReplacementCheck:
    """Load the new pair from its source and validate it against the current certificate."""
    return check_tls_replacement(
        params.namespace,
        params.secret,
        current.certificates,
        new_secret=params.new_secret,
        new_cert_file=Path(params.new_cert_file) if params.new_cert_file else None,
        new_key_file=Path(params.new_key_file) if params.new_key_file else None,
        extra_hosts=params.extra_hosts,
    )


def _replace(params: CertReplaceParams, report: Report) -> CertReplaceResult:
    """Read, validate, plan, (approve,) back up and replace, restart, verify."""
    logger = get_run_logger()
    target = f"{params.namespace}/{params.secret}"
    current = read_tls_secret(params.namespace, params.secret)
    report.add(
        "Current certificate",
        f"resourceVersion {current.resource_version}\n\n" + _cert_table(current.certificates),
    )
    check = _check_new_pair(params, current)
    report.add("New certificate", _cert_table(check.new) if check.new else "_unreadable_")
    report.add(
        "Validation",
        "\n".join(f"- REFUSED: {md_escape(p)}" for p in check.problems)
        or "- key matches the leaf\n- chain in order, nothing expired or not yet valid\n"
        "- expires later than the current one\n- covers: "
        + md_escape(", ".join(check.hosts_required)),
    )
    if not check.ok:
        report.add("Outcome", "Refused: nothing changed.")
        raise SafetyViolation(f"new pair for {target} refused: " + "; ".join(check.problems))

    old, new = current.certificates[0], check.new[0]
    plan = (
        f"Replace TLS Secret {target}: serial {old.serial} (expires "
        f"{old.not_after:%Y-%m-%d %H:%M}Z) → serial {new.serial} (expires "
        f"{new.not_after:%Y-%m-%d %H:%M}Z); the current pair is copied to a backup Secret "
        "first"
        + (
            f"; then rollout restart deployment "
            f"{params.ingress_namespace}/{params.ingress_deployment}"
            if params.restart_ingress
            else ""
        )
        + "."
    )
    report.add("Plan", plan)
    if params.restart_ingress:
        # Server-side dry run: the Deployment exists and is not paused, before anyone is
        # asked to approve and before the Secret is touched.
        probe = restart_rollout(params.ingress_deployment, params.ingress_namespace, dry_run=True)
        report.add("Ingress pre-check", md_escape(probe.message))
    if params.dry_run:
        report.add("Outcome", "Dry run: nothing changed. Run again with dry_run off.")
        return CertReplaceResult(outcome="dry run", check=check)

    decision = request_approval(plan, params.approval_timeout_s)
    report.add("Approval", decision.line())
    if not decision.approved:
        report.add("Outcome", "Not approved: nothing changed.")
        return CertReplaceResult(outcome="not approved", check=check, approver=decision.approver)

    # The approver saw this pair; its source (a staged Secret, files) may have changed
    # while the run waited. Only the approved pair is installed.
    approved = [c.fingerprint_sha256 for c in check.new]
    again = _check_new_pair(params, current)
    changed = changed_since_approval(approved, [c.fingerprint_sha256 for c in again.new])
    if changed or not again.ok:
        why = changed or "; ".join(again.problems)
        report.add(
            "New pair after approval",
            f"- REFUSED: {md_escape(why)}\n\n"
            + (_cert_table(again.new) if again.new else "_unreadable_"),
        )
        report.add("Outcome", "Refused after the approval: nothing changed.")
        raise SafetyViolation(f"new pair for {target} refused after the approval: {why}")
    report.add(
        "New pair after approval",
        f"Read again: the approved pair (leaf SHA-256 {approved[0]}).",
    )

    backup = backup_secret_name(params.secret, datetime.now(UTC))
    report.add(_BEFORE, _before(current, params, backup))
    done = replace_tls_secret(
        params.namespace,
        params.secret,
        current.resource_version or "",
        new_secret=params.new_secret,
        new_cert_file=Path(params.new_cert_file) if params.new_cert_file else None,
        new_key_file=Path(params.new_key_file) if params.new_key_file else None,
        backup_name=backup,
        approved_fingerprints=approved,
    )
    report.add(
        "Done",
        table(
            ["what", "before", "after"],
            [
                ["serial", done.old_serial, done.new_serial],
                ["SHA-256", done.old_fingerprint_sha256, done.new_fingerprint_sha256],
                ["not after (UTC)", done.old_not_after, done.new_not_after],
                ["backup Secret", "", f"{params.namespace}/{done.backup_secret}"],
            ],
        ),
    )
    if params.restart_ingress:
        restarted = restart_rollout(params.ingress_deployment, params.ingress_namespace)
        status = wait_for_rollout(params.ingress_deployment, params.ingress_namespace)
        report.add("Ingress", md_escape(f"{restarted.message}; {status.message}"))
    after = read_tls_secret(params.namespace, params.secret)
    if after.certificates[0].serial != done.new_serial:
        raise PermanentError(
            f"{target} serves serial {after.certificates[0].serial} after the replace, "
            f"expected {done.new_serial}"
        )
    report.add(
        "Verify",
        f"Secret now holds serial {done.new_serial}. Re-run `cert-expiry` for the endpoints.",
    )
    report.add("Outcome", f"Replaced; the previous pair is in {params.namespace}/{backup}.")
    logger.warning("replaced %s, approved by %s", target, decision.approver)
    return CertReplaceResult(
        outcome="replaced", check=check, replacement=done, approver=decision.approver
    )
