"""Pure TLS logic: severity mapping, lifetime fraction, host-name matching, PEM parsing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasks.errors import PermanentError
from tasks.tls import (
    CertificateInfo,
    Endpoint,
    NewPair,
    Severity,
    Thresholds,
    certificate_matches,
    chain_incomplete,
    chain_problems,
    changed_since_approval,
    crossed_threshold,
    describe_bundle,
    evaluate,
    expand_cert_paths,
    hostname_matches,
    lifetime_fraction_left,
    parse_certificates,
    severity_for_days,
    validate_replacement,
)
from tests.fixtures.tls import HOST, CertFactory, Issued, make_cert

NOW = datetime(2026, 11, 27, 3, 0, tzinfo=UTC)
TH = Thresholds()


def info(days_left: float, lifetime_days: float | None = None, **kw: object) -> CertificateInfo:
    """A certificate `days_left` from expiry; by default with 2/3 of its lifetime left."""
    if lifetime_days is None:
        lifetime_days = max(days_left, 0) * 1.5 + 1
    not_after = NOW + timedelta(days=days_left)
    not_before = not_after - timedelta(days=lifetime_days)
    fields: dict[str, object] = {
        "source": "x",
        "kind": "file",
        "subject": "CN=x",
        "issuer": "CN=ca",
        "serial": "1",
        "fingerprint_sha256": "00",
        "not_before": not_before,
        "not_after": not_after,
        "checked_at": NOW,
        "days_left": days_left,
        "lifetime_fraction_left": lifetime_fraction_left(not_before, not_after, NOW),
        "key_type": "EC secp256r1",
        "key_size": 256,
        "signature_algorithm": "ECDSA_WITH_SHA256",
        "self_signed": False,
        "is_ca": False,
    }
    fields.update(kw)
    return CertificateInfo.model_validate(fields)


# ------------------------------------------------------------------- severity mapping


@pytest.mark.parametrize(
    ("days", "expected"),
    [
        (-3, Severity.CRITICAL),  # expired
        (0.5, Severity.CRITICAL),  # 12 h: emergency
        (0.99, Severity.CRITICAL),
        (1.01, Severity.HIGH),  # just over 24 h
        (3, Severity.HIGH),
        (7, Severity.HIGH),
        (7.5, Severity.MEDIUM),
        (14, Severity.MEDIUM),
        (14.5, Severity.LOW),
        (30, Severity.LOW),
        (31, Severity.OK),
        (89, Severity.OK),
    ],
)
def test_severity_by_days_left(days: float, expected: Severity) -> None:
    # The default lifetime keeps the 1/3-lifetime rule out of this table.
    assert evaluate(info(days), TH).severity is expected


@pytest.mark.parametrize(
    ("days", "crossed"),
    [(45, None), (30, 30), (29.9, 30), (14, 14), (6, 7), (2.5, 3), (0.5, 1), (-1, 1)],
)
def test_crossed_threshold_is_the_smallest_reached(days: float, crossed: int | None) -> None:
    assert crossed_threshold(days, [30, 14, 7, 3, 1]) == crossed


def test_thresholds_are_configurable() -> None:
    loose = Thresholds(warn_days=[60], emergency_hours=72, high_days=20, medium_days=40)
    assert evaluate(info(2.5), loose).severity is Severity.CRITICAL
    assert evaluate(info(15), loose).severity is Severity.HIGH
    assert evaluate(info(35), loose).severity is Severity.MEDIUM
    assert evaluate(info(50), loose).severity is Severity.LOW
    assert evaluate(info(50), TH).severity is Severity.OK


def test_less_than_a_third_of_lifetime_left_warns() -> None:
    # A one-year certificate with 100 days left: cert-manager would have renewed at 2/3.
    finding = evaluate(info(100, lifetime_days=365), TH)
    assert finding.severity is Severity.LOW
    assert any("renewal overdue" in r for r in finding.reasons)
    assert evaluate(info(130, lifetime_days=365), TH).severity is Severity.OK
    assert evaluate(info(100, 365), Thresholds(lifetime_fraction_warn=0)).severity is Severity.OK


def test_expired_not_yet_valid_and_wrong_host_are_critical() -> None:
    assert "EXPIRED" in evaluate(info(-1), TH).reasons[0]
    future = info(92, not_before=NOW + timedelta(days=2))
    assert evaluate(future, TH).severity is Severity.CRITICAL
    wrong = info(60, hostname="api.example", hostname_match=False)
    finding = evaluate(wrong, TH)
    assert finding.severity is Severity.CRITICAL
    assert "api.example" in finding.reasons[0]


def test_chain_problems_weak_key_and_signature() -> None:
    assert evaluate(info(60, chain_problems=["#0 bad"]), TH).severity is Severity.HIGH
    assert evaluate(info(60, key_type="RSA", key_size=1024), TH).severity is Severity.MEDIUM
    sha1 = info(60, signature_algorithm="RSA_WITH_SHA1")
    assert evaluate(sha1, TH).severity is Severity.MEDIUM


@given(
    a=st.floats(min_value=-400, max_value=400, allow_nan=False),
    b=st.floats(min_value=-400, max_value=400, allow_nan=False),
)
def test_less_time_is_never_less_severe(a: float, b: float) -> None:
    sooner, later = sorted((a, b))
    assert severity_for_days(sooner, TH).rank >= severity_for_days(later, TH).rank
    # Same certificate seen at two moments (fixed lifetime, so the 1/3 rule plays too).
    assert evaluate(info(sooner, 1000), TH).severity.rank >= (
        evaluate(info(later, 1000), TH).severity.rank
    )


@given(
    lifetime_h=st.integers(min_value=1, max_value=24 * 3650),
    elapsed_h=st.integers(min_value=-1000, max_value=24 * 4000),
)
def test_lifetime_fraction_is_bounded_and_exact(lifetime_h: int, elapsed_h: int) -> None:
    start = NOW
    end = start + timedelta(hours=lifetime_h)
    at = start + timedelta(hours=elapsed_h)
    frac = lifetime_fraction_left(start, end, at)
    assert 0.0 <= frac <= 1.0
    if 0 <= elapsed_h <= lifetime_h:
        assert frac == pytest.approx((lifetime_h - elapsed_h) / lifetime_h)
    later = lifetime_fraction_left(start, end, at + timedelta(hours=1))
    assert later <= frac


def test_lifetime_fraction_of_an_empty_window_is_zero() -> None:
    assert lifetime_fraction_left(NOW, NOW, NOW) == 0.0


# ---------------------------------------------------------------------- host names


@pytest.mark.parametrize(
    ("host", "dns", "ips", "ok"),
    [
        ("akig.example", ["akig.example"], [], True),
        ("AKIG.example.", ["akig.EXAMPLE"], [], True),
        ("api.akig.example", ["*.akig.example"], [], True),
        ("a.b.akig.example", ["*.akig.example"], [], False),  # one label only
        ("akig.example", ["*.akig.example"], [], False),  # not the bare domain
        ("akig.com", ["*.com"], [], False),  # never a whole TLD
        ("foo.akig.example", ["f*.akig.example"], [], False),  # no partial wildcards
        ("other.example", ["akig.example"], [], False),
        ("127.0.0.1", [], ["127.0.0.1"], True),
        ("127.0.0.1", ["127.0.0.1"], [], False),  # an IP needs an IP SAN
        ("::1", [], ["::1"], True),
        ("akig.example", [], [], False),
    ],
)
def test_hostname_matching(host: str, dns: list[str], ips: list[str], ok: bool) -> None:
    assert hostname_matches(host, dns, ips) is ok


_label = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9]", fullmatch=True)


@given(first=_label, second=_label, domain=st.lists(_label, min_size=2, max_size=3))
def test_wildcard_stands_for_exactly_one_label(first: str, second: str, domain: list[str]) -> None:
    base = ".".join(domain)
    assert hostname_matches(f"{first}.{base}", [f"*.{base}"], [])
    assert not hostname_matches(f"{first}.{second}.{base}", [f"*.{base}"], [])
    assert not hostname_matches(base, [f"*.{base}"], [])


@pytest.mark.parametrize(
    ("text", "host", "port", "name"),
    [
        ("akig.example:8443", "akig.example", 8443, "akig.example"),
        ("akig.example", "akig.example", 443, "akig.example"),
        ("akig.example@127.0.0.1:9443", "127.0.0.1", 9443, "akig.example"),
        ("[::1]:8443", "::1", 8443, "::1"),
    ],
)
def test_endpoint_parsing(text: str, host: str, port: int, name: str) -> None:
    ep = Endpoint.parse(text)
    assert (ep.host, ep.port, ep.name) == (host, port, name)
    assert Endpoint.parse(str(ep)) == ep


@pytest.mark.parametrize("bad", ["", "host:99999", "@host:1", "a b:1", "host:port"])
def test_bad_endpoints_are_refused_clearly(bad: str) -> None:
    with pytest.raises(PermanentError, match="endpoint"):
        Endpoint.parse(bad)


# ------------------------------------------------------------------------ PEM parsing


def test_garbage_pem_names_the_file() -> None:
    with pytest.raises(PermanentError, match=r"/etc/x\.pem: no PEM certificate found"):
        parse_certificates(b"hello, I am not a certificate", "/etc/x.pem")
    broken = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    with pytest.raises(PermanentError, match=r"x\.pem: certificate block #1 of 1"):
        parse_certificates(broken, "x.pem")


def test_a_key_only_file_is_explained_without_quoting_the_key(pki: CertFactory) -> None:
    leaf = pki.leaf()
    with pytest.raises(PermanentError) as excinfo:
        parse_certificates(leaf.key_pem, "tls.key")
    message = str(excinfo.value)
    assert "private key but no certificate" in message
    body = leaf.key_pem.decode().splitlines()[1]
    assert body not in message


def test_second_bad_block_is_pinpointed(pki: CertFactory) -> None:
    leaf = pki.leaf()
    data = leaf.cert_pem + b"-----BEGIN CERTIFICATE-----\nZm9v\n-----END CERTIFICATE-----\n"
    with pytest.raises(PermanentError, match="block #2 of 2"):
        parse_certificates(data, "bundle.pem")


def test_der_and_multi_block_pem(pki: CertFactory) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    leaf = pki.leaf()
    assert parse_certificates(leaf.cert.public_bytes(Encoding.DER), "x.der") == [leaf.cert]
    assert parse_certificates(leaf.chain_pem(), "full.pem") == [leaf.cert, pki.intermediate.cert]


def test_chain_order(pki: CertFactory) -> None:
    leaf = pki.leaf()
    good = [leaf.cert, pki.intermediate.cert, pki.root.cert]
    assert chain_problems(good) == [[], [], []]
    swapped = [leaf.cert, pki.root.cert, pki.intermediate.cert]
    problems = chain_problems(swapped)
    assert "its issuer is at position #2: chain out of order" in problems[0][0]
    other_ca = make_cert("Other CA", ca=True)
    problems = chain_problems([leaf.cert, other_ca.cert])
    assert "chain broken" in problems[0][0]


def test_a_ca_bundle_gets_no_chain_checks(pki: CertFactory) -> None:
    infos = describe_bundle(
        [pki.root.cert, make_cert("Other CA", ca=True).cert], source="b", kind="file"
    )
    assert all(not i.chain_problems for i in infos)
    assert all(i.self_signed and i.is_ca for i in infos)


def test_expand_cert_paths_dedups_symlinks_and_keeps_missing(tmp_path) -> None:
    (tmp_path / "a.pem").write_text("x")
    (tmp_path / "b.crt").write_text("x")
    (tmp_path / "link.pem").symlink_to(tmp_path / "a.pem")
    (tmp_path / "notes.txt").write_text("x")
    missing = tmp_path / "gone.pem"
    got = expand_cert_paths([tmp_path, missing, tmp_path / "a.pem"])
    assert [p.name for p in got] == ["a.pem", "b.crt", "gone.pem"]


# ------------------------------------------- names on real certificates, chain completeness


@pytest.mark.parametrize(
    ("hosts", "name", "ok"),
    [
        (("*.akig.example",), "api.akig.example", True),
        (("*.akig.example",), "a.b.akig.example", False),
        (("*.akig.example",), "akig.example", False),
        ((HOST,), f"{HOST}.", True),
        (("127.0.0.1",), "127.0.0.1", True),
        (("::1",), "[::1]", True),
        ((HOST,), "127.0.0.1", False),  # an IP needs an IP SAN
        ((), HOST, False),  # no SANs at all: no CN fallback
    ],
)
def test_certificate_names_by_service_identity(
    pki: CertFactory, hosts: tuple[str, ...], name: str, ok: bool
) -> None:
    cert = pki.leaf(hosts=hosts, cn=HOST).cert
    assert certificate_matches(cert, name) is ok


def test_chain_completeness(pki: CertFactory) -> None:
    leaf = pki.leaf()
    assert chain_incomplete([leaf.cert, pki.intermediate.cert]) is None
    assert chain_incomplete([leaf.cert, pki.root.cert, pki.intermediate.cert]) is None
    assert chain_incomplete([pki.intermediate.cert]) is None  # a CA may end the chain
    assert chain_incomplete([leaf.cert]) == (
        0,
        "chain incomplete: the issuer of #0 (CN=Runbooks Test Intermediate) was not presented",
    )
    assert chain_incomplete([leaf.cert, pki.root.cert]) is not None
    selfie = make_cert(HOST, hosts=(HOST,))
    assert chain_incomplete([selfie.cert]) is None


# -------------------------------------------------------------------- replacement


def _old(pki: CertFactory, days_left: float = 0.5) -> list[CertificateInfo]:
    old = pki.leaf(days_left=days_left, hosts=(HOST, "www.akig.example"))
    return describe_bundle([old.cert, pki.intermediate.cert], source="ns/s", kind="secret")


def _pair(issued: Issued) -> NewPair:
    from pydantic import SecretStr

    return NewPair(cert_pem=issued.chain_pem().decode(), key_pem=SecretStr(issued.key_pem.decode()))


def test_a_good_replacement_passes(pki: CertFactory) -> None:
    new = pki.leaf(days_left=90, hosts=(HOST, "www.akig.example"))
    check = validate_replacement(_pair(new), _old(pki))
    assert check.ok, check.problems
    assert check.hosts_required == [HOST, "www.akig.example"]


def test_replacement_refusals(pki: CertFactory) -> None:
    from pydantic import SecretStr

    good = pki.leaf(days_left=90, hosts=(HOST, "www.akig.example"))
    other = pki.leaf(days_left=90, hosts=(HOST, "www.akig.example"))
    mismatched = NewPair(
        cert_pem=good.chain_pem().decode(), key_pem=SecretStr(other.key_pem.decode())
    )
    problems = validate_replacement(mismatched, _old(pki)).problems
    assert problems == ["new tls.key does not match the new certificate's public key"]

    narrower = pki.leaf(days_left=90, hosts=(HOST,))
    assert "does not cover: www.akig.example" in " ".join(
        validate_replacement(_pair(narrower), _old(pki)).problems
    )

    expired = pki.leaf(days_left=-1, hosts=(HOST, "www.akig.example"))
    assert any("has expired" in p for p in validate_replacement(_pair(expired), _old(pki)).problems)

    sooner = pki.leaf(days_left=10, hosts=(HOST, "www.akig.example"))
    assert any(
        "not later" in p for p in validate_replacement(_pair(sooner), _old(pki, 30)).problems
    )

    reordered = NewPair(
        cert_pem=good.chain_pem(order=[0, 2, 1]).decode(), key_pem=SecretStr(good.key_pem.decode())
    )
    assert any("chain:" in p for p in validate_replacement(reordered, _old(pki)).problems)

    garbage = NewPair(cert_pem="nope", key_pem=SecretStr("nope"))
    check = validate_replacement(garbage, _old(pki))
    assert not check.ok
    assert "no PEM certificate" in check.problems[0]


def test_refusals_never_quote_the_key(pki: CertFactory) -> None:
    from pydantic import SecretStr

    good = pki.leaf(days_left=90, hosts=(HOST, "www.akig.example"))
    broken_key = good.key_pem.decode().replace("PRIVATE KEY-----\n", "PRIVATE KEY-----\nxx", 1)
    pair = NewPair(cert_pem=good.chain_pem().decode(), key_pem=SecretStr(broken_key))
    check = validate_replacement(pair, _old(pki))
    assert check.problems == ["new tls.key is not an unencrypted PEM private key"]
    assert broken_key.splitlines()[1] not in check.model_dump_json()
    assert "PRIVATE" not in repr(pair)


def test_emergency_checklist_names_each_source_with_its_command() -> None:
    from flows.cert_expiry import emergency_checklist

    file_info = info(-1, source="/etc/ssl/certs/akig.crt", san_dns=[HOST])
    secret_info = info(0.5, source="prod/akig-tls", kind="secret", san_dns=["www.akig.example"])
    infos = {(i.source, 0): i for i in (file_info, secret_info)}
    text = emergency_checklist([evaluate(i, TH) for i in infos.values()], infos)
    assert "openssl x509 -in /etc/ssl/certs/akig.crt -text -noout" in text
    assert "kubectl -n prod get secret akig-tls" in text
    assert f"`DNS:{HOST}`, `DNS:www.akig.example`" in text
    steps = [line for line in text.splitlines() if line.startswith("- [ ] **")]
    assert [s.split("**")[1].split(".")[0] for s in steps] == ["1", "2", "3", "4", "5", "6"]


# ------------------------------------------------------------ flow inputs and outputs


def test_checklist_commands_are_shell_quoted_and_shown_verbatim() -> None:
    from flows.cert_expiry import emergency_checklist

    source = "we_ird`name@127.0.0.1:8443"
    cert = info(0.5, source=source, kind="endpoint", san_dns=["*.akig_x.example"])
    checklist = emergency_checklist([evaluate(cert, TH)], {(source, 0): cert})
    # A double-backtick span: the backtick inside neither ends it nor needs escaping.
    assert "`` openssl s_client -connect 127.0.0.1:8443 -servername 'we_ird`name' " in checklist


@pytest.mark.parametrize("name", ["Akig_TLS", "a/b", "x`y", "", "-tls", "a" * 254])
def test_cert_replace_refuses_a_secret_name_kubernetes_cannot_hold(name: str) -> None:
    from pydantic import ValidationError

    from flows.cert_replace import CertReplaceParams

    with pytest.raises(ValidationError):
        CertReplaceParams(namespace="default", secret=name)


@pytest.mark.parametrize("namespace", ["Default", "a.b", "x" * 64])
def test_cert_replace_refuses_a_namespace_kubernetes_cannot_hold(namespace: str) -> None:
    from pydantic import ValidationError

    from flows.cert_replace import CertReplaceParams

    with pytest.raises(ValidationError):
        CertReplaceParams(namespace=namespace, secret="akig-tls")


@pytest.mark.parametrize(("namespace", "name"), [("Default", "akig-tls"), ("default", "a b")])
def test_cert_expiry_refuses_a_secret_ref_kubernetes_cannot_hold(namespace: str, name: str) -> None:
    from pydantic import ValidationError

    from flows.cert_expiry import SecretRef

    with pytest.raises(ValidationError):
        SecretRef(namespace=namespace, name=name)


def test_changed_since_approval_names_what_changed() -> None:
    assert changed_since_approval(["aa", "bb"], ["aa", "bb"]) is None
    leaf = changed_since_approval(["aa", "bb"], ["cc", "bb"])
    assert leaf is not None and "aa → cc" in leaf
    chain = changed_since_approval(["aa", "bb"], ["aa"])
    assert chain is not None and "same leaf" in chain and "2 → 1" in chain
    assert changed_since_approval(["aa"], []) is not None
