"""Runbook "SSL Certificate Expiring", the emergency step: `cert-replace`.

Trigger: by hand only (the UI), from step 3 of the emergency checklist that `cert-expiry`
(`flows/cert_expiry.py`) publishes when a certificate is critical.

What it may change: one Kubernetes TLS Secret (tls.crt + tls.key), after copying it to a
backup Secret `<name>-backup-<UTC timestamp>`; then a rollout restart of the ingress
Deployment so it serves the new pair. On the driver (`flows/driver.py`) that is one
`InstallCertificate` action with approval `always`, the one `cert-renew` installs through.

Safety limits: a dry run unless `dry_run` is false, and it acts only after an approver says
yes in the UI (timeout = refused). The new pair is refused unless the key matches the leaf,
the chain is in order and unexpired, the leaf is valid now, expires later than the current
one and its SANs cover every host the current one covered. The ingress is checked
(server-side dry run of the restart) before approval is asked, so a missing or paused
Deployment stops the run before anything changes. After the approval the run holds the
target lock `k8s:<namespace>/secret/<name>` (shared with `cert-renew`) and reads the Secret
and the new pair again: it installs only if the Secret's resourceVersion and the new pair's
SHA-256 fingerprints are the approved ones (else: skipped, nothing written); the write
itself carries both as preconditions. Private keys never appear in parameters (the new pair
comes from a staged Secret or from files on the worker), logs or artifacts. The audit
artifact is published on every exit path and, before the write, already names the backup
Secret and the current certificate's serial and SHA-256 fingerprint (the undo record).
Afterwards the Secret is read back: not holding the new certificate escalates (critical,
security) and fails the run.

Undo: the backup Secret holds the previous pair. Put it back with
`kubectl -n NS get secret NAME-backup-TS -o json | jq '.metadata.name="NAME" |
del(.metadata.uid,.metadata.resourceVersion,.metadata.creationTimestamp,.metadata.labels)'
| kubectl replace -f -`, then `kubectl -n INGRESS_NS rollout restart deployment/INGRESS`.
(`cert-replace` itself refuses to go back to an earlier-expiring certificate.) The report
of each run prints these commands with its own names filled in.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from flows.common import Report, md_escape, table
from flows.driver import Runbook, RunResult, Stop, Verification, drive
from flows.report_text import short_days
from flows.spec import (
    Action,
    ActionRecord,
    ApprovalPolicy,
    LockTarget,
    Outcome,
    RunbookParams,
    RunbookSpec,
    runbook_flow,
)
from tasks.errors import SafetyViolation
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
#: The report section the driver writes just before the write: present = the Secret may
#: have been changed.
UNDO_HEADING = "Undo record"


class CertReplaceParams(RunbookParams):
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


class CertReplaceResult(BaseModel):
    """The outcome of one `cert-replace` run."""

    outcome: Outcome
    check: ReplacementCheck
    replacement: SecretReplacement | None = None
    approver: str | None = None


class Measured(BaseModel):
    """The Secret as read and the new pair's validation against it."""

    current: SourceScan
    check: ReplacementCheck


def secret_lock(namespace: str, secret: str) -> LockTarget:
    """The Secret a run replaces: one install per Secret at a time (cert-renew too)."""
    return LockTarget(f"k8s:{namespace}/secret/{secret}")


SPEC: RunbookSpec[CertReplaceParams] = RunbookSpec(
    name=RUNBOOK,
    title="TLS certificate replacement",
    severity="critical",
    topic="security",
    lock=lambda p: secret_lock(p.namespace, p.secret),
)


# ------------------------------------------------------------------------------ report text


def cert_table(certs: list[CertificateInfo]) -> str:
    """The certificates of a pair, leaf first: serials and fingerprints, no key material."""
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


def validation_md(check: ReplacementCheck) -> str:
    """The validation's verdict: each problem, or what was checked."""
    return "\n".join(f"- REFUSED: {md_escape(p)}" for p in check.problems) or (
        "- key matches the leaf\n- chain in order, nothing expired or not yet valid\n"
        "- expires later than the current one\n- covers: "
        + md_escape(", ".join(check.hosts_required))
    )


# ------------------------------------------------------------------------------ the action


class InstallRecord(ActionRecord):
    """What the install did: the replacement's serials, fingerprints and backup."""

    replacement: SecretReplacement


class InstallCertificate(Action):
    """Back up the TLS Secret, replace it with the approved pair, restart the ingress.

    Pinned by the Secret's resourceVersion and the new pair's fingerprints as planned: the
    write (`tasks.tls.replace_tls_secret`) refuses anything else and writes nothing.
    """

    kind: str = "install-certificate"
    approval: ApprovalPolicy = "always"
    namespace: str
    secret: str
    resource_version: str
    new_secret: str | None = None
    new_cert_file: str | None = None
    new_key_file: str | None = None
    #: SHA-256 of each certificate of the new pair, leaf first; empty = not issued yet.
    fingerprints: list[str] = Field(default_factory=list)
    old_serial: str
    old_fingerprint: str
    old_not_after: datetime
    backup: str
    #: None: the ingress is not restarted.
    ingress_deployment: str | None = None
    ingress_namespace: str = ""

    def same_as(self, approved: Action) -> bool:
        """The same Secret version and the same new pair as approved."""
        return (
            isinstance(approved, InstallCertificate)
            and super().same_as(approved)
            and (self.resource_version, self.fingerprints)
            == (approved.resource_version, approved.fingerprints)
        )

    def try_dry_run(self) -> str:
        """The ingress restart as a server-side dry run (the Deployment exists, not paused)."""
        if self.ingress_deployment is None:
            return "no ingress restart asked"
        probe = restart_rollout(self.ingress_deployment, self.ingress_namespace, dry_run=True)
        return probe.message

    def undo(self) -> str:
        """Every value the write replaces, where the copy goes, and the commands to undo."""
        rows = [
            ["Secret", self.target],
            ["resourceVersion", self.resource_version],
            ["leaf serial", self.old_serial],
            ["leaf SHA-256", self.old_fingerprint],
            ["leaf not after (UTC)", self.old_not_after.strftime("%Y-%m-%d %H:%M")],
            ["backup Secret (copy of the current pair)", f"{self.namespace}/{self.backup}"],
        ]
        return table(["what", "value"], rows) + "\n\nUndo:\n\n" + self._undo_commands()

    def _undo_commands(self) -> str:
        """The kubectl commands that put the backup back (names are DNS-1123: no quoting)."""
        fields = (
            ".metadata.uid,.metadata.resourceVersion,.metadata.creationTimestamp,.metadata.labels"
        )
        lines = [
            f"kubectl -n {self.namespace} get secret {self.backup} -o json \\",
            f"  | jq '.metadata.name=\"{self.secret}\" | del({fields})' \\",
            "  | kubectl replace -f -",
        ]
        if self.ingress_deployment:
            lines.append(
                f"kubectl -n {self.ingress_namespace} rollout restart "
                f"deployment/{self.ingress_deployment}"
            )
        return "```bash\n" + "\n".join(lines) + "\n```"

    def apply(self) -> InstallRecord:
        """Back up and replace (only the approved pair, only the planned version), restart."""
        if not self.fingerprints:
            raise SafetyViolation(f"no approved pair to install in {self.target}")
        done = replace_tls_secret(
            self.namespace,
            self.secret,
            self.resource_version,
            new_secret=self.new_secret,
            new_cert_file=Path(self.new_cert_file) if self.new_cert_file else None,
            new_key_file=Path(self.new_key_file) if self.new_key_file else None,
            backup_name=self.backup,
            approved_fingerprints=self.fingerprints,
        )
        message = f"backup in {self.namespace}/{done.backup_secret}"
        if self.ingress_deployment:
            restarted = restart_rollout(self.ingress_deployment, self.ingress_namespace)
            status = wait_for_rollout(self.ingress_deployment, self.ingress_namespace)
            message += f"; {restarted.message}; {status.message}"
        return InstallRecord(
            kind=self.kind,
            target=self.target,
            before=f"serial {done.old_serial} (not after {done.old_not_after:%Y-%m-%d %H:%M})",
            after=f"serial {done.new_serial} (not after {done.new_not_after:%Y-%m-%d %H:%M})",
            message=message,
            replacement=done,
        )


def install_action(
    params: CertReplaceParams, current: SourceScan, new: Sequence[CertificateInfo], plan: str
) -> InstallCertificate:
    """The install of `params`' new pair (as validated: `new`) over `current`; `plan` is
    what it does before the install (cert-renew's order), or empty."""
    old, target = current.certificates[0], f"{params.namespace}/{params.secret}"
    if new:
        plan += (
            f"replace TLS Secret {target}: serial {old.serial} (expires "
            f"{old.not_after:%Y-%m-%d %H:%M}Z) → serial {new[0].serial} (expires "
            f"{new[0].not_after:%Y-%m-%d %H:%M}Z); the current pair is copied to a backup "
            "Secret first"
        )
    else:
        plan += f"back up and replace TLS Secret {target}"
    ingress = f"{params.ingress_namespace}/{params.ingress_deployment}"
    plan += f"; then rollout restart deployment {ingress}" if params.restart_ingress else ""
    return InstallCertificate(
        target=target,
        summary=plan + ".",
        namespace=params.namespace,
        secret=params.secret,
        resource_version=current.resource_version or "",
        new_secret=params.new_secret,
        new_cert_file=params.new_cert_file,
        new_key_file=params.new_key_file,
        fingerprints=[c.fingerprint_sha256 for c in new],
        old_serial=old.serial,
        old_fingerprint=old.fingerprint_sha256,
        old_not_after=old.not_after,
        backup=backup_secret_name(params.secret, datetime.now(UTC)),
        ingress_deployment=params.ingress_deployment if params.restart_ingress else None,
        ingress_namespace=params.ingress_namespace,
    )


# ------------------------------------------------------------------------------ shared steps


def measure(params: CertReplaceParams, current: SourceScan | None = None) -> Measured:
    """Read the Secret (unless given) and validate the new pair from its source against it."""
    current = current or read_tls_secret(params.namespace, params.secret)
    check = check_tls_replacement(
        params.namespace,
        params.secret,
        current.certificates,
        new_secret=params.new_secret,
        new_cert_file=Path(params.new_cert_file) if params.new_cert_file else None,
        new_key_file=Path(params.new_key_file) if params.new_key_file else None,
        extra_hosts=params.extra_hosts,
    )
    return Measured(current=current, check=check)


def measure_again(params: CertReplaceParams, report: Report) -> Measured:
    """Under the lock: the Secret and the new pair read again, in one report section."""
    now = measure(params)
    leaf = now.check.new[0].fingerprint_sha256 if now.check.new else "unreadable"
    report.add(
        "Measured again",
        table(
            ["what", "now"],
            [
                ["Secret resourceVersion", now.current.resource_version or ""],
                ["current leaf SHA-256", now.current.certificates[0].fingerprint_sha256],
                ["new leaf SHA-256", leaf],
                ["new pair valid", "yes" if now.check.ok else "; ".join(now.check.problems)],
            ],
        ),
    )
    return now


def still_approved(
    approved: Sequence[Action], fresh: Sequence[Action], valid: ReplacementCheck
) -> list[Action] | Stop:
    """The fresh install when it is the approved one (same Secret version, same pair, still
    valid), or why not: the Secret and the pair may have changed while the run waited."""
    was = next(a for a in approved if isinstance(a, InstallCertificate))
    now = next((a for a in fresh if isinstance(a, InstallCertificate)), None)
    nothing = " Nothing was changed."
    if now is None:
        return Stop("skipped", "nothing to install after measuring again." + nothing)
    changed = changed_since_approval(was.fingerprints, now.fingerprints)
    if changed:
        return Stop("skipped", f"{changed}; nothing written." + nothing)
    if not valid.ok:
        why = "; ".join(valid.problems)
        return Stop("skipped", f"the new pair is refused now: {why}; nothing written." + nothing)
    if now.resource_version != was.resource_version:
        return Stop(
            "skipped",
            f"secret {was.target} changed since the plan (resourceVersion "
            f"{was.resource_version} → {now.resource_version}); nothing written." + nothing,
        )
    return [now]


def verify_secret(
    namespace: str, secret: str, records: Sequence[ActionRecord], report: Report
) -> Verification:
    """Read the Secret back: it holds the serial the install wrote."""
    installed = [r.replacement for r in records if isinstance(r, InstallRecord)]
    if not installed:
        return Verification(healthy=False, summary="nothing was installed")
    expected = installed[0].new_serial
    serial = read_tls_secret(namespace, secret).certificates[0].serial
    healthy = serial == expected
    report.add(
        "Verify",
        f"Secret {md_escape(f'{namespace}/{secret}')} holds serial {md_escape(serial)}"
        + ("." if healthy else f", not the installed {md_escape(expected)}: changed since?"),
    )
    return Verification(
        healthy=healthy,
        summary=f"{namespace}/{secret} holds serial {serial}"
        + ("" if healthy else f", expected {expected}"),
    )


def changed_note(report: Report) -> str:
    """For a run stopped by an exception: may the Secret have been changed?"""
    if any(s.startswith(f"## {UNDO_HEADING}") for s in report.sections):
        return (
            f"The Secret may have been changed: the **{UNDO_HEADING}** names the backup and "
            "the undo."
        )
    return "Nothing was changed."


def installed(records: Sequence[ActionRecord]) -> SecretReplacement | None:
    """The replacement the install made, if it ran."""
    return next((r.replacement for r in records if isinstance(r, InstallRecord)), None)


def approver(result: RunResult[Any]) -> str | None:
    """Who answered the approval (None: nobody was asked)."""
    return result.approval.approver if result.approval else None


# ------------------------------------------------------------------------------ the runbook


class CertReplace(Runbook[CertReplaceParams, Measured]):
    """Validate the new pair, install it behind approval, read the Secret back."""

    spec = SPEC

    def title(self, params: CertReplaceParams) -> str:
        return f"Replace TLS Secret {params.namespace}/{params.secret}"

    def check(self, params: CertReplaceParams, report: Report) -> Measured:
        source = (
            f"Secret {params.namespace}/{params.new_secret}"
            if params.new_secret
            else f"file {params.new_cert_file} + a key file"
        )
        found = measure(params)
        report.add(
            "Current certificate",
            f"resourceVersion {found.current.resource_version}; the new pair from: "
            f"{md_escape(source)}\n\n" + cert_table(found.current.certificates),
        )
        check = found.check
        report.add("New certificate", cert_table(check.new) if check.new else "_unreadable_")
        report.add("Validation", validation_md(check))
        if not check.ok:
            raise SafetyViolation(
                f"new pair for {params.namespace}/{params.secret} refused: "
                + "; ".join(check.problems)
            )
        if params.restart_ingress and not params.dry_run:
            # Server-side dry run: the Deployment exists and is not paused, before anyone is
            # asked to approve (a dry run gets it as the action's dry run).
            probe = restart_rollout(
                params.ingress_deployment, params.ingress_namespace, dry_run=True
            )
            report.add("Ingress pre-check", md_escape(probe.message))
        return found

    def plan(self, params: CertReplaceParams, findings: Measured) -> list[Action]:
        return [install_action(params, findings.current, findings.check.new, "")]

    def remeasure(self, params: CertReplaceParams, report: Report) -> Measured:
        return measure_again(params, report)

    def still_valid(
        self,
        params: CertReplaceParams,
        approved: list[Action],
        fresh: list[Action],
        findings: Measured,
        now: Measured,
    ) -> list[Action] | Stop:
        return still_approved(approved, fresh, now.check)

    def verify(
        self,
        params: CertReplaceParams,
        findings: Measured,
        records: list[ActionRecord],
        report: Report,
    ) -> Verification | None:
        verified = verify_secret(params.namespace, params.secret, records, report)
        if verified.healthy:
            report.add("Endpoints", "Re-run `cert-expiry` for the endpoints.")
        return verified

    def stopped(self, params: CertReplaceParams, report: Report) -> str | None:
        return changed_note(report)


@runbook_flow(SPEC)
def cert_replace(params: CertReplaceParams) -> CertReplaceResult:
    """Replace a Kubernetes TLS Secret with a validated new pair and restart the ingress."""
    result = drive(CertReplace(), params)
    return CertReplaceResult(
        outcome=result.outcome,
        check=result.findings.check,
        replacement=installed(result.records),
        approver=approver(result),
    )
