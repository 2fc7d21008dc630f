"""The newest PostgreSQL base backup's age, from the backup tool's own listing (read only).

The command comes from settings (`RUNBOOKS_OUTAGE_BACKUP_LIST_COMMAND`, e.g.
`pgbackrest info`, `wal-g backup-list`), run without a shell, bounded by a timeout. The newest
time stamp it prints (ISO `2026-12-07 01:00:00+00`, `2026-12-07T01:00:00Z`, or a pgBackRest
label `20261207-010000F`) is the newest backup. Only that stamp and a line count leave this
module: a listing may name buckets or hosts, never credentials, but we quote none of it.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from datetime import UTC, datetime

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from tasks.errors import PermanentError, TransientError

_ISO = re.compile(
    r"(?P<d>\d{4}-\d{2}-\d{2})[T ](?P<t>\d{2}:\d{2}(?::\d{2})?)(?:\.\d+)?"
    r"(?P<z>Z|[+-]\d{2}(?::?\d{2})?)?"
)
_LABEL = re.compile(r"\b(?P<d>\d{8})-(?P<t>\d{6})[FDI]\b")


class BaseBackups(BaseModel):
    """What the listing said: how many lines, the newest backup's time and age."""

    command: str = Field(description="The program run (its first word only).")
    lines: int
    newest: datetime | None = Field(None, description="None: no time stamp in the output.")
    newest_age_s: float | None = None


def newest_stamp(text: str) -> datetime | None:
    """The latest time stamp in a backup tool's listing (UTC when it gives no zone)."""
    found: list[datetime] = []
    for m in _ISO.finditer(text):
        zone = m["z"] or "+00:00"
        if zone == "Z":
            zone = "+00:00"
        elif len(zone) == 3:
            zone += ":00"
        elif ":" not in zone:
            zone = zone[:3] + ":" + zone[3:]
        clock = m["t"] if m["t"].count(":") == 2 else m["t"] + ":00"
        try:
            found.append(datetime.fromisoformat(f"{m['d']}T{clock}{zone}"))
        except ValueError:
            continue
    for m in _LABEL.finditer(text):
        try:
            found.append(datetime.strptime(m["d"] + m["t"], "%Y%m%d%H%M%S").replace(tzinfo=UTC))
        except ValueError:
            continue
    return max(found) if found else None


@task(cache_policy=NO_CACHE, task_run_name="base-backups")
def base_backups(command: str, timeout_s: float = 30.0) -> BaseBackups:
    """Run the backup-listing command (no shell) and read the newest backup's age."""
    argv = shlex.split(command)
    if not argv:
        raise PermanentError("the backup-list command is empty")
    program = argv[0].rsplit("/", 1)[-1]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    except FileNotFoundError:
        raise PermanentError(f"backup-list command {program!r} not found") from None
    except subprocess.TimeoutExpired:
        raise TransientError(
            f"backup-list command {program!r} timed out ({timeout_s:g} s)"
        ) from None
    if done.returncode != 0:
        raise PermanentError(
            f"backup-list command {program!r} exited {done.returncode} (its output is not"
            " quoted: run it by hand)"
        )
    newest = newest_stamp(done.stdout)
    age = (datetime.now(UTC) - newest).total_seconds() if newest else None
    return BaseBackups(
        command=program,
        lines=len([line for line in done.stdout.splitlines() if line.strip()]),
        newest=newest,
        newest_age_s=None if age is None else round(max(0.0, age), 1),
    )
