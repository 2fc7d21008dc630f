"""The incident slug every security-breach object is named after (folders, policies, backups)."""

from __future__ import annotations

import hashlib
import re

from tasks.errors import PermanentError

#: Longest slug: `runbooks-isolate-<slug>` stays a DNS-1123 label (63 characters).
SLUG_MAX = 40


def incident_slug(incident: str) -> str:
    """A DNS-1123 label for `incident`: lowercased, non-alphanumerics -> '-', at most 40
    characters; a hash of the original is appended when anything was changed, so two
    different incident ids never share a slug."""
    if not incident or not incident.strip():
        raise PermanentError("an incident id is required (the run's incident key)")
    if len(incident) > 500:
        raise PermanentError(f"incident id too long ({len(incident)} characters, at most 500)")
    cleaned = re.sub(r"[^a-z0-9]+", "-", incident.strip().lower()).strip("-")
    if cleaned == incident and len(cleaned) <= SLUG_MAX:
        return cleaned
    digest = hashlib.sha256(incident.encode()).hexdigest()[:8]
    head = cleaned[: SLUG_MAX - 9].strip("-")
    return f"{head}-{digest}" if head else f"incident-{digest}"
