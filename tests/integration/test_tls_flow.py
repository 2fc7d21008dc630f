"""The `cert-expiry` flow end to end: real TLS servers, files, a deaf port, a Prefect API."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import TaskRun

from flows.cert_expiry import (
    CertExpiryParams,
    CertExpiryResult,
    CertificatesNeedAttention,
    cert_expiry,
)
from flows.common import md_escape
from tasks.tls import Severity
from tests.fixtures.tls import HOST, CertFactory, TlsServer

pytestmark = pytest.mark.usefixtures("prefect_api")


def _artifacts(flow_run_id: UUID | None) -> dict[str, Any]:
    assert flow_run_id is not None
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a.data for a in found if a.key}


def _rows(data: Any) -> list[dict[str, Any]]:
    rows = json.loads(data) if isinstance(data, str) else data
    assert isinstance(rows, list)
    return rows


def test_crossed_thresholds_fail_the_check_and_the_scan_goes_on(
    pki: CertFactory, tls_server: TlsServer, deaf_port: int, tmp_path: Path
) -> None:
    urgent = pki.leaf(days_left=0.5, lifetime_days=90)
    week = pki.leaf(days_left=7, lifetime_days=90)
    fine = pki.leaf(days_left=40, lifetime_days=90)
    endpoints = []
    for issued in (urgent, week, fine):
        (port,) = tls_server.serve(issued.chain_pem(), issued.key_pem)
        endpoints.append(f"{HOST}@127.0.0.1:{port}")
    endpoints.append(f"{HOST}@127.0.0.1:{deaf_port}")
    certs = tmp_path / "certs"
    certs.mkdir()
    on_disk = pki.leaf(days_left=45, lifetime_days=90)
    (certs / "akig.pem").write_bytes(on_disk.key_pem + on_disk.chain_pem())
    (certs / "broken.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n")
    params = CertExpiryParams(files=[str(certs)], endpoints=endpoints, connect_timeout_s=0.5)

    state = cert_expiry(params, return_state=True)

    assert state.is_failed()
    assert "2 certificate(s) past a threshold (worst critical)" in (state.message or "")
    assert "2 source(s) could not be checked" in (state.message or "")
    with pytest.raises(CertificatesNeedAttention):  # the driver's NotFixed: outcome failed
        state.result()

    artifacts = _artifacts(state.state_details.flow_run_id)
    rows = _rows(artifacts["cert-expiry-certificates"])
    days = [r["days_left"] for r in rows]
    assert days == sorted(days)
    leaves = [r for r in rows if r["position"] == 0]
    assert [(r["severity"], r["source"]) for r in leaves] == [
        ("critical", endpoints[0]),
        ("high", endpoints[1]),
        ("ok", endpoints[2]),
        ("ok", str(certs / "akig.pem")),
    ]
    assert leaves[0]["threshold_days"] == 1
    assert leaves[1]["threshold_days"] == 7
    assert leaves[0]["hostname_match"] is True
    assert len(rows) == 8  # four leaves and their intermediates

    report = artifacts["cert-expiry"]
    assert f"{HOST}@127.0.0.1:{deaf_port}" in report
    assert "no TLS answer within 0.5 s" in report
    assert "broken.crt: certificate block #1 of 1" not in report  # no END line: no block
    assert "broken.crt: no PEM certificate found" in report

    checklist = artifacts["cert-emergency-checklist"]
    assert f"openssl s_client -connect 127.0.0.1:{endpoints[0].rsplit(':', 1)[1]}" in checklist
    assert f"-servername {HOST}" in checklist
    assert "Restart Nginx / the Ingress controller" in checklist
    assert endpoints[1] not in checklist  # high, not critical: no emergency for it

    key_line = on_disk.key_pem.decode().splitlines()[1]
    for data in artifacts.values():
        assert key_line not in str(data)

    # Only the deaf endpoint got its own task, which ran with the retry policy: it costs
    # its own attempts, the other endpoints one batch (counted, not timed).
    runs = _task_runs(state.state_details.flow_run_id, lambda r: r.run_count >= 3)
    probes = sorted(r.name for r in runs if r.name.startswith("probe-tls-"))
    assert probes == [f"probe-tls-{endpoints[3]}", "probe-tls-batch-1-4-of-4"]
    deaf = next(r for r in runs if r.name == f"probe-tls-{endpoints[3]}")
    assert deaf.run_count == 3  # 1 + RUNBOOKS_RETRY_ATTEMPTS=2 (tests/conftest.py)


def _task_runs(flow_run_id: UUID | None, settled: Callable[[TaskRun], bool]) -> list[TaskRun]:
    """Task runs of a flow run, once the one with a name starting "probe-tls-akig" settles
    (task states reach the API through events, a moment after the flow ends)."""
    assert flow_run_id is not None
    deadline = time.monotonic() + 15
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            single = [r for r in runs if r.name.startswith(f"probe-tls-{HOST}")]
            if (single and all(settled(r) for r in single)) or time.monotonic() > deadline:
                return runs
            time.sleep(0.2)


def test_all_good_completes_without_emergency(
    pki: CertFactory, tls_server: TlsServer, tmp_path: Path
) -> None:
    leaf = pki.leaf(days_left=200, lifetime_days=365)
    ports = tls_server.serve(leaf.chain_pem(), leaf.key_pem, count=20)
    bundle = tmp_path / "akig.crt"
    bundle.write_bytes(leaf.chain_pem())
    params = CertExpiryParams(
        files=[str(bundle)], endpoints=[f"{HOST}@127.0.0.1:{p}" for p in ports]
    )
    state = cert_expiry(params, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert isinstance(result, CertExpiryResult)
    assert result.worst is Severity.OK
    assert result.outcome == "nothing to do"  # read-only: the plan is always empty
    assert result.sources_scanned == 21
    assert len(result.findings) == 42
    assert not result.errors
    artifacts = _artifacts(state.state_details.flow_run_id)
    assert "cert-emergency-checklist" not in artifacts
    assert "0 past a threshold" in artifacts["cert-expiry"]


def test_lifetime_rule_and_custom_thresholds_reach_the_verdict(
    pki: CertFactory, tmp_path: Path
) -> None:
    # 100 days left of a one-year certificate: no day threshold, but renewal is overdue.
    leaf = pki.leaf(days_left=100, lifetime_days=365)
    path = tmp_path / "one-year.pem"
    path.write_bytes(leaf.chain_pem())
    state = cert_expiry(CertExpiryParams(files=[str(path)]), return_state=True)
    assert state.is_failed()
    assert "worst low" in (state.message or "")
    assert "renewal overdue" in (state.message or "")

    relaxed = CertExpiryParams.model_validate(
        {"files": [str(path)], "thresholds": {"lifetime_fraction_warn": 0.2}}
    )
    assert cert_expiry(relaxed, return_state=True).is_completed()


def test_outside_text_in_the_report_is_inert(pki: CertFactory, tmp_path: Path) -> None:
    folder = tmp_path / "my certs"
    folder.mkdir()
    path = folder / "akig_prod.pem"
    evil = pki.leaf(days_left=0.5, cn="<img src=x onerror=alert(1)> **x** | y")
    path.write_bytes(evil.chain_pem())
    state = cert_expiry(CertExpiryParams(files=[str(path)]), return_state=True)
    artifacts = _artifacts(state.state_details.flow_run_id)
    report = artifacts["cert-expiry"]
    assert re.search(r"(?<!\\)<img", report) is None  # the subject is escaped, not HTML
    assert md_escape(evil.cert.subject.rfc4514_string()) in report
    # The checklist command is shell-quoted and shown verbatim (no markdown escapes in it).
    assert f"`openssl x509 -in '{path}' -text -noout`" in artifacts["cert-emergency-checklist"]
