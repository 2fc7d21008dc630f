"""The approval link routes without a run: auth exemption, refusals, headers, log redaction.

Everything here is decided before Prefect is asked (the token, the key, the auth); the
routes against a real paused run are tests/integration/test_approval_links.py.
"""

from __future__ import annotations

import logging
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from deployments.approval_links import RedactApprovalTokens, redact
from deployments.cli import approval_env
from tasks.approvals.signing import LinkClaims, new_nonce, sign_link
from tests.fixtures.approvals import KEY
from tests.fixtures.triggers import alert, bearer, payload, receiver_settings, serve_app

RUN = "7f1c0c52-64a4-4a0e-9a7e-1b4f3f1f2a10"


def token(exp_in_s: int = 600, key: bytes = KEY) -> str:
    claims = LinkClaims(
        run=RUN,
        recipient="on-call",
        plan="c" * 32,
        choice="approve",
        exp=int(time.time()) + exp_in_s,
        nonce=new_nonce(),
    )
    return sign_link(claims, key)


def check_headers(r: httpx.Response) -> None:
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["x-robots-tag"] == "noindex"
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "style-src 'unsafe-inline'" in csp
    assert "form-action 'self'" in csp


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/approvals/abc.def"), ("POST", "/approvals"), ("POST", "/slack/interactions")],
)
def test_signed_paths_need_no_bearer_token(offline_app: Any, method: str, path: str) -> None:
    with TestClient(offline_app) as client:
        r = client.request(method, path, data={"token": "x"})
    # The route answers, not the bearer check (Slack's route refuses the unsigned request
    # itself, with a 401 of its own: no bearer challenge).
    assert "www-authenticate" not in r.headers
    if path != "/slack/interactions":
        assert r.status_code != 401


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/alerts"),
        ("GET", "/approvals/"),
        ("GET", "/approvals/a/b"),
        ("GET", "/approvalsx/abc"),
        ("POST", "/approvals-admin"),
        ("POST", "/slack/interactions/more"),
        ("GET", "/slack"),
    ],
)
def test_every_other_path_still_needs_the_token(offline_app: Any, method: str, path: str) -> None:
    with TestClient(offline_app) as client:
        r = client.request(method, path)
    assert r.status_code == 401


def test_alerts_still_need_the_token_and_take_it(offline_app: Any) -> None:
    body = payload(alert(namespace="links"))
    with TestClient(offline_app) as client:
        assert client.post("/alerts", json=body).status_code == 401
        assert client.post("/alerts", json=body, headers=bearer()).status_code == 200


def test_the_body_limit_holds_on_the_signed_paths(offline_app: Any) -> None:
    big = "x" * (receiver_settings().max_body_bytes + 1)
    with TestClient(offline_app) as client:
        r = client.post("/approvals", data={"token": big})
    assert r.status_code == 413


@pytest.mark.parametrize(
    ("make", "status", "words"),
    [
        (lambda: token(key=b"k" * 40), 403, "not genuine"),
        (lambda: "garbage", 400, "not an approval link"),
        (lambda: token()[:-3] + ".x.y", 400, "not an approval link"),
        (lambda: token(exp_in_s=-1), 410, "expired"),
    ],
    ids=["forged", "malformed", "two-dots", "expired"],
)
def test_a_bad_token_gets_its_page_on_get_and_post(
    offline_app: Any, caplog: pytest.LogCaptureFixture, make: Any, status: int, words: str
) -> None:
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.WARNING, "httpx")  # the test client's own URL lines
    bad = make()
    with TestClient(offline_app) as client:
        answers = [client.get(f"/approvals/{bad}"), client.post("/approvals", data={"token": bad})]
    for r in answers:
        assert r.status_code == status, r.text
        assert words in r.text and "Nothing was recorded" in r.text
        assert bad not in r.text
        assert r.headers["content-type"].startswith("text/html")
        check_headers(r)
    assert "approval link refused (GET)" in caplog.text
    assert "approval link refused (POST)" in caplog.text
    assert bad not in caplog.text and KEY.decode() not in caplog.text


def test_without_a_signing_key_the_links_are_not_configured(
    offline_app: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("RUNBOOKS_APPROVAL_SIGNING_KEY")
    monkeypatch.delenv("RUNBOOKS_APPROVAL_SIGNING_KEY_FILE", raising=False)
    with TestClient(offline_app) as client:
        answers = [client.get(f"/approvals/{token()}"), client.post("/approvals", data={})]
    for r in answers:
        assert r.status_code == 503
        assert "approval links are not configured" in r.text
        check_headers(r)
    assert "approval link refused: no signing key" in caplog.text


def test_an_unreadable_key_file_is_not_configured_and_not_leaked(
    offline_app: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv("RUNBOOKS_APPROVAL_SIGNING_KEY")
    short = tmp_path / "key"
    short.write_text("too-short-key-material")
    monkeypatch.setenv("RUNBOOKS_APPROVAL_SIGNING_KEY_FILE", str(short))
    with TestClient(offline_app) as client:
        r = client.get(f"/approvals/{token()}")
    assert r.status_code == 503
    assert "at least 32 characters" in caplog.text
    assert "too-short-key-material" not in caplog.text + r.text


def test_prefect_unreachable_is_a_clear_page(offline_app: Any) -> None:
    # offline_app's Prefect is http://127.0.0.1:9/api: nothing listens.
    with TestClient(offline_app) as client:
        r = client.get(f"/approvals/{token()}")
    assert r.status_code == 502 and "Nothing was recorded" in r.text


def test_redact_replaces_the_token_in_paths() -> None:
    tok = token()
    assert redact(f"GET /approvals/{tok} HTTP/1.1") == "GET /approvals/<redacted> HTTP/1.1"
    assert redact(f"/approvals/{tok}?x=1") == "/approvals/<redacted>?x=1"
    assert redact("POST /approvals HTTP/1.1") == "POST /approvals HTTP/1.1"
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, "", 0, '%s - "%s %s" %d',
        ("127.0.0.1:5", "GET", f"/approvals/{tok}", 200), None,
    )  # fmt: skip
    assert RedactApprovalTokens().filter(record)
    assert tok not in record.getMessage() and "/approvals/<redacted>" in record.getMessage()


class Lines(logging.Handler):
    """Collects formatted lines of one logger."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_uvicorns_access_log_never_prints_a_token(offline_app: Any) -> None:
    tok = token(key=b"k" * 40)  # forged: answered without Prefect
    lines = Lines()
    access = logging.getLogger("uvicorn.access")
    with serve_app(offline_app, log_level="info", access_log=True) as server:
        access.addHandler(lines)  # after uvicorn configured its logging
        try:
            r = httpx.get(f"{server.url}/approvals/{tok}?preview=1", timeout=20)
            deadline = time.monotonic() + 10
            while not lines.lines and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            access.removeHandler(lines)
    assert r.status_code == 403
    (line,) = [x for x in lines.lines if "/approvals/" in x]
    assert "/approvals/<redacted>?preview=1" in line and "403" in line
    assert tok not in line and tok.split(".")[1] not in line


def test_make_run_makes_the_signing_key_once_and_says_where(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "runbooks.cli")
    env: dict[str, str] = {}
    approval_env(env, tmp_path, "http://127.0.0.1:9095")
    path = Path(env["RUNBOOKS_APPROVAL_SIGNING_KEY_FILE"])
    assert path.parent == tmp_path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = path.read_text().strip()
    assert len(key) >= 32
    assert env["RUNBOOKS_APPROVAL_BASE_URL"] == "http://127.0.0.1:9095"
    again: dict[str, str] = {}
    approval_env(again, tmp_path, "http://127.0.0.1:9095")
    assert Path(again["RUNBOOKS_APPROVAL_SIGNING_KEY_FILE"]).read_text().strip() == key
    assert str(path) in caplog.text and key not in caplog.text


def test_make_run_keeps_the_operators_key_and_address(tmp_path: Path) -> None:
    env = {
        "RUNBOOKS_APPROVAL_SIGNING_KEY": "operator-key-0123456789abcdef0123456789",
        "RUNBOOKS_APPROVAL_BASE_URL": "https://runbooks.example.org",
    }
    approval_env(env, tmp_path, "http://127.0.0.1:9095")
    assert "RUNBOOKS_APPROVAL_SIGNING_KEY_FILE" not in env
    assert env["RUNBOOKS_APPROVAL_BASE_URL"] == "https://runbooks.example.org"
    assert list(tmp_path.iterdir()) == []
