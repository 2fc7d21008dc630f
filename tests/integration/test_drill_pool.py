"""`make drill pool` as a test: the real harness, the leak, the alert, the runbook, recovery.

Asserts the order of the timeline (every step seen, none before its cause), that exactly the
leaked sessions were terminated (the drill checks every leaked and decoy pid and fails at
`action done` otherwise), the post-incident record's figures, and that nothing is left
running or on disk. Timings are the drill's to print (`make drill`), not asserted here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from drills.pool import STEPS, PoolExhaustion
from tests.fixtures.drills import left_behind, run_one

pytestmark = pytest.mark.timeout(300)


def test_pool_drill_recovers_in_order_and_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    drill = PoolExhaustion()
    ran = run_one(drill, monkeypatch)
    outcome, said = ran.outcome, ran.said

    assert outcome.ok, f"failed at {outcome.failed_step}: {outcome.error}"
    tl = outcome.timeline
    assert tl.missing() == []
    assert tl.out_of_order() == []
    order = [s.name for s in sorted(STEPS, key=lambda s: tl.marks[s.name].at)]
    assert order[:5] == [
        "fault injected",
        "alert firing",
        "webhook received",
        "first task",
        "action done",
    ]
    assert set(order[5:]) == {"verify passed", "alert resolved"}
    assert tl.marks["action done"].detail.startswith("terminate-sessions-")
    assert outcome.record["recovered"] is True
    assert outcome.record["started_by"] == "alert startsAt"
    assert 0 < outcome.record["first_action_s"] < outcome.record["recovery_s"]
    assert any("scrape every 1 s, rule evaluation every 1 s" in s for s in said)

    workdir = ran.workdir
    assert not Path(workdir).exists()
    assert left_behind(workdir) == []
