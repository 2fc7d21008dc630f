"""Runbook "SSL Certificate Expiring", the emergency issuance: `cert-renew`.

Trigger: by hand only (the UI), from the emergency checklist that `cert-expiry`
(`flows/cert_expiry.py`) publishes when a certificate is critical and nobody can fetch a
new pair by hand in time. It replaces the "request an emergency certificate from Let's
Encrypt, install it, restart the ingress" steps.

What it may change: it orders a certificate from the ACME CA of `AcmeSettings` for the
names the current certificate covers, stages the new pair as a TLS Secret
`<secret>-acme` in the same namespace, then runs `cert-replace`'s path
(`flows/cert_replace.py`): approval → backup Secret → replace the TLS Secret → rollout
restart of the ingress → read back. Finally it checks that the live endpoints serve the
new certificate.

Safety limits: a dry run unless `dry_run` is false (the dry run contacts no CA). A Secret
that cert-manager manages (`cert-manager.io/*` annotations or an ownerReference to a
Certificate) is never replaced: the run names the Certificate to look at instead. At most
one emergency issuance per name per day (a Prefect Variable per name, see docs/acme.md).
The ingress is checked (server-side dry run of the restart) before anything is ordered.
The private key is generated inside the issuing task and goes only into the staged
Secret. The replacement itself keeps every `cert-replace` guard (validation, approval, only
the approved pair installed, the resourceVersion precondition, the undo in the artifact).

Undo: as `cert-replace` (the backup Secret; the report prints the commands). The staged
Secret can be deleted once the incident is over.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import get_run_logger
from prefect.context import FlowRunContext
from pydantic import BaseModel, Field

from flows.cert_replace import (
    BEFORE_HEADING,
    CertReplaceParams,
    CertReplaceResult,
    replace_pair,
)
from flows.common import Report, md_code, md_escape, publish_on_exit, table, tag_run
from flows.spec import RunbookSpec, runbook_flow
from tasks.acme import (
    Issued,
    LastIssued,
    LiveCheck,
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
from tasks.tls import KubeName, Namespace, read_tls_secret

RUNBOOK = "cert-renew"


class CertRenewParams(BaseModel):
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
    dry_run: bool = Field(True, description="Plan only: no order, no change.")
    approval_timeout_s: int = Field(
        1200, ge=10, le=86_400, description="How long to wait for an approver; then refuse."
    )
    verify_timeout_s: float = Field(
        120.0, gt=0, le=1800, description="How long the endpoints may take to serve it."
    )
    reason: str = Field("", description="Why (incident id, alert); recorded in the audit.")


class CertRenewResult(BaseModel):
    """The outcome of one `cert-renew` run."""

    outcome: Literal["refused", "dry run", "not approved", "replaced"]
    names: list[str]
    managed_by: str = "manual"
    certificate: str | None = None
    issued: Issued | None = None
    staged_secret: str | None = None
    replace: CertReplaceResult | None = None
    live: list[LiveCheck] = Field(default_factory=list)


def _flow_run_name() -> str:
    ctx = FlowRunContext.get()
    return str(ctx.flow_run.name) if ctx and ctx.flow_run else "local"


SPEC: RunbookSpec[Any] = RunbookSpec(
    name=RUNBOOK,
    title="Emergency certificate renewal (ACME)",
    severity="critical",
    topic="security",
)


@runbook_flow(SPEC)
def cert_renew(params: CertRenewParams) -> CertRenewResult:
    """Order a certificate over ACME, stage it, replace the TLS Secret behind approval."""
    tag_run(RUNBOOK)
    target = f"{params.namespace}/{params.secret}"
    report = Report(RUNBOOK, f"Emergency certificate for {target}")
    report.add(
        "Request",
        f"- why: {md_escape(params.reason) or '_not given_'}\n- dry run: {params.dry_run}\n"
        f"- endpoints to verify: {md_escape(', '.join(params.endpoints)) or '_none_'}",
    )
    outcome = "stopped"
    state: dict[str, str] = {}
    with publish_on_exit(report, lambda: f"{RUNBOOK} {target}: {outcome}"):
        try:
            result = _renew(params, report, state)
        except Exception:
            report.add("Stopped", _what_changed(report, state))
            raise
        outcome = result.outcome
        return result


def _what_changed(report: Report, state: dict[str, str]) -> str:
    """What a failed run may have left behind, for the `Stopped` section."""
    if any(s.startswith(f"## {BEFORE_HEADING}") for s in report.sections):
        return (
            f"The Secret may have been changed: **{BEFORE_HEADING}** names the backup and the undo."
        )
    if "staged" in state:
        return (
            f"The TLS Secret was not changed. The new pair is staged in "
            f"{md_code(state['staged'])}; the issuance is recorded for today."
        )
    if "ordering" in state:
        return (
            "Nothing was changed in the cluster. The CA may have seen an order; if it issued, "
            "the issuance is recorded for today (see the task's log)."
        )
    return "Nothing was changed."


def _renew(params: CertRenewParams, report: Report, state: dict[str, str]) -> CertRenewResult:
    """Check, plan, order, stage, then cert-replace's path, then the live endpoints."""
    logger = get_run_logger()
    target = f"{params.namespace}/{params.secret}"
    current = read_tls_secret(params.namespace, params.secret)
    leaf = current.certificates[0]
    if leaf.san_ips:
        # cert-replace requires the new certificate to cover every current name: an order
        # without them would be refused after it cost the day's issuance.
        raise PermanentError(
            f"{target} also covers IP addresses ({', '.join(leaf.san_ips)}); order DNS names "
            "only: replace it by hand"
        )
    names = check_names(leaf.san_dns, "http-01")
    report.add(
        "Current certificate",
        table(
            ["serial", "not after (UTC)", "names"],
            [[leaf.serial, f"{leaf.not_after:%Y-%m-%d %H:%M}", ", ".join(names)]],
        ),
    )
    owner = read_secret_owner(params.namespace, params.secret)
    if owner.managed_by == "cert-manager":
        where = owner.certificate or "the Certificate whose secretName is this Secret"
        report.add(
            "Managed by cert-manager",
            f"{md_escape(owner.evidence)}. Not replaced behind cert-manager's back: look at "
            f"Certificate {md_code(where)} instead (`kubectl describe certificate`, its "
            "CertificateRequest and Order).",
        )
        report.add("Outcome", "Refused: nothing changed.")
        raise SafetyViolation(
            f"{target} is managed by cert-manager ({owner.evidence}); see Certificate {where}"
        )
    recent: list[LastIssued] = last_issuances(names)
    if recent:
        report.add(
            "Once per name per day",
            table(
                ["name", "issued at (UTC)", "serial", "run"],
                [[r.name, f"{r.at:%Y-%m-%d %H:%M}", r.serial, r.flow_run] for r in recent],
            ),
        )
        report.add("Outcome", "Refused: an emergency certificate was issued within a day.")
        raise SafetyViolation(
            f"emergency issuance refused: {', '.join(r.name for r in recent)} already issued "
            "within the last day (CA rate limits); install that one with cert-replace"
        )
    # A fixed name, so RBAC can grant `get` on it by name (deployments/k8s/cert-renew.yaml).
    staged_name = f"{params.secret}-acme"[:253]
    if secret_exists(params.namespace, staged_name):
        report.add("Outcome", "Refused: nothing changed.")
        raise SafetyViolation(
            f"staged Secret {params.namespace}/{staged_name} exists from an earlier run: "
            "install it with cert-replace (new_secret) or delete it, then run again"
        )
    plan = (
        f"Order a certificate for {', '.join(names)} over ACME (HTTP-01), stage it in Secret "
        f"{params.namespace}/{staged_name}, then (after approval) back up and replace {target}"
        + (
            f", rollout restart deployment {params.ingress_namespace}/{params.ingress_deployment}"
            if params.restart_ingress
            else ""
        )
        + (f", and check {', '.join(params.endpoints)} serve it" if params.endpoints else "")
        + "."
    )
    report.add("Plan", md_escape(plan))
    if params.restart_ingress:
        # Before the order: a missing or paused ingress must not cost a day's issuance.
        probe = restart_rollout(params.ingress_deployment, params.ingress_namespace, dry_run=True)
        report.add("Ingress pre-check", md_escape(probe.message))
    if params.dry_run:
        report.add("Outcome", "Dry run: no order, nothing changed. Run again with dry_run off.")
        return CertRenewResult(outcome="dry run", names=names)

    state["ordering"] = "yes"
    staged = issue_to_staged_secret(names, params.namespace, staged_name, _flow_run_name())
    state["staged"] = f"{params.namespace}/{staged_name}"
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
                ["staged Secret", state["staged"]],
            ],
        ),
    )
    replaced = replace_pair(
        CertReplaceParams(
            namespace=params.namespace,
            secret=params.secret,
            new_secret=staged_name,
            ingress_deployment=params.ingress_deployment,
            ingress_namespace=params.ingress_namespace,
            restart_ingress=params.restart_ingress,
            dry_run=False,
            approval_timeout_s=params.approval_timeout_s,
            reason=params.reason or f"{RUNBOOK} emergency certificate",
        ),
        report,
    )
    result = CertRenewResult(
        outcome=replaced.outcome,
        names=names,
        issued=issued,
        staged_secret=staged_name,
        replace=replaced,
    )
    if replaced.outcome != "replaced":
        report.add(
            "Staged pair kept",
            f"The new pair stays in {md_code(state['staged'])}: install it later with "
            "`cert-replace` (new_secret), or delete it.",
        )
        return result
    for endpoint in params.endpoints:
        result.live.append(
            wait_until_serving(endpoint, issued.fingerprint_sha256, params.verify_timeout_s)
        )
    report.add(
        "Live endpoints",
        table(
            ["endpoint", "serves the new certificate", "serial seen", "probes", "error"],
            [
                [c.endpoint, c.serving_new, c.serial or "", c.attempts, c.error or ""]
                for c in result.live
            ],
        ),
    )
    stale = [c.endpoint for c in result.live if not c.serving_new]
    if stale:
        raise PermanentError(
            f"{', '.join(stale)} still not serving serial {issued.serial} after "
            f"{params.verify_timeout_s:.0f} s; the Secret holds it"
        )
    report.add("Outcome", f"Replaced with serial {issued.serial}; endpoints serve it.")
    logger.warning("cert-renew: %s now holds serial %s", target, issued.serial)
    return result
