"""Revocation of served certificates against real components: `openssl ocsp` responders,
a CRL over HTTP, `openssl s_server -status_file` stapling, and the settings switches."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tasks.tls import RevocationConfig, Severity, SourceScan, Thresholds, evaluate, fetch_endpoint
from tests.fixtures.tls import (
    HOST,
    CertFactory,
    CrlServer,
    Issued,
    OcspResponder,
    StaplingServer,
    TlsServer,
    make_cert,
    make_crl,
    ocsp_answer,
)

TH = Thresholds()
OCSP_ONLY = RevocationConfig(crl=False, stapling=False, timeout_s=3)
CRL_ONLY = RevocationConfig(ocsp=False, stapling=False, timeout_s=3)
STAPLE_AND_OCSP = RevocationConfig(crl=False, timeout_s=3)

MakeResponder = Callable[..., OcspResponder]


def _probe(tls_server: TlsServer, leaf: Issued, config: RevocationConfig) -> SourceScan:
    (port,) = tls_server.serve(leaf.chain_pem(), leaf.key_pem)
    return fetch_endpoint(f"{HOST}@127.0.0.1:{port}", timeout_s=5, revocation=config)


def test_ocsp_good_and_revoked_from_a_real_responder(
    pki: CertFactory, tls_server: TlsServer, ocsp_responders: MakeResponder
) -> None:
    responder = ocsp_responders(pki.intermediate)
    good = pki.leaf(ocsp_url=responder.url)
    revoked = pki.leaf(ocsp_url=responder.url)
    stranger = pki.leaf(ocsp_url=responder.url)  # not in the responder's index
    responder.start(good=[good], revoked=[revoked])

    scan = _probe(tls_server, good, OCSP_ONLY)
    leaf, intermediate = scan.certificates
    assert leaf.revocation == "good", leaf.revocation_detail
    assert leaf.revocation_detail.startswith("ocsp: good (until ")
    assert evaluate(leaf, TH).severity is Severity.OK
    # The intermediate names no responder and its issuer (the root) was not presented.
    assert intermediate.revocation == "none"

    head = _probe(tls_server, revoked, OCSP_ONLY).certificates[0]
    assert head.revocation == "revoked"
    finding = evaluate(head, TH)
    assert finding.severity is Severity.CRITICAL
    assert finding.reasons[0].startswith("REVOKED: ocsp: revoked ")
    assert "(key_compromise)" in finding.reasons[0]

    unknown = _probe(tls_server, stranger, OCSP_ONLY).certificates[0]
    assert unknown.revocation == "unknown"
    assert "does not know this certificate" in unknown.revocation_detail
    assert evaluate(unknown, TH).severity is Severity.LOW


def test_unreachable_responder_is_unknown_never_good(
    pki: CertFactory, tls_server: TlsServer, closed_port: int
) -> None:
    leaf = pki.leaf(ocsp_url=f"http://127.0.0.1:{closed_port}/")
    head = _probe(tls_server, leaf, OCSP_ONLY).certificates[0]
    assert head.revocation == "unknown"
    assert "unreachable (connection failed)" in head.revocation_detail
    finding = evaluate(head, TH)
    assert finding.severity is Severity.LOW
    assert finding.reasons[0].startswith("revocation status unknown: ocsp: ")


@pytest.mark.parametrize(
    ("signer_name", "why"),
    [
        # Posing as the issuer (same name), with another key.
        ("Runbooks Test Intermediate", "bad signature on the answer"),
        # A responder the issuer never authorised.
        ("Someone Else", "signed by neither the issuer nor a responder the issuer authorised"),
    ],
)
def test_answers_signed_by_an_unauthorised_responder_are_not_trusted(
    pki: CertFactory,
    tls_server: TlsServer,
    ocsp_responders: MakeResponder,
    signer_name: str,
    why: str,
) -> None:
    # The answer says "good", but nobody the issuer vouches for signed it.
    stranger = make_cert(signer_name, ca=True)
    forged = ocsp_responders(pki.intermediate, signer=stranger)
    leaf = pki.leaf(ocsp_url=forged.url)
    forged.start(good=[leaf])
    head = _probe(tls_server, leaf, OCSP_ONLY).certificates[0]
    assert head.revocation == "unknown"
    assert head.revocation_detail == f"ocsp: {forged.url}: {why}"


def test_a_delegated_responder_signed_by_the_issuer_is_trusted(
    pki: CertFactory, tls_server: TlsServer, ocsp_responders: MakeResponder
) -> None:
    delegate = make_cert("Runbooks OCSP Responder", issuer=pki.intermediate, ocsp_signing=True)
    responder = ocsp_responders(pki.intermediate, signer=delegate)
    revoked = pki.leaf(ocsp_url=responder.url)
    responder.start(revoked=[revoked])
    head = _probe(tls_server, revoked, OCSP_ONLY).certificates[0]
    assert head.revocation == "revoked"


def test_crl_revoked_and_good_fetched_once_until_next_update(
    pki: CertFactory, tls_server: TlsServer, crl_server: CrlServer
) -> None:
    url = crl_server.url("/intermediate.crl")
    good = pki.leaf(crl_url=url)
    revoked = pki.leaf(crl_url=url)
    crl_server.files["/intermediate.crl"] = make_crl(pki.intermediate, [revoked])

    head = _probe(tls_server, good, CRL_ONLY).certificates[0]
    assert head.revocation == "good"
    assert head.revocation_detail.startswith("crl: not listed (until ")
    head = _probe(tls_server, revoked, CRL_ONLY).certificates[0]
    assert head.revocation == "revoked"
    assert "(key_compromise)" in head.revocation_detail
    assert evaluate(head, TH).severity is Severity.CRITICAL
    # Two certificates checked, one download: the CRL is kept until its nextUpdate.
    assert crl_server.hits == {"/intermediate.crl": 1}


def test_a_stale_crl_is_unknown_and_not_kept(
    pki: CertFactory, tls_server: TlsServer, crl_server: CrlServer
) -> None:
    url = crl_server.url("/stale.crl")
    leaf = pki.leaf(crl_url=url)
    crl_server.files["/stale.crl"] = make_crl(pki.intermediate, next_update=-timedelta(hours=1))
    for _ in range(2):
        head = _probe(tls_server, leaf, CRL_ONLY).certificates[0]
        assert head.revocation == "unknown"
        assert "stale CRL" in head.revocation_detail
    assert crl_server.hits == {"/stale.crl": 2}


def test_a_forged_or_missing_crl_is_unknown(
    pki: CertFactory, tls_server: TlsServer, crl_server: CrlServer
) -> None:
    forged_url = crl_server.url("/forged.crl")
    leaf = pki.leaf(crl_url=forged_url)
    crl_server.files["/forged.crl"] = make_crl(
        pki.intermediate, signer_key=ec.generate_private_key(ec.SECP256R1())
    )
    head = _probe(tls_server, leaf, CRL_ONLY).certificates[0]
    assert head.revocation == "unknown"
    assert "bad CRL signature" in head.revocation_detail

    gone = pki.leaf(crl_url=crl_server.url("/gone.crl"))
    head = _probe(tls_server, gone, CRL_ONLY).certificates[0]
    assert head.revocation == "unknown"
    assert "HTTP 404" in head.revocation_detail


def test_an_intermediate_whose_root_is_not_sent_is_no_warning(
    pki: CertFactory, tls_server: TlsServer, crl_server: CrlServer, closed_port: int
) -> None:
    intermediate = make_cert(
        "Runbooks Test Intermediate 2",
        issuer=pki.root,
        ca=True,
        crl_url=f"http://127.0.0.1:{closed_port}/root.crl",  # down
    )
    leaf = pki.leaf(issuer=intermediate, crl_url=crl_server.url("/i2.crl"))
    crl_server.files["/i2.crl"] = make_crl(intermediate)
    scan = _probe(tls_server, leaf, CRL_ONLY)
    assert [c.revocation for c in scan.certificates] == ["good", "none"]
    assert scan.certificates[1].revocation_detail == "its issuer (a root) was not presented"
    # With the root sent too, the intermediate is checked: its CRL is down.
    (port,) = tls_server.serve(leaf.chain_pem(order=[0, 1, 2]), leaf.key_pem)
    scan = fetch_endpoint(f"{HOST}@127.0.0.1:{port}", revocation=CRL_ONLY)
    assert [c.revocation for c in scan.certificates] == ["good", "unknown", "none"]


def test_crl_answers_when_the_ocsp_responder_is_down(
    pki: CertFactory, tls_server: TlsServer, crl_server: CrlServer, closed_port: int
) -> None:
    leaf = pki.leaf(ocsp_url=f"http://127.0.0.1:{closed_port}/", crl_url=crl_server.url("/int.crl"))
    crl_server.files["/int.crl"] = make_crl(pki.intermediate, [leaf])
    head = _probe(tls_server, leaf, RevocationConfig(timeout_s=3)).certificates[0]
    assert head.revocation == "revoked"
    assert head.revocation_detail.startswith("crl: revoked")


@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_a_stapled_answer_is_used(
    pki: CertFactory, stapling_server: StaplingServer, closed_port: int, version: str
) -> None:
    # The AIA responder is down: only the staple can tell.
    dead = f"http://127.0.0.1:{closed_port}/"
    good, revoked = pki.leaf(ocsp_url=dead), pki.leaf(ocsp_url=dead)
    good_port = stapling_server.serve(good, ocsp_answer(good, pki.intermediate), version=version)
    revoked_port = stapling_server.serve(
        revoked, ocsp_answer(revoked, pki.intermediate, revoked=True), version=version
    )

    scan = fetch_endpoint(f"{HOST}@127.0.0.1:{good_port}", revocation=STAPLE_AND_OCSP)
    assert scan.tls_version == f"TLSv{version}"
    assert scan.ocsp_stapled is True
    assert [c.subject for c in scan.certificates] == [f"CN={HOST}", "CN=Runbooks Test Intermediate"]
    assert scan.chain_complete is True
    assert scan.certificates[0].revocation == "good"
    assert scan.certificates[0].revocation_detail.startswith("ocsp-stapled: good")

    scan = fetch_endpoint(f"{HOST}@127.0.0.1:{revoked_port}", revocation=STAPLE_AND_OCSP)
    assert scan.certificates[0].revocation == "revoked"
    assert evaluate(scan.certificates[0], TH).severity is Severity.CRITICAL


def test_a_stale_staple_is_not_believed(
    pki: CertFactory, stapling_server: StaplingServer, closed_port: int
) -> None:
    leaf = pki.leaf(ocsp_url=f"http://127.0.0.1:{closed_port}/")
    now = datetime.now(UTC)
    stale = ocsp_answer(
        leaf,
        pki.intermediate,
        this_update=now - timedelta(days=3),
        next_update=now - timedelta(days=1),
    )
    port = stapling_server.serve(leaf, stale)
    head = fetch_endpoint(f"{HOST}@127.0.0.1:{port}", revocation=STAPLE_AND_OCSP).certificates[0]
    assert head.revocation == "unknown"
    assert "ocsp-stapled: stale answer" in head.revocation_detail
    assert "unreachable" in head.revocation_detail  # then the responder was asked


def test_a_staple_about_another_certificate_is_not_believed(
    pki: CertFactory, stapling_server: StaplingServer, closed_port: int
) -> None:
    leaf = pki.leaf(ocsp_url=f"http://127.0.0.1:{closed_port}/")
    other = pki.leaf()
    port = stapling_server.serve(leaf, ocsp_answer(other, pki.intermediate))
    head = fetch_endpoint(f"{HOST}@127.0.0.1:{port}", revocation=STAPLE_AND_OCSP).certificates[0]
    assert head.revocation == "unknown"
    assert "ocsp-stapled: the answer is not about this certificate" in head.revocation_detail


def test_stapling_switched_off_asks_for_no_staple(
    pki: CertFactory, stapling_server: StaplingServer, closed_port: int
) -> None:
    leaf = pki.leaf(ocsp_url=f"http://127.0.0.1:{closed_port}/")
    port = stapling_server.serve(leaf, ocsp_answer(leaf, pki.intermediate, revoked=True))
    scan = fetch_endpoint(f"{HOST}@127.0.0.1:{port}", revocation=RevocationConfig.off())
    assert scan.ocsp_stapled is None  # not asked for
    assert scan.certificates[0].revocation == "off"
    scan = fetch_endpoint(f"{HOST}@127.0.0.1:{port}", revocation=STAPLE_AND_OCSP)
    assert scan.ocsp_stapled is True
    assert scan.certificates[0].revocation == "revoked"


def test_each_source_can_be_switched_off_in_settings(
    pki: CertFactory,
    tls_server: TlsServer,
    ocsp_responders: MakeResponder,
    crl_server: CrlServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    responder = ocsp_responders(pki.intermediate)
    by_ocsp = pki.leaf(ocsp_url=responder.url)
    by_crl = pki.leaf(crl_url=crl_server.url("/int.crl"))
    responder.start(revoked=[by_ocsp])
    crl_server.files["/int.crl"] = make_crl(pki.intermediate, [by_crl])
    ports = {
        "ocsp": tls_server.serve(by_ocsp.chain_pem(), by_ocsp.key_pem)[0],
        "crl": tls_server.serve(by_crl.chain_pem(), by_crl.key_pem)[0],
    }

    def verdicts() -> dict[str, str | None]:
        # No config passed: the probe reads RUNBOOKS_TLS_* as the flow does.
        return {
            name: fetch_endpoint(f"{HOST}@127.0.0.1:{port}").certificates[0].revocation
            for name, port in ports.items()
        }

    assert verdicts() == {"ocsp": "revoked", "crl": "revoked"}
    monkeypatch.setenv("RUNBOOKS_TLS_OCSP", "false")
    assert verdicts() == {"ocsp": "off", "crl": "revoked"}
    monkeypatch.setenv("RUNBOOKS_TLS_CRL", "false")
    monkeypatch.setenv("RUNBOOKS_TLS_OCSP_STAPLING", "false")
    assert verdicts() == {"ocsp": "off", "crl": "off"}
    assert crl_server.hits == {"/int.crl": 1}  # nothing fetched once switched off


@pytest.mark.usefixtures("prefect_api")
def test_the_flow_reports_revocation_and_chains(
    pki: CertFactory,
    tls_server: TlsServer,
    ocsp_responders: MakeResponder,
    crl_server: CrlServer,
    closed_port: int,
) -> None:
    from flows.cert_expiry import CertExpiryParams, cert_expiry
    from tests.integration.test_tls_flow import _artifacts, _rows

    responder = ocsp_responders(pki.intermediate)
    revoked = pki.leaf(ocsp_url=responder.url)
    unreachable = pki.leaf(ocsp_url=f"http://127.0.0.1:{closed_port}/")
    listed_good = pki.leaf(crl_url=crl_server.url("/int.crl"))
    responder.start(revoked=[revoked])
    crl_server.files["/int.crl"] = make_crl(pki.intermediate)
    endpoints = [
        f"{HOST}@127.0.0.1:{tls_server.serve(c.chain_pem(), c.key_pem)[0]}"
        for c in (revoked, unreachable, listed_good)
    ]

    state = cert_expiry(CertExpiryParams(files=[], endpoints=endpoints), return_state=True)

    assert state.is_failed()
    assert "2 certificate(s) past a threshold (worst critical)" in (state.message or "")
    assert f"{endpoints[0]}: REVOKED: ocsp: revoked" in (state.message or "")
    artifacts = _artifacts(state.state_details.flow_run_id)
    leaves = {
        r["source"]: r for r in _rows(artifacts["cert-expiry-certificates"]) if not r["position"]
    }
    assert {s: (r["severity"], r["revocation"]) for s, r in leaves.items()} == {
        endpoints[0]: ("critical", "revoked"),
        endpoints[1]: ("low", "unknown"),
        endpoints[2]: ("ok", "good"),
    }
    report = artifacts["cert-expiry"]
    assert "## Endpoint chains and revocation" in report
    assert (
        "| endpoint | TLS | certs | in order | complete | stapled | revocation (leaf) |" in report
    )
    assert "unknown: ocsp: http://127.0.0.1" in report
    checklist = artifacts["cert-emergency-checklist"]
    assert f"-connect 127.0.0.1:{endpoints[0].rsplit(':', 1)[1]} -servername {HOST}" in checklist
    assert "REVOKED: ocsp: revoked" in checklist
    assert endpoints[1].rsplit(":", 1)[1] not in checklist  # unknown is a warning, not a page
