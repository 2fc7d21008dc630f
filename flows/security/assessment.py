"""Step 3 of `security-breach`: the four assessments as evidence rows (`Check`).

A source that fails is a row "unavailable", never a crash; exfiltration without Prometheus
or queries is "not configured". Secrets are named with their writers, never their values.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from flows.common import Unavailable, collect
from flows.spec import Check, Verdict
from tasks.security.assess import (
    ExfiltrationAssessment,
    ImageDrift,
    LoginAssessment,
    SecretChange,
    SecretChanges,
    assess_logins,
    exfiltration_signals,
    image_drift,
    recent_secret_changes,
)
from tasks.settings import SecuritySettings

SHOWN = 8


class Assessment(BaseModel):
    """The four results (or why each is missing) and their rows."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    logins: LoginAssessment | None = None
    rows: list[Check]

    def flagged_addresses(self) -> list[str]:
        """Source addresses behind a burst or a new login (for the WAF instruction)."""
        if self.logins is None:
            return []
        found = [b.key for b in self.logins.bursts if b.by == "ip"]
        found += [n.ip for n in self.logins.new_ips]
        return list(dict.fromkeys(found))


def _more(items: list[str]) -> str:
    extra = f"; and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return "; ".join(items[:SHOWN]) + extra


def _verdict(flagged: bool) -> Verdict:
    return Verdict.FAIL if flagged else Verdict.PASS


def login_rows(found: LoginAssessment, settings: SecuritySettings) -> list[Check]:
    """Bursts, new source addresses, shared accounts (or why the audit table said nothing)."""
    if not found.ok:
        return [
            Check(
                item="Logins (audit table)",
                observed=found.status,
                verdict=Verdict.UNAVAILABLE,
                detail=found.detail,
            )
        ]
    window = f"{found.window_hours:g} h, table {found.table}"
    return [
        Check(
            item="Failed-login bursts",
            threshold=f">= {settings.failed_login_burst} failed in 5 min (user or address)",
            observed=f"{len(found.bursts)} ({found.failed} failed of {found.logins} logins)",
            verdict=_verdict(bool(found.bursts)),
            detail=_more(
                [f"{b.by} {b.key}: {b.failed} from {b.first:%H:%M:%S}" for b in found.bursts]
            )
            or window,
        ),
        Check(
            item="New source addresses per user",
            threshold="an address not seen for the user before the window",
            observed=str(len(found.new_ips)),
            verdict=_verdict(bool(found.new_ips)),
            detail=_more([f"{n.user} from {n.ip} ({n.logins} login(s))" for n in found.new_ips])
            or window,
        ),
        Check(
            item="Accounts used from many addresses",
            threshold=f">= {settings.many_ips} distinct addresses",
            observed=str(len(found.shared_accounts)),
            verdict=_verdict(bool(found.shared_accounts)),
            detail=_more([f"{s.user}: {s.ips} addresses" for s in found.shared_accounts]) or window,
        ),
    ]


def drift_rows(found: ImageDrift) -> list[Check]:
    """Running digests against the Deployment's spec image."""
    drifted = found.drifted
    return [
        Check(
            item="Image drift",
            threshold="running image = the Deployment's spec image",
            observed=f"{len(drifted)} of {len(found.containers)} container(s) differ",
            verdict=_verdict(bool(drifted)),
            detail=_more([f"{c.pod}/{c.container}: {', '.join(c.drift)}" for c in drifted]),
        )
    ]


def secret_rows(found: SecretChanges) -> list[Check]:
    """Secrets written within the window, with the field managers the API names."""
    theirs = [c for c in found.changed if not c.ours]
    return [
        Check(
            item="Secrets changed recently",
            threshold=f"written within {found.hours:g} h (managedFields)",
            observed=f"{len(theirs)} of {found.total} (+{len(found.changed) - len(theirs)} ours)",
            verdict=_verdict(bool(theirs)),
            detail=_more([_secret_change(c) for c in theirs])
            + (
                " (by: the field manager; the user needs the API server's audit log)"
                if theirs
                else ""
            ),
        )
    ]


def _secret_change(change: SecretChange) -> str:
    """`name at <time> by <manager>`: the latest write and who the API says made it."""
    text = change.name
    if change.last_changed:
        text += f" at {change.last_changed:%Y-%m-%d %H:%M:%S}"
    latest = [m for m in change.managers if m.time is not None and m.time == change.last_changed]
    if latest:
        text += " by " + ", ".join(sorted({m.manager for m in latest}))
    return text


def exfiltration_rows(found: ExfiltrationAssessment) -> list[Check]:
    """Per-user volume against the user's own baseline (a week before)."""
    if found.status != "ok":
        return [
            Check(
                item="Possible exfiltration",
                observed="not configured",
                verdict=Verdict.NOT_CONFIGURED,
                detail=found.detail,
            )
        ]
    return [
        Check(
            item=f"Exfiltration: {s.signal} per user",
            threshold=f"> {found.factor:g}x the user's own baseline (a week before)",
            observed=f"{len(s.flagged)} of {len(s.users)} user(s) flagged",
            verdict=_verdict(bool(s.flagged)),
            detail=_more(
                [
                    f"{u.user}: {u.current:g} vs {u.baseline:g}"
                    if u.baseline is not None
                    else f"{u.user}: {u.current:g} (no baseline)"
                    for u in s.flagged
                ]
            ),
        )
        for s in found.signals
    ]


def _unavailable(item: str, why: Unavailable) -> list[Check]:
    return [
        Check(item=item, observed="unavailable", verdict=Verdict.UNAVAILABLE, detail=why.reason)
    ]


def assess(selector: str, namespace: str) -> Assessment:
    """The four assessments at once (read only); each source failing is its own row."""
    settings = SecuritySettings()
    logins_f = assess_logins.submit()
    drift_f = image_drift.submit(selector, namespace=namespace)
    secrets_f = recent_secret_changes.submit(namespace=namespace)
    exfil_f = exfiltration_signals.submit()
    rows: list[Check] = []
    logins = collect(logins_f)
    if isinstance(logins, Unavailable):
        rows += _unavailable("Logins (audit table)", logins)
    else:
        rows += login_rows(logins, settings)
    drift = collect(drift_f)
    rows += (
        _unavailable("Image drift", drift) if isinstance(drift, Unavailable) else drift_rows(drift)
    )
    changes = collect(secrets_f)
    rows += (
        _unavailable("Secrets changed recently", changes)
        if isinstance(changes, Unavailable)
        else secret_rows(changes)
    )
    exfil = collect(exfil_f)
    rows += (
        _unavailable("Possible exfiltration", exfil)
        if isinstance(exfil, Unavailable)
        else exfiltration_rows(exfil)
    )
    return Assessment(logins=None if isinstance(logins, Unavailable) else logins, rows=rows)
