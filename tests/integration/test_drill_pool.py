"""`make drill pool` as a test: the real harness, the leak, the alert, the runbook, recovery.

Asserts the order of the timeline (every step seen, none before its cause), that exactly the
leaked sessions were terminated (the drill checks every leaked and decoy pid and fails at
`action done` otherwise), the post-incident record's figures, and that nothing is left
running or on disk. Timings are the drill's to print (`make drill`), not asserted here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import drills.stack
from drills.__main__ import report
from drills.harness import run_drills
from drills.monitoring import missing_binaries
from drills.pool import STEPS, PoolExhaustion

pytestmark = pytest.mark.timeout(300)


def _cmdlines() -> list[str]:
    lines = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                lines.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                continue  # ended meanwhile
    return lines


def test_pool_drill_recovers_in_order_and_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    reason = missing_binaries()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    token = "drill-receiver-token-" + os.urandom(8).hex()
    monkeypatch.setattr(drills.stack, "new_token", lambda: token)
    said: list[str] = []
    drill = PoolExhaustion()
    [outcome] = run_drills([drill], say=said.append)
    printed = "\n".join([*said, report(outcome, drill.mttr)])
    assert token not in printed  # the receiver's bearer token is never printed

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

    workdir = next(s for s in said if s.startswith("drill: working in ")).split()[3]
    assert not Path(workdir).exists()
    assert [c for c in _cmdlines() if workdir in c] == []
