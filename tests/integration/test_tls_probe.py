"""Live TLS endpoints (a real server on loopback) and certificate files on disk."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tasks.errors import PermanentError, TransientError
from tasks.tls import (
    Severity,
    Thresholds,
    evaluate,
    expand_cert_paths,
    fetch_endpoint,
    probe_many,
    read_pem_file,
)
from tests.fixtures.tls import HOST, CertFactory, Issued, TlsServer

TH = Thresholds()


def _serial(issued: Issued) -> str:
    return format(issued.cert.serial_number, "x")


def test_presented_chain_is_read_in_order(pki: CertFactory, tls_server: TlsServer) -> None:
    leaf = pki.leaf(days_left=60)
    (port,) = tls_server.serve(leaf.chain_pem(), leaf.key_pem)
    scan = fetch_endpoint(f"{HOST}@127.0.0.1:{port}", timeout_s=5)
    assert scan.chain_observed
    assert scan.chain_in_order is True
    assert scan.chain_complete is True
    assert scan.tls_version == "TLSv1.3"  # pyOpenSSL: no version cap any more
    assert [c.serial for c in scan.certificates] == [
        _serial(leaf),
        _serial(pki.intermediate),
    ]
    head = scan.certificates[0]
    assert head.hostname == HOST
    assert head.hostname_match is True
    assert head.san_dns == [HOST]
    assert head.san_ips == ["127.0.0.1"]
    assert head.key_type == "EC secp256r1"
    assert head.signature_algorithm == "ECDSA_WITH_SHA256"
    assert not head.self_signed
    assert scan.certificates[1].is_ca
    assert all(not c.chain_problems for c in scan.certificates)
    assert evaluate(head, TH).severity is Severity.OK


@pytest.mark.parametrize(
    ("days_left", "severity", "crossed"),
    [
        (-2, Severity.CRITICAL, 1),
        (0.9, Severity.CRITICAL, 1),  # < 24 h: emergency
        (7, Severity.HIGH, 7),
        (40, Severity.OK, None),
    ],
)
def test_served_certificates_get_their_severity(
    pki: CertFactory,
    tls_server: TlsServer,
    days_left: float,
    severity: Severity,
    crossed: int | None,
) -> None:
    leaf = pki.leaf(days_left=days_left, lifetime_days=max(days_left, 0) * 1.5 + 1)
    (port,) = tls_server.serve(leaf.chain_pem(), leaf.key_pem)
    finding = evaluate(fetch_endpoint(f"{HOST}@127.0.0.1:{port}").certificates[0], TH)
    assert finding.severity is severity
    assert finding.crossed_days == crossed
    assert finding.days_left == pytest.approx(days_left, abs=0.01)


def test_not_yet_valid_certificate_is_critical(pki: CertFactory, tls_server: TlsServer) -> None:
    leaf = pki.not_yet_valid()
    (port,) = tls_server.serve(leaf.chain_pem(), leaf.key_pem)
    finding = evaluate(fetch_endpoint(f"{HOST}@127.0.0.1:{port}").certificates[0], TH)
    assert finding.severity is Severity.CRITICAL
    assert finding.reasons[0].startswith("not valid before")


def test_wrong_hostname_is_critical(pki: CertFactory, tls_server: TlsServer) -> None:
    leaf = pki.leaf(hosts=("other.example",))
    (port,) = tls_server.serve(leaf.chain_pem(), leaf.key_pem)
    head = fetch_endpoint(f"{HOST}@127.0.0.1:{port}").certificates[0]
    assert head.hostname_match is False
    finding = evaluate(head, TH)
    assert finding.severity is Severity.CRITICAL
    assert f"does not cover host name '{HOST}'" in finding.reasons


def test_sni_selects_the_certificate(pki: CertFactory, tls_server: TlsServer) -> None:
    default = pki.leaf(hosts=("default.example",))
    a = pki.leaf(hosts=("a.example",), days_left=5)
    b = pki.leaf(hosts=("b.example",), days_left=50)
    (port,) = tls_server.serve(
        default.chain_pem(),
        default.key_pem,
        sni={
            "a.example": (a.chain_pem(), a.key_pem),
            "b.example": (b.chain_pem(), b.key_pem),
        },
    )
    got_a = fetch_endpoint(f"a.example@127.0.0.1:{port}").certificates[0]
    got_b = fetch_endpoint(f"b.example@127.0.0.1:{port}").certificates[0]
    assert got_a.serial == _serial(a)
    assert got_b.serial == _serial(b)
    assert got_a.hostname_match is True
    assert got_b.hostname_match is True
    # Connecting by IP sends no SNI: the default certificate, checked against the IP,
    # which its SANs do not list.
    by_ip = fetch_endpoint(f"127.0.0.1:{port}").certificates[0]
    assert by_ip.serial == _serial(default)
    assert by_ip.hostname_match is False


def test_bad_chain_order_is_reported(pki: CertFactory, tls_server: TlsServer) -> None:
    leaf = pki.leaf(days_left=60)
    (port,) = tls_server.serve(leaf.chain_pem(order=[0, 2, 1]), leaf.key_pem)
    scan = fetch_endpoint(f"{HOST}@127.0.0.1:{port}")
    assert [c.subject for c in scan.certificates] == [
        f"CN={HOST}",
        "CN=Runbooks Test Root",
        "CN=Runbooks Test Intermediate",
    ]
    assert scan.chain_in_order is False
    assert scan.chain_complete is True  # every issuer is there, just misplaced
    finding = evaluate(scan.certificates[0], TH)
    assert finding.severity is Severity.HIGH
    assert "chain out of order" in finding.reasons[0]


def test_a_chain_missing_its_intermediate_is_incomplete(
    pki: CertFactory, tls_server: TlsServer
) -> None:
    leaf = pki.leaf(days_left=60)
    (port,) = tls_server.serve(leaf.chain_pem(order=[0]), leaf.key_pem)
    scan = fetch_endpoint(f"{HOST}@127.0.0.1:{port}")
    assert [c.serial for c in scan.certificates] == [_serial(leaf)]
    assert scan.chain_in_order is True
    assert scan.chain_complete is False
    finding = evaluate(scan.certificates[0], TH)
    assert finding.severity is Severity.HIGH
    assert finding.reasons == [
        "chain incomplete: the issuer of #0 (CN=Runbooks Test Intermediate) was not presented"
    ]


def test_expired_intermediate_is_caught(pki: CertFactory, tls_server: TlsServer) -> None:
    from datetime import UTC, datetime, timedelta

    from tests.fixtures.tls import make_cert

    now = datetime.now(UTC)
    old_ca = make_cert(
        "Expired Intermediate",
        issuer=pki.root,
        ca=True,
        not_before=now - timedelta(days=400),
        not_after=now - timedelta(days=1),
    )
    leaf = pki.leaf(issuer=old_ca, days_left=60)
    (port,) = tls_server.serve(leaf.chain_pem(), leaf.key_pem)
    scan = fetch_endpoint(f"{HOST}@127.0.0.1:{port}")
    severities = [evaluate(c, TH).severity for c in scan.certificates]
    assert severities == [Severity.OK, Severity.CRITICAL]


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
def test_full_chain_whatever_the_tls_version(
    pki: CertFactory, tls_server: TlsServer, version: str
) -> None:
    leaf = pki.leaf(days_left=3)
    (port,) = tls_server.serve(
        leaf.chain_pem(),
        leaf.key_pem,
        tls13_only=version == "TLSv1.3",
        tls12_only=version == "TLSv1.2",
    )
    scan = fetch_endpoint(f"{HOST}@127.0.0.1:{port}")
    assert scan.tls_version == version
    assert scan.chain_observed
    assert scan.note == ""
    assert [c.serial for c in scan.certificates] == [_serial(leaf), _serial(pki.intermediate)]
    assert scan.chain_in_order is True
    assert scan.chain_complete is True
    assert evaluate(scan.certificates[0], TH).severity is Severity.HIGH  # 3 days left


def test_tls13_out_of_order_chain_is_reported(pki: CertFactory, tls_server: TlsServer) -> None:
    # Under TLS 1.3 the Certificate message is encrypted: the old record parser saw nothing.
    leaf = pki.leaf(days_left=60)
    (port,) = tls_server.serve(leaf.chain_pem(order=[0, 2, 1]), leaf.key_pem, tls13_only=True)
    scan = fetch_endpoint(f"{HOST}@127.0.0.1:{port}")
    assert scan.tls_version == "TLSv1.3"
    assert len(scan.certificates) == 3
    assert scan.chain_in_order is False
    assert "chain out of order" in evaluate(scan.certificates[0], TH).reasons[0]


def test_deaf_port_times_out_as_transient(deaf_port: int) -> None:
    # How long the timeout takes is bench/cert_scan.py's business; here: what it says.
    with pytest.raises(TransientError, match=r"no TLS answer within 0.5 s"):
        fetch_endpoint(f"{HOST}@127.0.0.1:{deaf_port}", timeout_s=0.5)


def test_refused_port_is_transient(closed_port: int) -> None:
    with pytest.raises(TransientError, match="connection failed"):
        fetch_endpoint(f"127.0.0.1:{closed_port}", timeout_s=2)


@pytest.fixture
def plain_http_port() -> Iterator[int]:
    """A server that answers anything with a plain-text HTTP 400, like a misrouted port."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join(2)
    srv.close()


def test_a_name_sni_cannot_carry_is_a_clear_permanent_error(closed_port: int) -> None:
    with pytest.raises(PermanentError, match="not a host name that SNI can carry"):
        fetch_endpoint(f"{'x' * 64}.example@127.0.0.1:{closed_port}", timeout_s=2)


def test_a_port_not_speaking_tls_is_a_clear_permanent_error(plain_http_port: int) -> None:
    with pytest.raises(PermanentError, match="TLS handshake failed"):
        fetch_endpoint(f"127.0.0.1:{plain_http_port}", timeout_s=3)


GATE = 20


@pytest.fixture
def gated_ports(pki: CertFactory, tls_server: TlsServer) -> tuple[list[int], Issued]:
    """GATE ports that answer only once all GATE connections are open at once."""
    leaf = pki.leaf()
    return tls_server.serve(leaf.chain_pem(), leaf.key_pem, count=GATE, gate=GATE), leaf


def test_probe_many_has_every_endpoint_in_flight_at_once(
    gated_ports: tuple[list[int], Issued], tls_server: TlsServer
) -> None:
    ports, leaf = gated_ports
    endpoints = [f"{HOST}@127.0.0.1:{p}" for p in ports]
    # One probe at a time would time out on every port but the last.
    outcomes = probe_many(endpoints, timeout_s=5, max_workers=64)
    assert [o.error for o in outcomes] == [None] * GATE
    assert tls_server.held_at_once == GATE
    assert [o.endpoint for o in outcomes] == endpoints  # in input order
    assert {o.scan.certificates[0].serial for o in outcomes if o.scan} == {_serial(leaf)}


def test_fetch_endpoint_is_thread_safe(pki: CertFactory, tls_server: TlsServer) -> None:
    leaf = pki.leaf()
    ports = tls_server.serve(leaf.chain_pem(), leaf.key_pem, count=50)
    with ThreadPoolExecutor(50) as pool:
        scans = list(pool.map(lambda p: fetch_endpoint(f"{HOST}@127.0.0.1:{p}"), ports))
    assert {s.certificates[0].serial for s in scans} == {_serial(leaf)}


# --------------------------------------------------------------------------- files


def test_files_and_directories(pki: CertFactory, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    soon = pki.leaf(days_left=2)
    (certs / "akig.crt").write_bytes(soon.chain_pem())
    (certs / "garbage.pem").write_bytes(b"definitely not PEM\n")
    (certs / "combined.pem").write_bytes(soon.key_pem + soon.chain_pem())
    paths = expand_cert_paths([certs])
    results: dict[str, object] = {}
    for path in paths:
        try:
            results[path.name] = read_pem_file(path)
        except PermanentError as exc:
            results[path.name] = exc
    assert isinstance(results["garbage.pem"], PermanentError)
    assert str(results["garbage.pem"]).startswith(f"{certs / 'garbage.pem'}: no PEM certificate")
    scan = results["akig.crt"]
    assert not isinstance(scan, Exception)
    assert [evaluate(c, TH).severity for c in scan.certificates] == [  # type: ignore[attr-defined]
        Severity.HIGH,
        Severity.OK,
    ]
    # A combined key + chain file is read for its certificates; the key is not touched.
    combined = results["combined.pem"]
    assert not isinstance(combined, Exception)
    assert "PRIVATE" not in combined.model_dump_json()  # type: ignore[attr-defined]


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match=r"gone\.crt: file not found"):
        read_pem_file(tmp_path / "gone.crt")
