"""Runbook "SSL Certificate Expiring", the emergency issuance: `cert-renew`.

Trigger: by hand only (the UI), from the emergency checklist that `cert-expiry`
(`flows/cert_expiry.py`) publishes when a certificate is critical and nobody can fetch a
new pair by hand in time. It replaces the "request an emergency certificate from Let's
Encrypt, install it, restart the ingress" steps.

What it may change: it orders a certificate from the ACME CA of `AcmeSettings` for the
names the current certificate covers and stages the new pair as a TLS Secret
`<secret>-acme` in the same namespace (the check, before approval: the approver sees the
issued certificate); then `cert-replace`'s install action (`flows/cert_replace.py`,
`InstallCertificate`): approval → backup Secret → replace the TLS Secret → rollout restart
of the ingress. Verification reads the Secret back and checks that the live endpoints
serve the new certificate; not serving it escalates (critical, security) and fails.

Safety limits: a dry run unless `dry_run` is false (the dry run contacts no CA). Refused
before any order: a Secret that cert-manager manages (`cert-manager.io/*` annotations or an
ownerReference to a Certificate; the run names the Certificate to look at instead), a
name issued within the last day (a Prefect Variable per name, see docs/acme.md), a staged
Secret left by an earlier run. The ingress is checked (server-side dry run of the restart)
before anything is ordered. The private key is generated inside the issuing task and goes
only into the staged Secret. The install keeps every `cert-replace` guard (validation, one
approval, the target lock `k8s:<namespace>/secret/<name>`, only the approved pair and
Secret version installed, the undo record in the artifact).

Undo: as `cert-replace` (the backup Secret; the report prints the commands). The staged
Secret can be deleted once the incident is over.
"""

from __future__ import annotations

from prefect import get_run_logger
from prefect.context import FlowRunContext
from pydantic import BaseModel, Field

from flows.cert_replace import (
    CertReplaceParams,
    CertReplaceResult,
    Measured,
    approver,
    cert_table,
    changed_note,
    install_action,
    installed,
    measure,
    measure_again,
    secret_lock,
    still_approved,
    validation_md,
    verify_secret,
)
from flows.common import Report, md_code, md_escape, table
from flows.driver import Runbook, RunResult, Stop, Verification, drive
from flows.spec import Action, ActionRecord, Outcome, RunbookParams, RunbookSpec, runbook_flow
from tasks.acme import (
    Issued,
    LastIssued,
    LiveCheck,
    SecretOwner,
    check_names,
    issue_to_staged_secret,
    last_issuances,
    read_secret_owner,
    secret_exists,
    wait_until_serving,
)
from tasks.errors import PermanentError, SafetyViolation
from tasks.kubernetes import restart_rollout
from tasks.settings import KubernetesSettings
from tasks.tls import KubeName, Namespace, ReplacementCheck, SourceScan, read_tls_secret

RUNBOOK = "cert-renew"


class CertRenewParams(RunbookParams):
    """Order an emergency certificate over ACME and install it through `cert-replace`."""

    namespace: Namespace = Field(
        default_factory=lambda: KubernetesSettings().namespace,
        description="Namespace of the TLS Secret to renew.",
    )
    secret: KubeName = Field(description="Name of the kubernetes.io/tls Secret to renew.")
    endpoints: list[str] = Field(
        default_factory=list,
        max_length=20,
        description="Live endpoints that must serve the new certificate afterwards "
        "(host:port or sni-name@host:port).",
    )
    ingress_deployment: KubeName = Field(
        "ingress-nginx-controller", description="Deployment to restart afterwards."
    )
    ingress_namespace: Namespace = Field("ingress-nginx", description="Its namespace.")
    restart_ingress: bool = Field(True, description="Restart the ingress after replacing.")
    verify_timeout_s: float = Field(
        120.0, gt=0, le=1800, description="How long the endpoints may take to serve it."
    )


class CertRenewResult(BaseModel):
    """The outcome of one `cert-renew` run."""

    outcome: Outcome
    names: list[str]
    managed_by: str = "manual"
    certificate: str | None = None
    issued: Issued | None = None
    staged_secret: str | None = None
    replace: CertReplaceResult | None = None
    live: list[LiveCheck] = Field(default_factory=list)


class Renewal(BaseModel):
    """What the check found: the current certificate, its names and owner, the guards'
    readings, and (once ordered) the issued pair validated against the current one."""

    current: SourceScan
    names: list[str]
    owner: SecretOwner
    recent: list[LastIssued] = Field(default_factory=list)
    staged_exists: bool = False
    issued: Issued | None = None
    check: ReplacementCheck | None = None


SPEC: RunbookSpec[CertRenewParams] = RunbookSpec(
    name=RUNBOOK,
    title="Emergency certificate renewal (ACME)",
    severity="critical",
    topic="security",
    lock=lambda p: secret_lock(p.namespace, p.secret),
)


def staged_name(params: CertRenewParams) -> str:
    """The staged Secret: a fixed name, so RBAC can grant `get` on it by name
    (deployments/k8s/cert-renew.yaml)."""
    return f"{params.secret}-acme"[:253]


def replace_params(params: CertRenewParams) -> CertReplaceParams:
    """The cert-replace parameters that install the staged pair over the Secret."""
    return CertReplaceParams(
        namespace=params.namespace,
        secret=params.secret,
        new_secret=staged_name(params),
        ingress_deployment=params.ingress_deployment,
        ingress_namespace=params.ingress_namespace,
        restart_ingress=params.restart_ingress,
        dry_run=params.dry_run,
    )


def _flow_run_name() -> str:
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.name) if ctx and ctx.flow_run else "local"


def _order_plan(params: CertRenewParams, names: list[str]) -> str:
    """What the run does before the install: the order and the staging."""
    return (
        f"order a certificate for {', '.join(names)} over ACME (HTTP-01), stage it in Secret "
        f"{params.namespace}/{staged_name(params)}, then (after approval) "
    )


class CertRenew(Runbook[CertRenewParams, Renewal]):
    """Order and stage before asking; install through cert-replace's action; verify live."""

    spec = SPEC

    def __init__(self) -> None:
        self.first: Renewal | None = None
        self.staged: str | None = None
        self.ordering = False
        self.live: list[LiveCheck] = []

    def title(self, params: CertRenewParams) -> str:
        return f"Emergency certificate for {params.namespace}/{params.secret}"

    def check(self, params: CertRenewParams, report: Report) -> Renewal:
        found = self._read(params, report)
        self.first = found
        stop = self.refuse(params, found)
        if stop is not None and params.dry_run:
            # The driver stops a dry run before its refusals: say what a real run would do.
            report.add("A real run would be refused", md_escape(stop.note))
        if params.dry_run or stop is not None:
            return found  # a dry run contacts no CA; a refused run orders nothing
        if params.restart_ingress:
            # Before the order: a missing or paused ingress must not cost a day's issuance.
            probe = restart_rollout(
                params.ingress_deployment, params.ingress_namespace, dry_run=True
            )
            report.add("Ingress pre-check", md_escape(probe.message))
        found = self._order(params, found, report)
        self.first = found
        return found

    def _read(self, params: CertRenewParams, report: Report) -> Renewal:
        """The current certificate, its names, its owner and the guards' readings."""
        target = f"{params.namespace}/{params.secret}"
        current = read_tls_secret(params.namespace, params.secret)
        leaf = current.certificates[0]
        if leaf.san_ips:
            # cert-replace requires the new certificate to cover every current name: an order
            # without them would be refused after it cost the day's issuance.
            raise PermanentError(
                f"{target} also covers IP addresses ({', '.join(leaf.san_ips)}); order DNS "
                "names only: replace it by hand"
            )
        names = check_names(leaf.san_dns, "http-01")
        report.add(
            "Current certificate",
            table(
                ["serial", "not after (UTC)", "names", "endpoints to verify"],
                [
                    [
                        leaf.serial,
                        f"{leaf.not_after:%Y-%m-%d %H:%M}",
                        ", ".join(names),
                        ", ".join(params.endpoints) or "none",
                    ]
                ],
            ),
        )
        found = Renewal(
            current=current,
            names=names,
            owner=read_secret_owner(params.namespace, params.secret),
            recent=last_issuances(names),
            staged_exists=secret_exists(params.namespace, staged_name(params)),
        )
        _guards_md(found, report)
        return found

    def _order(self, params: CertRenewParams, found: Renewal, report: Report) -> Renewal:
        """Order, stage, and validate the staged pair against the current certificate."""
        name = staged_name(params)
        self.ordering = True
        staged = issue_to_staged_secret(found.names, params.namespace, name, _flow_run_name())
        self.staged = f"{params.namespace}/{name}"
        issued = staged.issued
        report.add(
            "Issued and staged",
            table(
                ["what", "value"],
                [
                    ["serial", issued.serial],
                    ["SHA-256", issued.fingerprint_sha256],
                    ["not after (UTC)", f"{issued.not_after:%Y-%m-%d %H:%M}"],
                    ["names", ", ".join(issued.names)],
                    ["challenge", issued.challenge],
                    ["order", issued.order_url],
                    ["seconds", issued.elapsed_s],
                    ["staged Secret", self.staged],
                ],
            ),
        )
        check = measure(replace_params(params), found.current).check
        report.add("New certificate", cert_table(check.new) if check.new else "_unreadable_")
        report.add("Validation", validation_md(check))
        if not check.ok:
            raise SafetyViolation(
                f"new pair for {params.namespace}/{params.secret} refused: "
                + "; ".join(check.problems)
            )
        return found.model_copy(update={"issued": issued, "check": check})

    def plan(self, params: CertRenewParams, findings: Renewal) -> list[Action]:
        new = findings.check.new if findings.check else []
        # Before the order the plan names it; after, the approver sees the issued pair.
        pre = "" if findings.issued else _order_plan(params, findings.names)
        return [install_action(replace_params(params), findings.current, new, pre)]

    def refuse(self, params: CertRenewParams, findings: Renewal) -> Stop | None:
        target, owner = f"{params.namespace}/{params.secret}", findings.owner
        if owner.managed_by == "cert-manager":
            where = owner.certificate or "the Certificate whose secretName is this Secret"
            return Stop(
                "refused",
                f"{target} is managed by cert-manager ({owner.evidence}); see Certificate "
                f"{where}. Nothing was changed.",
            )
        if findings.issued is not None:
            return None  # this run ordered and staged: its own issuance is no reason to stop
        if findings.recent:
            return Stop(
                "refused",
                f"emergency issuance refused: {', '.join(r.name for r in findings.recent)} "
                "already issued within the last day (CA rate limits); install that one with "
                "cert-replace. Nothing was changed.",
            )
        if findings.staged_exists:
            return Stop(
                "refused",
                f"staged Secret {params.namespace}/{staged_name(params)} exists from an earlier "
                "run: install it with cert-replace (new_secret) or delete it, then run again. "
                "Nothing was changed.",
            )
        return None

    def remeasure(self, params: CertRenewParams, report: Report) -> Renewal:
        # Never a second order: the Secret, its owner and the staged pair read again.
        assert self.first is not None
        now: Measured = measure_again(replace_params(params), report)
        owner = read_secret_owner(params.namespace, params.secret)
        return self.first.model_copy(
            update={"current": now.current, "owner": owner, "check": now.check}
        )

    def still_valid(
        self,
        params: CertRenewParams,
        approved: list[Action],
        fresh: list[Action],
        findings: Renewal,
        now: Renewal,
    ) -> list[Action] | Stop:
        assert now.check is not None
        return still_approved(approved, fresh, now.check)

    def verify(
        self,
        params: CertRenewParams,
        findings: Renewal,
        records: list[ActionRecord],
        report: Report,
    ) -> Verification | None:
        held = verify_secret(params.namespace, params.secret, records, report)
        if not held.healthy or findings.issued is None:
            return held
        issued = findings.issued
        self.live = [
            wait_until_serving(e, issued.fingerprint_sha256, params.verify_timeout_s)
            for e in params.endpoints
        ]
        report.add(
            "Live endpoints",
            table(
                ["endpoint", "serves the new certificate", "serial seen", "probes", "error"],
                [
                    [c.endpoint, c.serving_new, c.serial or "", c.attempts, c.error or ""]
                    for c in self.live
                ],
            ),
        )
        stale = [c.endpoint for c in self.live if not c.serving_new]
        if stale:
            return Verification(
                healthy=False,
                summary=f"{', '.join(stale)} still not serving serial {issued.serial} after "
                f"{params.verify_timeout_s:.0f} s; the Secret holds it (the undo record names "
                "the backup)",
            )
        get_run_logger().warning(
            "cert-renew: %s/%s now holds serial %s", params.namespace, params.secret, issued.serial
        )
        return Verification(healthy=True, summary=f"serial {issued.serial} served")

    def concluded(
        self, params: CertRenewParams, result: RunResult[Renewal], report: Report
    ) -> None:
        if self.staged and result.outcome != "acted":
            report.add(
                "Staged pair kept",
                f"The new pair stays in {md_code(self.staged)}: install it later with "
                "`cert-replace` (new_secret), or delete it.",
            )

    def stopped(self, params: CertRenewParams, report: Report) -> str | None:
        written = changed_note(report)
        if written != "Nothing was changed.":
            return written
        if self.staged:
            return (
                f"The TLS Secret was not changed. The new pair is staged in "
                f"{md_code(self.staged)}; the issuance is recorded for today."
            )
        if self.ordering:
            return (
                "Nothing was changed in the cluster. The CA may have seen an order; if it "
                "issued, the issuance is recorded for today (see the task's log)."
            )
        return written


def _guards_md(found: Renewal, report: Report) -> None:
    """The guards' readings, where one would refuse the run."""
    owner = found.owner
    if owner.managed_by == "cert-manager":
        where = owner.certificate or "the Certificate whose secretName is this Secret"
        report.add(
            "Managed by cert-manager",
            f"{md_escape(owner.evidence)}. Not replaced behind cert-manager's back: look at "
            f"Certificate {md_code(where)} instead (`kubectl describe certificate`, its "
            "CertificateRequest and Order).",
        )
    if found.recent:
        report.add(
            "Once per name per day",
            table(
                ["name", "issued at (UTC)", "serial", "run"],
                [[r.name, f"{r.at:%Y-%m-%d %H:%M}", r.serial, r.flow_run] for r in found.recent],
            ),
        )


@runbook_flow(SPEC)
def cert_renew(params: CertRenewParams) -> CertRenewResult:
    """Order a certificate over ACME, stage it, replace the TLS Secret behind approval."""
    runbook = CertRenew()
    result = drive(runbook, params)
    found = result.findings
    check = found.check
    return CertRenewResult(
        outcome=result.outcome,
        names=found.names,
        managed_by=found.owner.managed_by,
        certificate=found.owner.certificate,
        issued=found.issued,
        staged_secret=staged_name(params) if found.issued else None,
        replace=CertReplaceResult(
            outcome=result.outcome,
            check=check,
            replacement=installed(result.records),
            approver=approver(result),
        )
        if check
        else None,
        live=runbook.live,
    )
