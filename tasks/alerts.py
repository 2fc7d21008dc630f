"""Is the alert that started this run still firing? Asked right before a run acts.

A run started by an alert may wait (for an approval, or behind another run on the same
target); by the time it may act, the alert may have resolved, and acting on a resolved
alert can only make things worse. Two sources, in order:

1. Alertmanager's API, `GET /api/v2/alerts?filter=alertname="…"`: it lists the alerts that
   have not resolved (active, silenced or inhibited alike); ours is found by fingerprint.
2. Otherwise the receiver's record (`GET /alerts/{fingerprint}`): the state of the alert's
   latest occurrence (greatest startsAt), which the receiver records for every firing and
   resolved notification, also those that started no run (a re-fire within the cooldown).
   A run started by an earlier occurrence therefore goes on while the alert fires again,
   and a late resolve of an earlier occurrence does not stop it.

Neither configured or reachable: "unknown", which the runbook records and does not treat as
"resolved" (its own measurements still gate the action).
"""

from __future__ import annotations

import re
from typing import Literal

import httpx
from prefect import task
from pydantic import BaseModel, SecretStr

from tasks.settings import AlertSourceSettings

AlertState = Literal["firing", "resolved", "unknown"]
#: What Alertmanager fingerprints look like (hex); anything else is never sent anywhere.
FINGERPRINT = re.compile(r"^[0-9a-zA-Z]{1,64}$")
_LABEL_VALUE_BAD = re.compile(r'["\\\n]')


class AlertStatus(BaseModel):
    """The answer, and where it came from (for the audit)."""

    state: AlertState
    source: Literal["alertmanager", "receiver", "none"]
    detail: str = ""


def _headers(token: SecretStr | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}


def _from_alertmanager(fingerprint: str, alertname: str, s: AlertSourceSettings) -> AlertStatus:
    assert s.alertmanager_url is not None
    params = {"filter": f'alertname="{alertname}"'} if alertname else {}
    response = httpx.get(
        s.alertmanager_url.rstrip("/") + "/api/v2/alerts",
        params=params,
        headers=_headers(s.alertmanager_token),
        timeout=s.timeout_s,
    )
    response.raise_for_status()
    for alert in response.json():
        if alert.get("fingerprint") == fingerprint:
            state = (alert.get("status") or {}).get("state", "active")
            return AlertStatus(state="firing", source="alertmanager", detail=f"{state}")
    return AlertStatus(
        state="resolved", source="alertmanager", detail="no longer listed by Alertmanager"
    )


def _from_receiver(fingerprint: str, s: AlertSourceSettings) -> AlertStatus:
    assert s.receiver_url is not None
    response = httpx.get(
        s.receiver_url.rstrip("/") + f"/alerts/{fingerprint}",
        headers=_headers(s.receiver_token),
        timeout=s.timeout_s,
    )
    response.raise_for_status()
    body = response.json()
    state = body.get("state")
    if state not in ("firing", "resolved", "unknown"):
        return AlertStatus(state="unknown", source="receiver", detail="unexpected answer")
    return AlertStatus(state=state, source="receiver", detail=str(body.get("detail", ""))[:200])


@task(task_run_name="alert-status-{fingerprint}")
def alert_status(fingerprint: str, alertname: str = "") -> AlertStatus:
    """Whether an alert (by fingerprint) still fires; never raises, "unknown" when unsure."""
    if not FINGERPRINT.match(fingerprint) or _LABEL_VALUE_BAD.search(alertname):
        return AlertStatus(state="unknown", source="none", detail="not an alert fingerprint")
    settings = AlertSourceSettings()
    tried: list[str] = []
    for source in ("alertmanager", "receiver"):
        if getattr(settings, f"{source}_url") is None:
            continue
        try:
            if source == "alertmanager":
                return _from_alertmanager(fingerprint, alertname, settings)
            return _from_receiver(fingerprint, settings)
        except (httpx.HTTPError, ValueError) as exc:
            # Status codes and exception names only: URLs and tokens stay out of the audit.
            code = getattr(getattr(exc, "response", None), "status_code", None)
            tried.append(f"{source}: {f'HTTP {code}' if code else type(exc).__name__}")
    detail = "; ".join(tried) if tried else "no alert source configured"
    return AlertStatus(state="unknown", source="none", detail=detail)
