"""Logging helpers for task code: the run's logger, and credentials scrubbed out of log lines
read from outside (pod logs) before they reach a result, a report or an artifact."""

from __future__ import annotations

import logging
import re

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

#: What replaces a credential.
MASK = "***"

# `scheme://user:password@host`: everything between `//` and the last `@` of the authority
# (a password may hold an unencoded `@`), up to a `/`, `?`, `#`, a quote or a blank.
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]{0,30}://)[^\s/?#\"'<>]{0,1024}@")
# `Authorization: Bearer xyz`, `authorization="Basic xyz"`, `Authorization: xyz`.
_AUTHORIZATION = re.compile(
    r"(?i)(\b(?:proxy-)?authorization[\"']?\s*[=:]\s*[\"']?)"
    r"(?:(bearer|basic|token|digest|negotiate|apikey)\s+)?[^\s\"',;]+"
)
# A bearer token anywhere else: `bearer xyz`, `Bearer eyJ...`.
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9\-._~+/]+=*")
# `password=x`, `db_passwd: x`, `"client_secret": "x"`, `token=x`, `api_key=x` (a JSON key
# too): the value, quoted or up to a blank, `&`, `;` or `,`. Matched from the keyword on
# (whatever precedes it in the key is kept) and bounded: a long line costs linear time.
_KEY_VALUE = re.compile(
    r"(?i)((?:password|passwd|pwd|secret|token|api[_\-]?key)[\w.\-]{0,40}[\"']?\s*[=:]\s*)"
    r"(\"[^\"]*\"|'[^']*'|[^\s&;,\"']+)"
)


def _masked_value(match: re.Match[str]) -> str:
    value = match[2]
    quote = value[0] if value[0] in "\"'" else ""
    return f"{match[1]}{quote}{MASK}{quote}"


def scrub_secrets(text: str) -> str:
    """`text` (a log line from outside) with credentials masked: URL userinfo
    (`postgres://***@host`), `password=` / `passwd=` / `secret=` / `token=` / `api_key=`
    values, `Authorization:` values and bearer tokens. Idempotent."""
    text = _URL_USERINFO.sub(lambda m: f"{m[1]}{MASK}@", text)
    text = _AUTHORIZATION.sub(lambda m: f"{m[1]}{m[2] + ' ' if m[2] else ''}{MASK}", text)
    text = _BEARER.sub(lambda m: f"{m[1]}{MASK}", text)
    return _KEY_VALUE.sub(_masked_value, text)


def run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The Prefect run logger when in a flow/task run, else the `runbooks` logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("runbooks")
