"""`make drill cert` as a test: the endpoint, the probe, the alert, the run, the page, renewal.

Asserts the timeline's order (every step seen, none before its cause), that the page reached
a sink at the runbook's severity for 2 days left (`high`: team lead, incidents, security
team; nobody paged twice), that the alert resolved on the renewed certificate (the probe
then reads ~90 days, never an endpoint gone), the post-incident record, and that nothing is
left running or on disk. Timings are the drill's to print (`make drill`), not asserted.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from drills.blackbox import BLACKBOX
from drills.cert import STEPS, CertExpiring
from tests.fixtures.drills import left_behind, run_one

pytestmark = pytest.mark.timeout(300)


def test_cert_drill_pages_then_resolves_on_renewal(monkeypatch: pytest.MonkeyPatch) -> None:
    drill = CertExpiring()
    ran = run_one(
        drill, monkeypatch, missing=("" if os.access(BLACKBOX, os.X_OK) else f"no {BLACKBOX}")
    )
    outcome, said, printed = ran.outcome, ran.said, ran.printed
    assert not any(s.secret and s.secret in printed for s in drill.sinks.started)

    assert outcome.ok, f"failed at {outcome.failed_step}: {outcome.error}"
    tl = outcome.timeline
    assert tl.missing() == []
    assert tl.out_of_order() == []
    order = [s.name for s in sorted(STEPS, key=lambda s: tl.marks[s.name].at)]
    assert order == [s.name for s in STEPS]
    assert tl.marks["alert firing"].detail == "warning"
    # Resolved on the renewed certificate, never on a probe that lost the endpoint.
    resolved = tl.marks["alert resolved"].detail
    assert resolved.startswith(("probe now reads 90.", "probe now reads 89.")), resolved
    assert drill.world is not None
    assert drill.world.pages() == {"team-lead": 1, "incidents": 1, "security-team": 1}
    assert any("rule hold: CertificateExpiringInDays{severity=warning} for: 10m" in s for s in said)
    assert outcome.record["started_by"] == "alert startsAt"
    assert outcome.record["first_action_s"] > 0

    workdir = ran.workdir
    assert not Path(workdir).exists()
    assert left_behind(workdir) == []
