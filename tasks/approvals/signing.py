"""Signed approval links and sealed votes: HMAC-SHA256 with one server key.

A link token binds a decision (approve or refuse) to one run, one recipient, one plan
(its hash) and an expiry; it is single use because the vote it makes is stored under its
nonce, and Prefect keeps one input per key and run. A vote the receiver stores is sealed
with the same key, so the paused run counts only votes the receiver verified: an input
written straight to Prefect's API (which has one shared credential) counts for nothing.

The key comes from `RUNBOOKS_APPROVAL_SIGNING_KEY` or the file `signing_key_file`
(`make run` generates one, 0600). It never appears in a log, an artifact or an exception.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks.errors import PermanentError

Choice = Literal["approve", "refuse"]
Channel = Literal["link", "slack", "ui"]


class ApprovalSettings(BaseSettings):
    """Where approval links point and how they are signed."""

    model_config = SettingsConfigDict(env_prefix="RUNBOOKS_APPROVAL_")

    signing_key: SecretStr | None = Field(
        None, description="HMAC key of links and votes (>= 32 chars); or `signing_key_file`."
    )
    signing_key_file: Path | None = Field(
        None, description="A file holding the key (`make run` writes one, 0600)."
    )
    base_url: str = Field(
        "http://127.0.0.1:9095",
        description="The receiver as approvers reach it: links are `<base_url>/approvals/...`.",
    )
    link_ttl_s: int = Field(
        3600, ge=60, le=7 * 86_400, description="A link expires this long after the page."
    )

    def key(self) -> bytes | None:
        """The signing key, or None when none is configured (links are then not sent)."""
        if self.signing_key is not None:
            raw = self.signing_key.get_secret_value()
        elif self.signing_key_file is not None:
            try:
                raw = self.signing_key_file.read_text().strip()
            except OSError as exc:
                raise PermanentError(
                    f"approval signing key file {self.signing_key_file}: {type(exc).__name__}"
                ) from None
        else:
            return None
        if len(raw) < 32:
            raise PermanentError("the approval signing key must be at least 32 characters")
        return raw.encode()


def plan_hash(actions: Sequence[BaseModel]) -> str:
    """The plan's identity: every action's kind, target and pinned values (not its dry run)."""
    rows = [
        {"type": type(a).__name__, **a.model_dump(mode="json", exclude={"dry_run_result"})}
        for a in actions
    ]
    text = json.dumps(rows, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, purpose: str, data: bytes) -> bytes:
    # The purpose keeps a link token from ever verifying as a vote seal, and back.
    return hmac.new(key, purpose.encode() + b"\x00" + data, hashlib.sha256).digest()


class LinkClaims(BaseModel):
    """What one approval link allows: one decision, one run, one recipient, one plan."""

    run: str
    recipient: str
    plan: str
    choice: Choice
    exp: int = Field(description="Expiry, Unix seconds.")
    nonce: str = Field(description="Shared by a recipient's Approve and Refuse links: one use.")


class TokenRejected(Exception):
    """A link token that does not verify; `reason` is shown to the person and logged."""

    def __init__(self, reason: Literal["malformed", "forged", "expired"]) -> None:
        super().__init__(reason)
        self.reason = reason


def new_nonce() -> str:
    return secrets.token_hex(12)  # Prefect input keys: letters, digits, dashes


def sign_link(claims: LinkClaims, key: bytes) -> str:
    """The token for `claims`: base64url(JSON) + "." + base64url(HMAC)."""
    body = json.dumps(claims.model_dump(), sort_keys=True, separators=(",", ":")).encode()
    return f"{_b64(body)}.{_b64(_mac(key, 'link', body))}"


def verify_link(token: str, key: bytes, now: float | None = None) -> LinkClaims:
    """The claims of a genuine, unexpired token; `TokenRejected` otherwise (never its text)."""
    if len(token) > 2000 or token.count(".") != 1:
        raise TokenRejected("malformed")
    body_b64, mac_b64 = token.split(".")
    try:
        body, mac = _unb64(body_b64), _unb64(mac_b64)
    except (binascii.Error, ValueError):
        raise TokenRejected("malformed") from None
    if not hmac.compare_digest(mac, _mac(key, "link", body)):
        raise TokenRejected("forged")
    try:
        claims = LinkClaims.model_validate_json(body)
    except ValidationError:
        raise TokenRejected("malformed") from None
    if claims.exp < (time.time() if now is None else now):
        raise TokenRejected("expired")
    return claims


class Vote(BaseModel):
    """One person's decision on one plan of one run, as the receiver verified it."""

    run: str
    plan: str
    approver: str = Field(description="The verified contact, or the name typed in the UI.")
    choice: Choice
    channel: Channel
    at: float = Field(description="Unix seconds.")
    reason: str = Field("", max_length=2000)
    recipient: str = Field("", description="Whom the link or message was sent to.")

    @property
    def verified(self) -> bool:
        return self.channel != "ui"


def seal_vote(vote: Vote, key: bytes) -> dict[str, Any]:
    """The vote as stored: its fields and a seal the paused run checks."""
    body = json.dumps(vote.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return {"vote": vote.model_dump(mode="json"), "seal": _b64(_mac(key, "vote", body.encode()))}


def open_vote(stored: Any, key: bytes) -> Vote | None:
    """The vote of a stored record whose seal holds; None for anything else."""
    if not isinstance(stored, dict) or not isinstance(stored.get("seal"), str):
        return None
    try:
        vote = Vote.model_validate(stored.get("vote"))
        seal = _unb64(stored["seal"])
    except (ValidationError, binascii.Error, ValueError):
        return None
    body = json.dumps(vote.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return vote if hmac.compare_digest(seal, _mac(key, "vote", body.encode())) else None
