"""`make drill release` as a test: the real harness and platform, the link followed, the undo.

Asserts that every step was seen in order (the page before the approval, the approval
before the undo), that the run that paused is the one that undid the rollout (the drill
fails otherwise), the post-incident record's figures, that neither the receiver's token nor
an approval link is printed, and that nothing is left running or on disk (the drill's
folder, the platform's Kubernetes folder). Timings are the drill's to print, not asserted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from drills.base import Context
from drills.release import STEPS, BadRelease
from tests.fixtures.drills import left_behind, run_one
from tests.fixtures.kube import missing_reason

pytestmark = pytest.mark.timeout(400)


class Recording(BadRelease):
    """The release drill, keeping the settings it gave the stack (where its platform is)."""

    env: dict[str, str]

    def stack_env(self, ctx: Context) -> dict[str, str]:
        self.env = super().stack_env(ctx)
        return self.env


def test_release_drill_is_approved_by_link_undone_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    drill = Recording()
    ran = run_one(drill, monkeypatch, missing=missing_reason())
    outcome, said, printed = ran.outcome, ran.said, ran.printed
    assert "/approvals/" not in printed  # a link (its signed token) is never printed

    assert outcome.ok, f"failed at {outcome.failed_step}: {outcome.error}"
    tl = outcome.timeline
    assert tl.missing() == []
    assert tl.out_of_order() == []
    order = [s.name for s in sorted(STEPS, key=lambda s: tl.marks[s.name].at)]
    assert order[:8] == [s.name for s in STEPS[:8]]
    assert tl.marks["approval"].detail == "Decision recorded"
    assert tl.marks["action done"].detail.startswith("apply-rollback-")
    assert any("rollback deployment/akig-backend" in s and "Approve by on-call" in s for s in said)
    assert tl.met(drill.targets[0]) is not None
    record: dict[str, Any] = outcome.record
    assert record["recovered"] is True
    assert 0 < record["first_action_s"] < record["recovery_s"]

    workdir = ran.workdir
    kubeconfig = Path(drill.env["RUNBOOKS_K8S_KUBECONFIG"])
    platform = next(p for p in kubeconfig.parents if p.name.startswith("runbooks-platform-"))
    for gone in (workdir, str(platform)):
        assert not Path(gone).exists()
        assert left_behind(gone) == []
