"""Runbook "SSL Certificate Expiring": check every certificate; replace one in an emergency.

Trigger: `cert-expiry` runs daily (`SCHEDULE_CRON`, declared in `deployments/`), on the
`CertificateExpiringInDays` alert, or by hand. `cert-replace` only ever by hand, from the
emergency checklist.

What it may change:
    cert-expiry   nothing. It reads PEM files, live endpoints (a TLS handshake without
                  sending any request) and Kubernetes TLS Secrets (`tls.crt` only).
    cert-replace  one Kubernetes TLS Secret (tls.crt + tls.key), after copying it to a
                  backup Secret `<name>-backup-<UTC timestamp>`; then a rollout restart of
                  the ingress Deployment so it serves the new pair.

Safety limits: `cert-replace` is a dry run unless `dry_run` is false, and acts only after
an approver says yes in the UI (timeout = refused). The new pair is refused unless the key
matches the leaf, the chain is in order and unexpired, the leaf is valid now, expires
later than the current one and its SANs cover every host the current one covered. The
write carries the Secret's resourceVersion from the plan: if cert-manager or a human
changed it meanwhile, nothing is written. A paused ingress Deployment is not restarted.
Private keys never appear in parameters (the new pair comes from a staged Secret or from
files on the worker), logs or artifacts.

Undo: the backup Secret holds the previous pair. Put it back with
`kubectl -n NS get secret NAME-backup-TS -o json | jq '.metadata.name="NAME" |
del(.metadata.uid,.metadata.resourceVersion,.metadata.creationTimestamp,.metadata.labels)'
| kubectl replace -f -`, then `kubectl -n INGRESS_NS rollout restart deployment/INGRESS`.
(`cert-replace` itself refuses to go back to an earlier-expiring certificate.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import unmapped
from pydantic import BaseModel, Field

from flows.common import Report, request_approval, table, tag_run
from tasks.errors import PermanentError, RunbookError, SafetyViolation, TransientError
from tasks.kubernetes import restart_rollout, wait_for_rollout
from tasks.settings import KubernetesSettings, TlsSettings
from tasks.tls import (
    CertificateInfo,
    Finding,
    ReplacementCheck,
    SecretReplacement,
    Severity,
    SourceScan,
    Thresholds,
    check_tls_replacement,
    evaluate,
    expand_cert_paths,
    probe_tls_endpoint,
    probe_tls_endpoints,
    read_cert_file,
    read_tls_secret,
    replace_tls_secret,
    worst,
)

_BATCH = 50  # endpoints per probe task

#: Daily at 06:00 UTC, early enough to act in office hours on what it finds.
SCHEDULE_CRON = "0 6 * * *"


class SecretRef(BaseModel):
    """A Kubernetes TLS Secret to check."""

    namespace: str = Field(description="Namespace of the Secret.")
    name: str = Field(description="Name of the Secret (type kubernetes.io/tls).")


def _tls() -> TlsSettings:
    return TlsSettings()


class CertExpiryParams(BaseModel):
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

    findings: list[Finding] = Field(description="Every certificate seen, by days left.")
    errors: list[ScanError]
    worst: Severity
    sources_scanned: int

    @property
    def alerts(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is not Severity.OK]


class CertificatesNeedAttention(Exception):
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


def _days(value: float) -> str:
    return f"{value:.2f}" if abs(value) < 2 else f"{value:.1f}"


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
                "reasons": "; ".join(f.reasons),
            }
        )
    return rows


def emergency_checklist(
    critical: list[Finding], infos: dict[tuple[str, int], CertificateInfo]
) -> str:
    """The seed's emergency steps, filled in with the sources found critical."""
    lines = [
        "Severity **critical**: page on-call now (< 15 min), per the escalation path.",
        "",
        "- [ ] **1. Verify certificate details**",
    ]
    for f in critical:
        if f.kind == "file":
            cmd = f"openssl x509 -in {f.source} -text -noout"
        elif f.kind == "endpoint":
            name, _, addr = f.source.rpartition("@")
            host = addr.rsplit(":", 1)[0].strip("[]")
            cmd = (
                f"openssl s_client -connect {addr} -servername {name or host} -showcerts "
                "</dev/null | openssl x509 -noout -subject -dates -ext subjectAltName"
            )
        else:
            ns, _, name = f.source.partition("/")
            cmd = (
                f"kubectl -n {ns} get secret {name} -o jsonpath='{{.data.tls\\.crt}}' "
                "| base64 -d | openssl x509 -text -noout"
            )
        lines.append(f"    - `{cmd}`  ({'; '.join(f.reasons)})")
    hosts = sorted(
        {h for f in critical for h in infos[(f.source, f.position)].sans if f.position == 0}
    )
    lines += [
        "- [ ] **2. If missing or expiring, request an emergency certificate** from Let's "
        "Encrypt (cert-manager: `cmctl renew -n NS CERTIFICATE`; else "
        "`certbot certonly -d HOST ...`). It must cover: "
        + (", ".join(f"`{h}`" for h in hosts) or "the same hosts as the current one"),
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


@flow(
    name="cert-expiry",
    task_runner=_RUNNER,  # type: ignore[arg-type]  # TaskRunner is invariant in Prefect 3.9 stubs
    log_prints=False,
)
def cert_expiry(params: CertExpiryParams = CertExpiryParams()) -> CertExpiryResult:  # noqa: B008
    """Check certificates in files, on live endpoints and in Kubernetes TLS Secrets."""
    tag_run("cert-expiry")
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
    sources = len(pending) + len(eps)

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
    rows = _rows(findings, infos)
    create_table_artifact(
        key="cert-expiry-certificates",
        table=rows,
        description=f"{len(findings)} certificate(s) from {sources} source(s), "
        "soonest expiry first",
    )

    report = Report("cert-expiry", "Certificate expiry check")
    alerts = result.alerts
    summary = (
        f"{sources} source(s), {len(findings)} certificate(s): "
        f"{len(alerts)} past a threshold (worst: {result.worst.value}), "
        f"{len(errors)} source(s) not checked."
    )
    report.add("Summary", summary)
    report.add(
        "Certificates (soonest expiry first)",
        table(
            ["severity", "days left", "not after (UTC)", "source", "#", "subject", "reasons"],
            [
                [
                    f.severity.value,
                    _days(f.days_left),
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
    notes = [s for s in scans if s.note]
    if notes:
        report.add("Notes", "\n".join(f"- `{s.source}`: {s.note}" for s in notes))
    critical = [f for f in alerts if f.severity is Severity.CRITICAL]
    if critical:
        checklist = emergency_checklist(critical, infos)
        report.add("Emergency checklist", checklist)
        create_markdown_artifact(
            key="cert-emergency-checklist",
            markdown="# Certificate emergency\n\n" + checklist,
            description="Guided steps for critical certificates (expired, < 24 h, wrong host)",
        )
    report.publish(summary)

    for e in errors:
        logger.warning("not checked: %s (%s)", e.source, e.message)
    for f in alerts:
        logger.warning(
            "%s %s #%d: %s", f.severity.value, f.source, f.position, "; ".join(f.reasons)
        )
    if alerts or errors:
        loudest = sorted(alerts, key=lambda f: (-f.severity.rank, f.days_left))[:3]
        top = "; ".join(f"{f.source}: {f.reasons[0]}" for f in loudest)
        raise CertificatesNeedAttention(
            f"{len(alerts)} certificate(s) past a threshold (worst {result.worst.value})"
            + (f": {top}" if top else "")
            + (f"; {len(errors)} source(s) could not be checked" if errors else "")
        )
    logger.info(summary)
    return result


# ----------------------------------------------------------------------- cert-replace


class CertReplaceParams(BaseModel):
    """Replace one Kubernetes TLS Secret with a new pair, then restart the ingress."""

    namespace: str = Field(
        default_factory=lambda: KubernetesSettings().namespace,
        description="Namespace of the TLS Secret to replace.",
    )
    secret: str = Field(description="Name of the kubernetes.io/tls Secret to replace.")
    new_secret: str | None = Field(
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
    ingress_deployment: str = Field(
        "ingress-nginx-controller", description="Deployment to restart afterwards."
    )
    ingress_namespace: str = Field("ingress-nginx", description="Its namespace.")
    restart_ingress: bool = Field(True, description="Restart the ingress after replacing.")
    dry_run: bool = Field(True, description="Plan and validate only; change nothing.")
    approval_timeout_s: int = Field(
        900, ge=10, le=86_400, description="How long to wait for an approver; then refuse."
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
        ["#", "subject", "serial", "not after (UTC)", "days left", "SANs", "issuer"],
        [
            [
                c.position,
                c.subject,
                c.serial,
                c.not_after.strftime("%Y-%m-%d %H:%M"),
                _days(c.days_left),
                ", ".join(c.sans),
                c.issuer,
            ]
            for c in certs
        ],
    )


@flow(name="cert-replace", log_prints=False)
def cert_replace(params: CertReplaceParams) -> CertReplaceResult:
    """Replace a Kubernetes TLS Secret with a validated new pair and restart the ingress."""
    tag_run("cert-replace")
    logger = get_run_logger()
    target = f"{params.namespace}/{params.secret}"
    report = Report("cert-replace", f"Replace TLS Secret {target}")
    report.add(
        "Request",
        f"- why: {params.reason or '_not given_'}\n- dry run: {params.dry_run}\n"
        f"- new pair from: "
        + (
            f"Secret `{params.namespace}/{params.new_secret}`"
            if params.new_secret
            else f"files `{params.new_cert_file}` + key file"
        ),
    )
    try:
        current = read_tls_secret(params.namespace, params.secret)
        report.add("Current certificate", _cert_table(current.certificates))
        check = check_tls_replacement(
            params.namespace,
            params.secret,
            current.certificates,
            new_secret=params.new_secret,
            new_cert_file=Path(params.new_cert_file) if params.new_cert_file else None,
            new_key_file=Path(params.new_key_file) if params.new_key_file else None,
            extra_hosts=params.extra_hosts,
        )
        report.add("New certificate", _cert_table(check.new) if check.new else "_unreadable_")
        report.add(
            "Validation",
            "\n".join(f"- REFUSED: {p}" for p in check.problems)
            or "- key matches the leaf\n- chain in order, nothing expired or not yet valid\n"
            f"- expires later than the current one\n- covers: {', '.join(check.hosts_required)}",
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
        if params.dry_run:
            if params.restart_ingress:
                # Server-side dry run: proves the Deployment exists and is not paused.
                probe = restart_rollout(
                    params.ingress_deployment, params.ingress_namespace, dry_run=True
                )
                report.add("Ingress pre-check", probe.message)
            report.add("Outcome", "Dry run: nothing changed. Run again with dry_run off.")
            return CertReplaceResult(outcome="dry run", check=check)

        decision = request_approval(plan, params.approval_timeout_s)
        report.add("Approval", decision.line())
        if not decision.approved:
            report.add("Outcome", "Not approved: nothing changed.")
            return CertReplaceResult(
                outcome="not approved", check=check, approver=decision.approver
            )

        done = replace_tls_secret(
            params.namespace,
            params.secret,
            current.resource_version or "",
            new_secret=params.new_secret,
            new_cert_file=Path(params.new_cert_file) if params.new_cert_file else None,
            new_key_file=Path(params.new_key_file) if params.new_key_file else None,
        )
        report.add(
            "Done",
            table(
                ["what", "before", "after"],
                [
                    ["serial", done.old_serial, done.new_serial],
                    ["not after (UTC)", done.old_not_after, done.new_not_after],
                    ["backup Secret", "", f"{params.namespace}/{done.backup_secret}"],
                ],
            ),
        )
        if params.restart_ingress:
            restarted = restart_rollout(params.ingress_deployment, params.ingress_namespace)
            status = wait_for_rollout(params.ingress_deployment, params.ingress_namespace)
            report.add("Ingress", f"{restarted.message}; {status.message}")
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
        report.add(
            "Undo",
            f"Backup: `{params.namespace}/{done.backup_secret}`; see the `cert-replace` "
            "docstring / docs/tls.md for the kubectl commands.",
        )
        logger.warning("replaced %s, approved by %s", target, decision.approver)
        return CertReplaceResult(
            outcome="replaced", check=check, replacement=done, approver=decision.approver
        )
    except Exception as exc:
        report.add("Stopped", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        report.publish(f"cert-replace {target}")
