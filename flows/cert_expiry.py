"""Runbook "SSL Certificate Expiring", the check: `cert-expiry`.

Trigger: daily at 06:00 UTC (the schedule is in `deployments/catalog.py`), on the
`CertificateExpiringInDays` alert, or by hand. When a certificate is critical, its report
carries the emergency checklist, whose step 3 is the `cert-replace` runbook
(`flows/cert_replace.py`).

What it may change: nothing. It reads PEM files, live endpoints (a TLS handshake without
sending any request) and Kubernetes TLS Secrets (`tls.crt` only), and asks the OCSP
responders and CRL distribution points the served certificates name (each switchable off:
`RUNBOOKS_TLS_OCSP`, `_CRL`, `_OCSP_STAPLING`).

On the driver (`flows/driver.py`): the scan is the check (one evidence row per kind of
source), the plan is always empty, and the verification is the verdict. A certificate past
a threshold, or a source that could not be checked, fails the run
(`CertificatesNeedAttention`, outcome `failed`) after paging at the worst level found:
critical (< 1 day, expired, revoked, wrong host) or high (<= 7 days); medium and low fail
without a page from inside the run. Otherwise the outcome is `nothing to do`.

Safety limits: read-only; one failing source never hides the others (each failure is a
row of the report). The report artifact is published on every exit path, including an
exception in any step.

Undo: nothing to undo.
"""

from __future__ import annotations

from pathlib import Path
from shlex import quote
from typing import Any, Literal

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import unmapped
from pydantic import BaseModel, Field

from flows.common import Report, md_code, md_escape, table
from flows.driver import NotFixed, Runbook, Verification, checks_md, drive
from flows.report_text import short_days
from flows.spec import (
    Action,
    ActionRecord,
    Check,
    Outcome,
    RequestParams,
    RunbookSpec,
    Verdict,
    runbook_flow,
)
from flows.spec import Severity as PageSeverity
from tasks.errors import RunbookError, TransientError
from tasks.settings import TlsSettings
from tasks.tls import (
    CertificateInfo,
    Finding,
    KubeName,
    Namespace,
    Severity,
    SourceScan,
    Thresholds,
    evaluate,
    expand_cert_paths,
    probe_tls_endpoint,
    probe_tls_endpoints,
    read_cert_file,
    read_tls_secret,
    worst,
)

RUNBOOK = "cert-expiry"
_BATCH = 50  # endpoints per probe task


class SecretRef(BaseModel):
    """A Kubernetes TLS Secret to check."""

    namespace: Namespace = Field(description="Namespace of the Secret.")
    name: KubeName = Field(description="Name of the Secret (type kubernetes.io/tls).")


def _tls() -> TlsSettings:
    return TlsSettings()


class CertExpiryParams(RequestParams):
    """What to scan and when to alert; defaults come from `RUNBOOKS_TLS_*`."""

    files: list[str] = Field(
        default_factory=lambda: [str(p) for p in _tls().files],
        description="PEM/DER files or directories of them (e.g. /etc/ssl/certs/akig.crt).",
    )
    endpoints: list[str] = Field(
        default_factory=lambda: list(_tls().endpoints),
        description="Live endpoints: host:port, or sni-name@host:port to connect to host "
        "but ask for (and check) sni-name.",
    )
    secrets: list[SecretRef] = Field(
        default_factory=list, description="Kubernetes TLS Secrets (namespace + name)."
    )
    thresholds: Thresholds = Field(
        default_factory=lambda: Thresholds.from_settings(_tls()),
        description="Alert thresholds and the severity mapping (see docs/tls.md).",
    )
    connect_timeout_s: float = Field(
        default_factory=lambda: _tls().connect_timeout_s,
        gt=0,
        le=60,
        description="Per endpoint: TCP connect + TLS handshake, in seconds.",
    )


class ScanError(BaseModel):
    """A source that could not be checked, and why (no secrets in the message)."""

    source: str
    kind: Literal["file", "endpoint", "secret"]
    transient: bool = Field(description="True: timeout / refused; retried, still failing.")
    message: str


class CertExpiryResult(BaseModel):
    """The outcome of one `cert-expiry` run."""

    outcome: Outcome = Field(
        "nothing to do", description="A read-only check: nothing to do, or failed (raised)."
    )
    findings: list[Finding] = Field(description="Every certificate seen, by days left.")
    errors: list[ScanError]
    worst: Severity
    sources_scanned: int

    @property
    def alerts(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is not Severity.OK]


class CertificatesNeedAttention(NotFixed):
    """The check found certificates past a threshold, or sources it could not check."""


_Kind = Literal["file", "endpoint", "secret"]


def _collect(
    pending: list[tuple[_Kind, str, PrefectFuture[SourceScan]]],
) -> tuple[list[SourceScan], list[ScanError]]:
    scans: list[SourceScan] = []
    errors: list[ScanError] = []
    for kind, source, future in pending:
        try:
            scans.append(future.result())
        except RunbookError as exc:
            errors.append(
                ScanError(
                    source=source,
                    kind=kind,
                    transient=isinstance(exc, TransientError),
                    message=str(exc),
                )
            )
        except Exception as exc:  # noqa: BLE001 - a bug must not hide the other results
            errors.append(
                ScanError(
                    source=source,
                    kind=kind,
                    transient=False,
                    message=f"{type(exc).__name__}: {str(exc)[:200]}",
                )
            )
    return scans, errors


def _rows(findings: list[Finding], infos: dict[tuple[str, int], CertificateInfo]) -> list[Any]:
    rows = []
    for f in findings:
        info = infos[(f.source, f.position)]
        rows.append(
            {
                "severity": f.severity.value,
                "days_left": round(f.days_left, 2),
                "not_after": f.not_after.isoformat(timespec="minutes"),
                "source": f.source,
                "kind": f.kind,
                "position": f.position,
                "subject": f.subject,
                "issuer": info.issuer,
                "sans": ", ".join(info.sans)[:200],
                "serial": f.serial,
                "key": f"{info.key_type} {info.key_size or ''}".strip(),
                "signature": info.signature_algorithm,
                "lifetime_left": f"{info.lifetime_fraction_left:.0%}",
                "hostname_match": "" if info.hostname_match is None else info.hostname_match,
                "self_signed": info.self_signed,
                "threshold_days": f.crossed_days if f.crossed_days is not None else "",
                "revocation": info.revocation or "",
                "reasons": "; ".join(f.reasons),
            }
        )
    return rows


def emergency_checklist(
    critical: list[Finding], infos: dict[tuple[str, int], CertificateInfo]
) -> str:
    """The on-call runbook's emergency steps, filled in with the sources found critical."""
    lines = [
        "Severity **critical**: page on-call now (< 15 min), per the escalation path.",
        "",
        "- [ ] **1. Verify certificate details**",
    ]
    # Sources and SANs are outside text: shell-quoted in the commands, which are shown
    # verbatim as code spans (never interpreted as markdown).
    for f in critical:
        if f.kind == "file":
            cmd = f"openssl x509 -in {quote(f.source)} -text -noout"
        elif f.kind == "endpoint":
            name, _, addr = f.source.rpartition("@")
            host = addr.rsplit(":", 1)[0].strip("[]")
            cmd = (
                f"openssl s_client -connect {quote(addr)} -servername {quote(name or host)} "
                "-showcerts </dev/null | openssl x509 -noout -subject -dates -ext subjectAltName"
            )
        else:
            ns, _, name = f.source.partition("/")
            cmd = (
                f"kubectl -n {quote(ns)} get secret {quote(name)} "
                "-o jsonpath='{.data.tls\\.crt}' | base64 -d | openssl x509 -text -noout"
            )
        lines.append(f"    - {md_code(cmd)}  ({md_escape('; '.join(f.reasons))})")
    hosts = sorted(
        {h for f in critical for h in infos[(f.source, f.position)].sans if f.position == 0}
    )
    lines += [
        "- [ ] **2. If missing or expiring, request an emergency certificate** from Let's "
        "Encrypt (cert-manager: `cmctl renew -n NS CERTIFICATE`; else "
        "`certbot certonly -d HOST ...`). It must cover: "
        + (", ".join(md_code(h) for h in hosts) or "the same hosts as the current one"),
        "- [ ] **3. Update with the new certificate.** Kubernetes Secret: stage it with "
        "`kubectl -n NS create secret tls NAME-new --cert=fullchain.pem --key=privkey.pem`, "
        "then run the `cert-replace` flow (namespace, secret, new_secret=NAME-new) as a dry "
        "run, read its plan, run again with dry_run off and approve. File: install the new "
        "fullchain in place of the old file, keeping a copy of the old one.",
        "- [ ] **4. Restart Nginx / the Ingress controller** (`cert-replace` does it after "
        "approval: rollout restart of the ingress Deployment; on a host: "
        "`nginx -t && systemctl reload nginx`).",
        "- [ ] **5. Verify**: run `cert-expiry` again; the source must be `ok`.",
        "- [ ] **6. Afterwards**: why did renewal not happen? (cert-manager logs, "
        "`kubectl describe certificate`); test rotation monthly.",
    ]
    return "\n".join(lines)


# Probes wait on the network, not the CPU: many threads, one per endpoint in flight.
_RUNNER: ThreadPoolTaskRunner[Any] = ThreadPoolTaskRunner(max_workers=TlsSettings().max_workers)


SPEC: RunbookSpec[CertExpiryParams] = RunbookSpec(
    name=RUNBOOK,
    title="TLS certificate expiry",
    severity="high",
    topic="security",
    dry_run_field=None,
)

#: How loud a failed check pages: < 1 day (or expired, wrong host) critical, <= 7 days high;
#: medium and low fail the run without paging from inside it.
_PAGED: dict[Severity, PageSeverity] = {Severity.CRITICAL: "critical", Severity.HIGH: "high"}


class CertVerification(Verification):
    """The verdict, with the worst severity seen (it sets how loud the page is)."""

    worst: Severity


class CertExpiry(Runbook[CertExpiryParams, CertExpiryResult]):
    """Read-only: the scan is the check, the plan is always empty, the verdict is the verify."""

    spec = SPEC
    not_fixed = CertificatesNeedAttention

    def title(self, params: CertExpiryParams) -> str:
        return "Certificate expiry check"

    def check(self, params: CertExpiryParams, report: Report) -> CertExpiryResult:
        scans, errors, sources = _scan(params)
        return _report(params, scans, errors, sources, report)

    def plan(self, params: CertExpiryParams, findings: CertExpiryResult) -> list[Action]:
        # Nothing to change here: the emergency checklist (and `cert-replace`) is for humans.
        return []

    def verify(
        self,
        params: CertExpiryParams,
        findings: CertExpiryResult,
        records: list[ActionRecord],
        report: Report,
    ) -> CertVerification:
        return _verdict(findings)

    def not_fixed_message(self, params: CertExpiryParams, verification: Verification) -> str:
        return verification.summary

    def escalation_severity(
        self, params: CertExpiryParams, verification: Verification
    ) -> PageSeverity | None:
        # One page per run, at the worst level found.
        if isinstance(verification, CertVerification):
            return _PAGED.get(verification.worst)
        return self.spec.severity


@runbook_flow(SPEC, task_runner=_RUNNER)
def cert_expiry(params: CertExpiryParams = CertExpiryParams()) -> CertExpiryResult:  # noqa: B008
    """Check certificates in files, on live endpoints and in Kubernetes TLS Secrets."""
    result = drive(CertExpiry(), params)
    return result.findings.model_copy(update={"outcome": result.outcome})


def _scan(params: CertExpiryParams) -> tuple[list[SourceScan], list[ScanError], int]:
    """Read every source; a failing source becomes a `ScanError`, never an exception."""
    logger = get_run_logger()
    paths = expand_cert_paths(Path(p) for p in params.files)
    pending: list[tuple[_Kind, str, PrefectFuture[SourceScan]]] = []
    for path, fut in zip(paths, read_cert_file.map(paths), strict=True):
        pending.append(("file", str(path), fut))
    # Endpoints go in batches: a Prefect task costs ~50 ms of bookkeeping here, a probe
    # ~10 ms, so one task per endpoint could not scan 200 in < 5 s. Only endpoints that
    # failed transiently get their own task, with the retry policy (docs/tls.md).
    eps = params.endpoints
    batches = [
        (
            probe_tls_endpoints.submit(
                eps[i : i + _BATCH],
                timeout_s=params.connect_timeout_s,
                label=f"{i + 1}-{min(i + _BATCH, len(eps))}-of-{len(eps)}",
            ),
            eps[i : i + _BATCH],
        )
        for i in range(0, len(eps), _BATCH)
    ]
    for ref in params.secrets:
        fut = read_tls_secret.submit(ref.namespace, ref.name)
        pending.append(("secret", f"{ref.namespace}/{ref.name}", fut))
    scans, errors = _collect(pending)
    again: list[str] = []
    for batch, batch_eps in batches:
        try:
            outcomes = batch.result()
        except Exception as exc:  # noqa: BLE001 - a bug: report the batch, keep the rest
            errors += [
                ScanError(source=ep, kind="endpoint", transient=False, message=repr(exc)[:200])
                for ep in batch_eps
            ]
            continue
        for o in outcomes:
            if o.scan is not None:
                scans.append(o.scan)
            elif o.transient:
                again.append(o.endpoint)
            else:
                errors.append(
                    ScanError(
                        source=o.endpoint, kind="endpoint", transient=False, message=o.error or ""
                    )
                )
    if again:
        logger.info("probing %d endpoint(s) again, with retries", len(again))
        retried = probe_tls_endpoint.map(again, timeout_s=unmapped(params.connect_timeout_s))
        more, more_errors = _collect(
            [("endpoint", ep, fut) for ep, fut in zip(again, retried, strict=True)]
        )
        scans += more
        errors += more_errors
    return scans, errors, len(pending) + len(eps)


def _report(
    params: CertExpiryParams,
    scans: list[SourceScan],
    errors: list[ScanError],
    sources: int,
    report: Report,
) -> CertExpiryResult:
    """Grade every certificate, publish the table and the checklist, fill in the report."""
    infos = {(c.source, c.position): c for s in scans for c in s.certificates}
    findings = sorted(
        (evaluate(c, params.thresholds) for c in infos.values()),
        key=lambda f: (f.days_left, f.source, f.position),
    )
    result = CertExpiryResult(
        findings=findings,
        errors=errors,
        worst=worst(f.severity for f in findings),
        sources_scanned=sources,
    )
    alerts = result.alerts
    report.add("Summary", summary_line(result))
    report.add("Evidence", checks_md(source_checks(params, scans, result)))
    report.add(
        "Certificates (soonest expiry first)",
        table(
            ["severity", "days left", "not after (UTC)", "source", "#", "subject", "reasons"],
            [
                [
                    f.severity.value,
                    short_days(f.days_left),
                    f.not_after.strftime("%Y-%m-%d %H:%M"),
                    f.source,
                    f.position,
                    f.subject,
                    "; ".join(f.reasons),
                ]
                for f in findings
            ],
        ),
    )
    if errors:
        report.add(
            "Sources not checked",
            table(
                ["source", "kind", "transient", "error"],
                [[e.source, e.kind, e.transient, e.message] for e in errors],
            ),
        )
    endpoints = [s for s in scans if s.kind == "endpoint"]
    if endpoints:
        report.add("Endpoint chains and revocation", _chains(endpoints))
    notes = [s for s in scans if s.note]
    if notes:
        report.add(
            "Notes", "\n".join(f"- {md_escape(s.source)}: {md_escape(s.note)}" for s in notes)
        )
    create_table_artifact(
        key="cert-expiry-certificates",
        table=_rows(findings, infos),
        description=f"{len(findings)} certificate(s) from {sources} source(s), "
        "soonest expiry first",
    )
    critical = [f for f in alerts if f.severity is Severity.CRITICAL]
    if critical:
        checklist = emergency_checklist(critical, infos)
        report.add("Emergency checklist", checklist)
        create_markdown_artifact(
            key="cert-emergency-checklist",
            markdown="# Certificate emergency\n\n" + checklist,
            description="Guided steps for critical certificates (expired, < 24 h, wrong host)",
        )
    return result


def summary_line(result: CertExpiryResult) -> str:
    """Sources, certificates, how many past a threshold and how many not checked."""
    return (
        f"{result.sources_scanned} source(s), {len(result.findings)} certificate(s): "
        f"{len(result.alerts)} past a threshold (worst: {result.worst.value}), "
        f"{len(result.errors)} source(s) not checked."
    )


def source_checks(
    params: CertExpiryParams, scans: list[SourceScan], result: CertExpiryResult
) -> list[Check]:
    """One evidence row per kind of source: certificates past a threshold fail it, a
    source that could not be read makes it unavailable, none configured says so."""
    configured = {"file": params.files, "endpoint": params.endpoints, "secret": params.secrets}
    names = {"file": "files", "endpoint": "endpoints", "secret": "Kubernetes TLS Secrets"}
    warn = params.thresholds.warn_days
    threshold = "every certificate ok" + (f" (warns from {max(warn)} days)" if warn else "")
    rows = []
    for kind, name in names.items():
        sources = sum(s.kind == kind for s in scans) + sum(e.kind == kind for e in result.errors)
        certs = sum(f.kind == kind for f in result.findings)
        alerts = sum(f.kind == kind for f in result.alerts)
        errors = sum(e.kind == kind for e in result.errors)
        if alerts:
            verdict = Verdict.FAIL
        elif errors:
            verdict = Verdict.UNAVAILABLE
        else:
            verdict = Verdict.PASS if configured[kind] else Verdict.NOT_CONFIGURED
        rows.append(
            Check(
                item=name,
                threshold=threshold,
                observed=f"{sources} source(s), {certs} certificate(s), {alerts} past a threshold",
                verdict=verdict,
                detail=f"{errors} source(s) not checked" if errors else "",
            )
        )
    return rows


def _yes_no(value: bool | None) -> str:
    return "" if value is None else ("yes" if value else "NO")


def _chains(endpoints: list[SourceScan]) -> str:
    """Per endpoint: TLS version, the presented chain's order and completeness, whether
    the server stapled OCSP, and the leaf's revocation verdict (docs/tls.md)."""
    rows = []
    for s in sorted(endpoints, key=lambda s: s.source):
        leaf = s.certificates[0] if s.certificates else None
        revocation = (leaf.revocation or "") if leaf else ""
        detail = leaf.revocation_detail if leaf and revocation not in ("good", "off") else ""
        rows.append(
            [
                s.source,
                s.tls_version or "",
                len(s.certificates),
                _yes_no(s.chain_in_order),
                _yes_no(s.chain_complete),
                _yes_no(s.ocsp_stapled),
                f"{revocation}: {detail}" if detail else revocation,
            ]
        )
    return table(
        ["endpoint", "TLS", "certs", "in order", "complete", "stapled", "revocation (leaf)"], rows
    )


def _verdict(result: CertExpiryResult) -> CertVerification:
    """Log what needs attention; healthy only when nothing does."""
    logger = get_run_logger()
    for e in result.errors:
        logger.warning("not checked: %s (%s)", e.source, e.message)
    alerts = result.alerts
    for f in alerts:
        logger.warning(
            "%s %s #%d: %s", f.severity.value, f.source, f.position, "; ".join(f.reasons)
        )
    if not alerts and not result.errors:
        logger.info(summary_line(result))
        return CertVerification(healthy=True, summary=summary_line(result), worst=result.worst)
    loudest = sorted(alerts, key=lambda f: (-f.severity.rank, f.days_left))[:3]
    top = "; ".join(f"{f.source}: {f.reasons[0]}" for f in loudest)
    return CertVerification(
        healthy=False,
        summary=f"{len(alerts)} certificate(s) past a threshold (worst {result.worst.value})"
        + (f": {top}" if top else "")
        + (f"; {len(result.errors)} source(s) could not be checked" if result.errors else ""),
        worst=result.worst,
    )
