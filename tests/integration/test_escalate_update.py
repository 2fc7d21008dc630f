"""Follow-ups on an incident already paged (`escalate_update`): each reason pages the first
level once; a re-run of the same update reaches nobody; a new reason pages again."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from prefect import flow

from flows.escalate import EscalationOutcome, escalate_incident, escalate_update

pytestmark = pytest.mark.usefixtures("prefect_api")


@flow(name="payments-update-probe")
def _runbook(incident: str, reasons: list[str]) -> list[EscalationOutcome | None]:
    """A runbook-like flow: the first page, then follow-ups on the same incident (the test
    world sends topic payments to `incidents`)."""
    first = escalate_incident("critical", "payments", "payments failing", incident_key=incident)
    return [first] + [
        escalate_update(r, "payments", f"follow-up: {r}", incident_key=incident) for r in reasons
    ]


def test_each_follow_up_pages_once_and_never_again_on_a_re_run(world_env: Any) -> None:
    world = world_env()
    incident = f"inc-{uuid.uuid4().hex[:12]}"
    first = _runbook(incident, ["rto-at-risk"])
    assert all(o is not None for o in first)
    after_first = world.counts()
    assert after_first["incidents"] == 2 and after_first["on-call"] == 2  # page + update
    # A second escalate at the same severity would reach nobody: the update did.
    again = _runbook(incident, ["rto-at-risk", "reconciliation-anomaly"])
    counts = world.counts()
    assert counts["incidents"] == 3 and counts["on-call"] == 3  # only the new reason
    first_again, same_update, new_update = again
    assert first_again is not None and all(d.repeated for d in first_again.deliveries)
    assert same_update is not None and all(d.repeated for d in same_update.deliveries)
    assert new_update is not None and not any(d.repeated for d in new_update.deliveries)
    text = str(world.sink["incidents"].delivered[-1])
    assert "reconciliation-anomaly" in text and incident in text
