"""`scrub_secrets`: credentials in log lines from outside are masked, the rest kept as is."""

from __future__ import annotations

import string

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tasks.logs import MASK, scrub_secrets


@pytest.mark.parametrize(
    ("line", "scrubbed"),
    [
        (
            "connect postgres://app:hunter2@db:5432/akig failed",
            "connect postgres://***@db:5432/akig failed",
        ),
        ("postgresql+psycopg://app:p@ss@db/akig", "postgresql+psycopg://***@db/akig"),
        ("redis://:hunter2@cache:6379/0", "redis://***@cache:6379/0"),
        ("GET /login?user=bob&password=hunter2&x=1", "GET /login?user=bob&password=***&x=1"),
        ("PGPASSWORD=hunter2 psql", "PGPASSWORD=*** psql"),
        ("db_passwd: hunter2 ok", "db_passwd: *** ok"),
        ('{"client_secret": "a b", "token":"t0k"}', '{"client_secret": "***", "token":"***"}'),
        ("api_key='k' X-Api-Key: k2", "api_key='***' X-Api-Key: ***"),
        ("Authorization: Bearer eyJhbGci.eyJzdWIi.sig", "Authorization: Bearer ***"),
        ('authorization="Basic dXNlcjpwYXNz"', 'authorization="Basic ***"'),
        ("Proxy-Authorization: rawtoken", "Proxy-Authorization: ***"),
        ("upstream said: bearer abc123== expired", "upstream said: bearer *** expired"),
    ],
)
def test_credentials_are_masked(line: str, scrubbed: str) -> None:
    assert scrub_secrets(line) == scrubbed


@pytest.mark.parametrize(
    "line",
    [
        # The sandbox backend's own lines, as the runbook counts them.
        "2026-12-06T12:00:00.000Z level=error method=GET path=/api/products "
        "route=/api/products status=500 duration=1.2ms release=v2 ip=127.0.0.1 "
        'error="release v2 bug: unhandled exception"',
        'level=error status=503 error="OperationalError: too many connections for database"',
        "GET http://example.com/a?b=c@d 200",
        "mailto user@example.com",
    ],
)
def test_lines_without_credentials_are_unchanged(line: str) -> None:
    assert scrub_secrets(line) == line


# A secret as it appears unquoted in a line: no blank, quote or separator of its own.
_SECRET = st.text(
    alphabet=string.ascii_letters + string.digits + "!$%()*+-.:=@[]^_{|}~", min_size=4
)
_URL_SECRET = st.text(alphabet=string.ascii_letters + string.digits + "!$%*+-.:=_~@", min_size=4)
_FORMS = [
    'level=error error="connect postgres://app:{s}@db:5432/akig: refused"',
    "status=500 url=https://{s}@api.example/x",
    "POST /token password={s}&user=bob",
    "config passwd={s} secret={s}",
    'payload {{"token": "{s}", "n": 1}}',
    "retrying with Authorization: Bearer {s}",
    "header authorization={s}",
    "auth bearer {s} rejected",
]


@given(secret=_SECRET, form=st.sampled_from(_FORMS[2:]))
def test_no_secret_survives(secret: str, form: str) -> None:
    if "Bearer" in form or "bearer" in form or "authorization" in form:
        # A bearer token is base64url / base64 / token68.
        secret = "".join(c for c in secret if c.isalnum() or c in "-._~+/")
        assume(len(secret) >= 4)
    line = form.format(s=secret)
    assume(secret not in form and secret not in MASK)
    assert secret not in scrub_secrets(line)


@given(secret=_URL_SECRET, form=st.sampled_from(_FORMS[:2]))
def test_no_url_password_survives(secret: str, form: str) -> None:
    line = form.format(s=secret)
    assume(secret not in form and secret not in MASK)
    assert secret not in scrub_secrets(line)


@given(st.text(max_size=300))
def test_scrubbing_is_idempotent(line: str) -> None:
    once = scrub_secrets(line)
    assert scrub_secrets(once) == once


_PIECES = st.sampled_from(
    ["password", "token", "=", ":", " ", '"', "'", "://", "@", "/", "Bearer ", "x", "Authorization"]
)


@given(st.lists(_PIECES, max_size=30).map("".join))
def test_scrubbing_credential_shaped_text_is_idempotent(line: str) -> None:
    once = scrub_secrets(line)
    assert scrub_secrets(once) == once
