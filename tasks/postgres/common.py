"""Shared by the PostgreSQL tasks: name checks, query redaction, settings for another database."""

from __future__ import annotations

import re
from typing import Literal

import psycopg
from psycopg.conninfo import make_conninfo
from pydantic import SecretStr

from tasks.clients import pg_dsn
from tasks.errors import PermanentError
from tasks.settings import PostgresSettings

IdleState = Literal["idle", "idle in transaction", "idle in transaction (aborted)"]
IDLE_STATES: tuple[IdleState, ...] = (
    "idle",
    "idle in transaction",
    "idle in transaction (aborted)",
)

# A SQL identifier we accept for role/database names passed from forms or alerts.
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$.-]{0,62}$")


def check_name(value: str | None) -> str | None:
    """The name unchanged when it is a plain PostgreSQL name (or None); else ValueError."""
    if value is not None and not _NAME.match(value):
        raise ValueError(f"not a valid PostgreSQL name: {value!r}")
    return value


_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\x80-\uffff][A-Za-z0-9_\x80-\uffff]*)?\$")
_IDENT_CHAR = re.compile(r"[A-Za-z0-9_$\x80-\uffff]")


def _mask_literals(query: str) -> str:
    """Replace every literal and comment body with `…`, the way PostgreSQL's lexer sees them.

    Handled: '…' (with '' inside), E'…' (backslash escapes), $$…$$ and $tag$…$tag$, "quoted
    identifiers" (kept), -- and /* */ comments (bodies masked: a quote in a comment must not
    flip what counts as inside a literal). An unterminated literal is masked to the end.
    """
    out: list[str] = []
    i, n = 0, len(query)
    while i < n:
        c = query[i]
        prev_ident = i > 0 and bool(_IDENT_CHAR.match(query[i - 1]))
        if c == "'" or (c in "eE" and query[i + 1 : i + 2] == "'" and not prev_ident):
            escapes = c != "'"
            j = i + (2 if escapes else 1)
            while j < n:
                if escapes and query[j] == "\\":
                    j += 2
                elif query[j] == "'":
                    if query[j + 1 : j + 2] == "'":
                        j += 2
                    else:
                        break
                else:
                    j += 1
            out.append(("E" if escapes else "") + "'…'")
            i = j + 1
        elif c == "$" and not prev_ident and (tag := _DOLLAR_TAG.match(query, i)):
            end = query.find(tag.group(), tag.end())
            out.append(f"{tag.group()}…{tag.group()}")
            i = n if end < 0 else end + len(tag.group())
        elif c == '"':
            end = query.find('"', i + 1)
            end = n - 1 if end < 0 else end
            out.append(query[i : end + 1])
            i = end + 1
        elif query.startswith("--", i):
            end = query.find("\n", i)
            out.append("--…\n")
            i = n if end < 0 else end + 1
        elif query.startswith("/*", i):
            end = query.find("*/", i + 2)
            out.append("/*…*/")
            i = n if end < 0 else end + 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def redact_query(query: str | None, limit: int = 160) -> str:
    """Mask literals and comments (they may hold passwords), squeeze blanks, truncate."""
    if not query:
        return ""
    masked = re.sub(r"\s+", " ", _mask_literals(query)).strip()
    return masked if len(masked) <= limit else masked[: limit - 1] + "…"


def settings_for(database: str | None, settings: PostgresSettings | None) -> PostgresSettings:
    """The settings, pointed at `database` instead of the DSN's own (None = unchanged)."""
    settings = settings or PostgresSettings()
    if database is None:
        return settings
    check_name(database)
    try:
        dsn = make_conninfo(pg_dsn(settings), dbname=database)
    except psycopg.Error:
        # libpq's parse errors quote the DSN: never echo them.
        raise PermanentError("PostgreSQL DSN is malformed (not shown)") from None
    return settings.model_copy(update={"dsn": SecretStr(dsn), "dsn_secret_block": None})
