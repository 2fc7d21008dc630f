"""A drill's timeline: each step's moment and source, its order, the targets, the failure.

Every drill declares its steps in order, each with the steps it must not precede (a partial
order: Prometheus may resolve the alert before the runbook's verification ends). Moments are
wall-clock UTC from the component that knows them (Alertmanager's startsAt, the receiver's
journal, Prefect's task runs), so the drill's own polling does not add to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class Step:
    """One step of a drill; `after` lists the steps it cannot come before."""

    name: str
    after: tuple[str, ...] = ()


#: What every drill observes from its fault to its run's first task; each adds its own steps.
ALERT_TO_RUN = (
    Step("fault injected"),
    Step("alert firing", ("fault injected",)),
    Step("webhook received", ("alert firing",)),
    Step("first task", ("webhook received",)),
)


@dataclass(frozen=True)
class Target:
    """A figure the drill must reach: `start` → `end` under `limit_s` seconds.

    `less` is a span (from step, to step) left out of the figure: a human's approval wait.
    """

    label: str
    start: str
    end: str
    limit_s: float
    less: tuple[str, str] | None = None


@dataclass(frozen=True)
class Mark:
    """When a step happened and who said so."""

    at: datetime
    source: str
    detail: str = ""


class DrillFailed(RuntimeError):
    """A drill stopped at `step` (the first step it could not observe)."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"failed at step '{step}': {reason}")
        self.step = step
        self.reason = reason


@dataclass
class Timeline:
    """The marks of one drill run, against its declared steps."""

    steps: tuple[Step, ...]
    marks: dict[str, Mark] = field(default_factory=dict)

    def mark(self, step: str, at: datetime, source: str, detail: str = "") -> None:
        """Record `step` at `at` (timezone-aware), as `source` reports it."""
        if step not in {s.name for s in self.steps}:
            raise ValueError(f"unknown step {step!r}")
        if at.tzinfo is None:
            raise ValueError("timeline moments must be timezone-aware")
        self.marks[step] = Mark(at, source, detail)

    @property
    def t0(self) -> datetime | None:
        """The first step's moment (the fault)."""
        first = self.marks.get(self.steps[0].name)
        return first.at if first else None

    def offset(self, step: str) -> float | None:
        """Seconds from the first step to `step`."""
        mark, t0 = self.marks.get(step), self.t0
        return None if mark is None or t0 is None else (mark.at - t0).total_seconds()

    def between(self, start: str, end: str) -> float | None:
        """Seconds from `start` to `end`, None unless both happened."""
        a, b = self.marks.get(start), self.marks.get(end)
        return None if a is None or b is None else (b.at - a.at).total_seconds()

    def missing(self) -> list[str]:
        """Steps not observed, in order."""
        return [s.name for s in self.steps if s.name not in self.marks]

    def out_of_order(self) -> list[str]:
        """Each observed step that came before a step it must follow."""
        wrong = []
        for step in self.steps:
            mark = self.marks.get(step.name)
            for before in step.after:
                prior = self.marks.get(before)
                if mark and prior and mark.at < prior.at:
                    wrong.append(f"{step.name} came before {before}")
        return wrong

    def took(self, target: Target) -> float | None:
        """The target's figure: `start` → `end`, less its `less` span (None: a step missing)."""
        took = self.between(target.start, target.end)
        if took is None or target.less is None:
            return took
        wait = self.between(*target.less)
        return None if wait is None else took - wait

    def met(self, target: Target) -> bool | None:
        """Whether a target was reached (None: a step of it never happened)."""
        took = self.took(target)
        return None if took is None else took < target.limit_s

    def render(self) -> str:
        """The timeline as aligned text lines: offset, step, moment, source, detail."""
        lines = []
        for step in self.steps:
            mark = self.marks.get(step.name)
            if mark is None:
                lines.append(f"  {'—':>9}  {step.name:<16} (not observed)")
                continue
            off = self.offset(step.name)
            stamp = mark.at.isoformat(timespec="milliseconds")
            extra = f"; {mark.detail}" if mark.detail else ""
            lines.append(f"  {off:>+8.3f}s  {step.name:<16} {stamp}  [{mark.source}{extra}]")
        return "\n".join(lines)
