"""Signed approval links and sealed votes: what verifies, what never does, and the key."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, SecretStr

from tasks.approvals.signing import (
    ApprovalSettings,
    LinkClaims,
    TokenRejected,
    Vote,
    _b64,
    _mac,
    _unb64,
    open_vote,
    plan_hash,
    seal_vote,
    sign_link,
    verify_link,
)
from tasks.errors import PermanentError

KEY = b"k" * 32
OTHER = b"o" * 32
NOW = 1_800_000_000


def claims(**changes: object) -> LinkClaims:
    base = LinkClaims(
        run="7b7c6c8e-0000-4000-8000-000000000001",
        recipient="db-team",
        plan="a" * 32,
        choice="approve",
        exp=NOW + 600,
        nonce="00ff00ff00ff00ff00ff00ff",
    )
    return base.model_copy(update=changes)


def a_vote(**changes: object) -> Vote:
    base = Vote(
        run="7b7c6c8e-0000-4000-8000-000000000001",
        plan="a" * 32,
        approver="db-team",
        choice="approve",
        channel="link",
        at=NOW,
        reason="INC-20",
        recipient="db-team",
    )
    return base.model_copy(update=changes)


def rejected(token: str, key: bytes = KEY, now: float = NOW) -> str:
    with pytest.raises(TokenRejected) as info:
        verify_link(token, key, now=now)
    return info.value.reason


# --- links ------------------------------------------------------------------------------


@given(
    recipient=st.text(min_size=1, max_size=40),
    choice=st.sampled_from(["approve", "refuse"]),
    ttl=st.integers(min_value=0, max_value=7 * 86_400),
)
def test_a_signed_link_verifies_to_its_claims(
    recipient: str, choice: Literal["approve", "refuse"], ttl: int
) -> None:
    mine = claims(recipient=recipient, choice=choice, exp=NOW + ttl)
    assert verify_link(sign_link(mine, KEY), KEY, now=NOW) == mine


def test_another_key_makes_a_forgery() -> None:
    assert rejected(sign_link(claims(), OTHER)) == "forged"


def test_a_tampered_body_is_forged_whatever_it_claims() -> None:
    body, mac = sign_link(claims(), KEY).split(".")
    raw = json.loads(_unb64(body))
    for change in ({"recipient": "leadership"}, {"choice": "refuse"}, {"exp": NOW + 10**6}):
        forged = _b64(json.dumps({**raw, **change}, sort_keys=True).encode())
        assert rejected(f"{forged}.{mac}") == "forged"


@given(st.integers(min_value=0, max_value=200), st.integers(min_value=0, max_value=60))
def test_a_tampered_signature_is_forged(position: int, bit: int) -> None:
    body, mac = sign_link(claims(), KEY).split(".")
    raw = bytearray(_unb64(mac))
    raw[position % len(raw)] ^= 1 << (bit % 8)
    assert rejected(f"{body}.{_b64(bytes(raw))}") == "forged"


def test_an_expired_link_is_refused_after_its_expiry_only() -> None:
    token = sign_link(claims(exp=NOW), KEY)
    assert verify_link(token, KEY, now=NOW).exp == NOW  # valid up to its last second
    assert rejected(token, now=NOW + 1) == "expired"
    # Without `now`, the clock: a link that expired an hour ago.
    assert rejected(sign_link(claims(exp=int(time.time()) - 3600), KEY), now=time.time()) == (
        "expired"
    )


@pytest.mark.parametrize(
    "token",
    [
        "",
        "no-dot",
        "a.b.c",
        "!!!.???",
        "x" * 2001,
        "." * 1,
        f"{_b64(b'x' * 10)}.{_b64(b'y' * 32)}",
    ],
)
def test_malformed_tokens_are_refused_as_such_or_as_forged(token: str) -> None:
    assert rejected(token) in {"malformed", "forged"}


def test_a_signed_body_that_is_not_claims_is_malformed() -> None:
    body = b'{"run": "x"}'
    token = f"{_b64(body)}.{_b64(_mac(KEY, 'link', body))}"
    assert rejected(token) == "malformed"


@given(st.text(max_size=300))
def test_any_text_is_refused_never_raises_anything_else(token: str) -> None:
    assert rejected(token) in {"malformed", "forged"}


def test_the_rejection_never_carries_the_token_or_the_key() -> None:
    token = sign_link(claims(), OTHER)
    with pytest.raises(TokenRejected) as info:
        verify_link(token, KEY, now=NOW)
    assert str(info.value) == "forged"
    assert token not in repr(info.value) and KEY.decode() not in repr(info.value)


# --- votes ------------------------------------------------------------------------------


def test_a_sealed_vote_opens_to_itself() -> None:
    vote = a_vote()
    stored = json.loads(json.dumps(seal_vote(vote, KEY)))  # as Prefect keeps it
    assert open_vote(stored, KEY) == vote


@pytest.mark.parametrize(
    "change", [{"approver": "leadership"}, {"choice": "refuse"}, {"plan": "b" * 32}, {"at": 1.0}]
)
def test_a_changed_vote_does_not_open(change: dict[str, object]) -> None:
    stored = seal_vote(a_vote(), KEY)
    stored["vote"] = {**stored["vote"], **change}
    assert open_vote(stored, KEY) is None


@pytest.mark.parametrize(
    "stored", [None, "text", [], {}, {"vote": {}}, {"vote": {}, "seal": 3}, {"seal": "!!"}]
)
def test_anything_else_stored_does_not_open(stored: object) -> None:
    assert open_vote(stored, KEY) is None


def test_a_vote_sealed_with_another_key_does_not_open() -> None:
    assert open_vote(seal_vote(a_vote(), OTHER), KEY) is None


def test_a_link_token_never_opens_as_a_vote_seal_and_back() -> None:
    # The same bytes under the other purpose: the MAC's purpose prefix keeps them apart.
    vote = a_vote()
    body = json.dumps(vote.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    link_mac = sign_link(claims(), KEY).split(".")[1]
    assert open_vote({"vote": vote.model_dump(mode="json"), "seal": link_mac}, KEY) is None
    seal = seal_vote(vote, KEY)["seal"]
    assert rejected(f"{_b64(body.encode())}.{seal}") == "forged"
    link_body = sign_link(claims(), KEY).split(".")[0]
    assert rejected(f"{link_body}.{seal}") == "forged"


def test_only_ui_votes_are_unverified() -> None:
    assert a_vote(channel="link").verified and a_vote(channel="slack").verified
    assert not a_vote(channel="ui").verified


# --- the plan's hash ----------------------------------------------------------------------


class Restart(BaseModel):
    target: str
    replicas: int
    dry_run_result: str = ""


class Undo(BaseModel):
    target: str
    replicas: int
    dry_run_result: str = ""


def test_the_plan_hash_is_stable_and_ignores_the_dry_run_result() -> None:
    plan = [Restart(target="akig-backend", replicas=3)]
    assert plan_hash(plan) == plan_hash([Restart(target="akig-backend", replicas=3)])
    assert plan_hash(plan) == plan_hash(
        [Restart(target="akig-backend", replicas=3, dry_run_result="would restart 3 pods")]
    )
    assert len(plan_hash(plan)) == 32 and int(plan_hash(plan), 16) >= 0


@given(st.integers(min_value=0, max_value=100), st.integers(min_value=0, max_value=100))
def test_the_plan_hash_changes_with_any_pinned_value(a: int, b: int) -> None:
    same = plan_hash([Restart(target="x", replicas=a)]) == plan_hash(
        [Restart(target="x", replicas=b)]
    )
    assert same == (a == b)


def test_the_plan_hash_depends_on_the_kind_target_and_order() -> None:
    one, two = Restart(target="a", replicas=1), Restart(target="b", replicas=1)
    assert plan_hash([one]) != plan_hash([Undo(target="a", replicas=1)])
    assert plan_hash([one]) != plan_hash([two])
    assert plan_hash([one, two]) != plan_hash([two, one])
    assert plan_hash([one]) != plan_hash([one, two])


# --- the key ------------------------------------------------------------------------------


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RUNBOOKS_APPROVAL_"):
            monkeypatch.delenv(name)


def test_no_key_configured_is_none(no_env: None) -> None:
    assert ApprovalSettings().key() is None


def test_a_short_key_is_refused_without_showing_it(no_env: None) -> None:
    short = "s3cr3t-but-short"
    with pytest.raises(PermanentError, match="at least 32") as info:
        ApprovalSettings(signing_key=SecretStr(short)).key()
    assert short not in str(info.value)


def test_the_key_from_the_environment(no_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBOOKS_APPROVAL_SIGNING_KEY", "e" * 40)
    settings = ApprovalSettings()
    assert settings.key() == b"e" * 40
    assert "e" * 40 not in repr(settings)


def test_the_key_from_a_file(no_env: None, tmp_path: Path) -> None:
    path = tmp_path / "approval.key"
    path.write_text("f" * 48 + "\n")  # `make run` writes it with a newline
    assert ApprovalSettings(signing_key_file=path).key() == b"f" * 48
    path.write_text("short")
    with pytest.raises(PermanentError, match="at least 32"):
        ApprovalSettings(signing_key_file=path).key()


def test_an_unreadable_key_file_names_the_file_not_its_content(
    no_env: None, tmp_path: Path
) -> None:
    missing = tmp_path / "nope.key"
    with pytest.raises(PermanentError, match=r"nope\.key: FileNotFoundError"):
        ApprovalSettings(signing_key_file=missing).key()


def test_the_variable_wins_over_the_file(no_env: None, tmp_path: Path) -> None:
    path = tmp_path / "approval.key"
    path.write_text("f" * 48)
    both = ApprovalSettings(signing_key=SecretStr("v" * 32), signing_key_file=path)
    assert both.key() == b"v" * 32
