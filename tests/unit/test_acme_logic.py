"""tasks/acme.py without a CA: cert-manager detection, names, error verdicts, the solvers."""

from __future__ import annotations

import socket
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import requests
from acme import challenges, messages
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwk import JWKEC

from tasks.acme import (
    Dns01Solver,
    Http01Responder,
    _acme_error,
    check_names,
    issuance_variable,
    secret_owner,
)
from tasks.errors import PermanentError, TransientError

KEY = JWKEC(key=ec.generate_private_key(ec.SECP256R1()))


def _meta(annotations: dict[str, str] | None = None, owners: list[Any] | None = None) -> Any:
    return SimpleNamespace(namespace="web", annotations=annotations, owner_references=owners)


def test_cert_manager_is_recognised_by_owner_reference_or_annotation() -> None:
    owner = SimpleNamespace(api_version="cert-manager.io/v1", kind="Certificate", name="web-cert")
    by_owner = secret_owner(_meta(owners=[owner]))
    assert (by_owner.managed_by, by_owner.certificate) == ("cert-manager", "web/web-cert")
    by_note = secret_owner(_meta({"cert-manager.io/certificate-name": "web-cert"}))
    assert (by_note.managed_by, by_note.certificate) == ("cert-manager", "web/web-cert")
    issuer_only = secret_owner(_meta({"cert-manager.io/issuer-name": "le"}))
    assert issuer_only.managed_by == "cert-manager"
    assert issuer_only.certificate is None
    # Another API group's "Certificate", or unrelated annotations: a manual Secret.
    other = SimpleNamespace(api_version="example.io/v1", kind="Certificate", name="x")
    assert secret_owner(_meta({"team": "web"}, [other])).managed_by == "manual"


def test_names_are_checked_before_any_order() -> None:
    assert check_names(["A.example", "a.example", "b.example"], "http-01") == [
        "a.example",
        "b.example",
    ]
    with pytest.raises(PermanentError, match="wildcard needs the DNS-01"):
        check_names(["*.a.example"], "http-01")
    assert check_names(["*.a.example"], "dns-01") == ["*.a.example"]
    with pytest.raises(PermanentError, match="no DNS names"):
        check_names([], "http-01")
    for ip in ("127.0.0.1", "::1"):
        with pytest.raises(PermanentError, match="an IP address, not a DNS name"):
            check_names(["a.example", ip], "http-01")


def test_issuance_variable_names_are_valid_prefect_names() -> None:
    name = issuance_variable("WWW.Example.org")
    assert name == issuance_variable("www.example.org")
    assert name.startswith("acme-issued-")
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-_")


def test_error_verdicts() -> None:
    down = _acme_error(requests.exceptions.ConnectionError("refused"), "order")
    assert isinstance(down, TransientError)
    assert "ACME server unreachable" in str(down)
    nonce = _acme_error(messages.Error.with_code("badNonce", detail="stale"), "order")
    assert isinstance(nonce, TransientError)
    assert "the CA refused (badNonce: stale)" in str(nonce)
    refused = _acme_error(messages.Error.with_code("rejectedIdentifier", detail="no"), "order")
    assert isinstance(refused, PermanentError)


def test_http01_responder_answers_only_its_tokens_and_stops() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    responder = Http01Responder("127.0.0.1", port)
    responder.start()
    chall = challenges.HTTP01(token=b"t" * 32)
    challb = messages.ChallengeBody(chall=chall, uri="https://ca/chall/1")
    responder.present("a.example", challb, KEY)
    base = f"http://127.0.0.1:{port}"
    ok = httpx.get(base + chall.path, timeout=5)
    assert ok.status_code == 200
    assert ok.text == chall.validation(KEY)
    assert httpx.get(base + "/.well-known/acme-challenge/other", timeout=5).status_code == 404
    assert httpx.get(base + "/", timeout=5).status_code == 404
    responder.cleanup()
    with pytest.raises(httpx.ConnectError):
        httpx.get(base + chall.path, timeout=2)


class _MemoryDns:
    """A Dns01Provider kept in memory: the plug-in interface, nothing else."""

    def __init__(self) -> None:
        self.records: dict[str, set[str]] = {}

    def add_txt(self, fqdn: str, value: str) -> None:
        self.records.setdefault(fqdn, set()).add(value)

    def remove_txt(self, fqdn: str, value: str) -> None:
        self.records[fqdn].discard(value)


def test_dns01_solver_publishes_then_removes_the_record() -> None:
    dns = _MemoryDns()
    solver = Dns01Solver(dns)
    chall = challenges.DNS01(token=b"d" * 32)
    solver.present("*.a.example", messages.ChallengeBody(chall=chall, uri="https://ca/c/2"), KEY)
    assert dns.records == {"_acme-challenge.a.example.": {chall.validation(KEY)}}
    solver.cleanup()
    assert dns.records == {"_acme-challenge.a.example.": set()}
