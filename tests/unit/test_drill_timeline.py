"""The drill timeline: partial order, targets, and how a failing drill names its step."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from drills.base import Context, Drill, Outcome
from drills.harness import run_one
from drills.pg_cluster import PrivateCluster
from drills.timeline import DrillFailed, Step, Target, Timeline

T0 = datetime(2026, 12, 6, 3, 0, tzinfo=UTC)
STEPS = (
    Step("fault injected"),
    Step("alert firing", ("fault injected",)),
    Step("action done", ("alert firing",)),
    Step("verify passed", ("action done",)),
    Step("alert resolved", ("action done",)),
)
TARGET = Target("fault → recovered", "fault injected", "verify passed", 10.0)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_a_resolve_before_the_verification_is_in_order() -> None:
    tl = Timeline(STEPS)
    for step, s in [
        ("fault injected", 0),
        ("alert firing", 1),
        ("action done", 4),
        ("alert resolved", 4.5),
        ("verify passed", 5),
    ]:
        tl.mark(step, at(s), "test")
    assert tl.out_of_order() == []
    assert tl.missing() == []
    assert tl.between("fault injected", "verify passed") == 5
    assert tl.met(TARGET) is True


def test_a_step_before_its_cause_is_out_of_order() -> None:
    tl = Timeline(STEPS)
    tl.mark("fault injected", at(0), "test")
    tl.mark("alert firing", at(2), "test")
    tl.mark("action done", at(1), "test")
    assert tl.out_of_order() == ["action done came before alert firing"]


def test_targets_met_missed_or_not_reached() -> None:
    tl = Timeline(STEPS)
    tl.mark("fault injected", at(0), "test")
    assert tl.met(TARGET) is None
    tl.mark("verify passed", at(12), "test")
    assert tl.met(TARGET) is False
    assert "(not observed)" in tl.render()


def test_marks_must_be_known_steps_with_a_zone() -> None:
    tl = Timeline(STEPS)
    with pytest.raises(ValueError, match="unknown step"):
        tl.mark("lunch", at(0), "test")
    with pytest.raises(ValueError, match="timezone-aware"):
        tl.mark("fault injected", datetime(2026, 1, 1), "test")


class Scripted(Drill):
    """A drill whose `observe` marks the given steps, then raises the given error."""

    name = "scripted"
    title = "scripted"
    steps = STEPS
    targets = (TARGET,)
    mttr = ("fault injected", "verify passed")

    def __init__(self, marks: Sequence[tuple[str, float]], error: Exception | None) -> None:
        self.marks, self.error, self.cleaned = marks, error, False

    def routes(self, ctx: Context) -> list[dict[str, Any]]:
        return []

    def inject(self, ctx: Context, timeline: Timeline) -> None:
        timeline.mark("fault injected", at(0), "test")

    def observe(self, ctx: Context, timeline: Timeline, outcome: Outcome) -> None:
        for step, s in self.marks:
            timeline.mark(step, at(s), "test")
        if self.error:
            raise self.error

    def cleanup(self, ctx: Context) -> None:
        self.cleaned = True


def ctx() -> Context:
    cluster = PrivateCluster(port=1, root=Path("."), data=Path("."), bindir="", run_as=[])
    return Context(Path("."), cluster, "127.0.0.1:1", say=lambda _: None)


def test_a_drill_that_fails_says_at_which_step_and_is_cleaned_up() -> None:
    drill = Scripted([("alert firing", 1)], DrillFailed("action done", "run ended Failed"))
    outcome = run_one(drill, ctx())
    assert (outcome.ok, outcome.failed_step, outcome.error) == (
        False,
        "action done",
        "run ended Failed",
    )
    assert drill.cleaned


def test_an_unexpected_error_is_placed_at_the_first_step_not_seen() -> None:
    drill = Scripted([("alert firing", 1)], ConnectionError("refused"))
    outcome = run_one(drill, ctx())
    assert outcome.failed_step == "action done"
    assert outcome.error == "ConnectionError: refused"
    assert drill.cleaned


def test_steps_seen_out_of_order_fail_the_drill() -> None:
    marks = [("alert firing", 3), ("action done", 2), ("verify passed", 4), ("alert resolved", 5)]
    outcome = run_one(Scripted(marks, None), ctx())
    assert outcome.failed_step == "action done"
    assert outcome.error == "action done came before alert firing"


def test_a_drill_seen_through_is_ok() -> None:
    marks = [("alert firing", 1), ("action done", 3), ("verify passed", 4), ("alert resolved", 5)]
    outcome = run_one(Scripted(marks, None), ctx())
    assert outcome.ok and outcome.timeline.missing() == []
