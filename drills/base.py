"""What a drill is: a fault to inject, the steps to observe, what to clean up.

A drill declares its steps and targets, the route it adds to the drill routing file, the
alert holds it drills with and the settings the stack needs; the harness (`drills.harness`)
starts everything once and runs `inject` → `observe` → `cleanup` for each drill.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drills.monitoring import Monitoring
from drills.pg_cluster import PrivateCluster
from drills.stack import Stack
from drills.timeline import Step, Target, Timeline


@dataclass
class Context:
    """What the harness started, as drills see it."""

    workdir: Path
    cluster: PrivateCluster
    exporter_target: str
    say: Callable[[str], None] = print
    stack: Stack | None = None
    monitoring: Monitoring | None = None
    #: Prometheus's port, chosen before the stack starts (its runbooks query it).
    prometheus_port: int = 0
    #: The drills' settings the stack runs with, merged (what the runbooks see).
    env: dict[str, str] = field(default_factory=dict)

    @property
    def prometheus_url(self) -> str:
        """Where the drill Prometheus answers (once the monitoring is up)."""
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def running(self) -> tuple[Stack, Monitoring]:
        """The stack and the monitoring (started before any drill injects)."""
        assert self.stack is not None and self.monitoring is not None
        return self.stack, self.monitoring


@dataclass
class Outcome:
    """One drill's result: its timeline, the post-incident figures, the failure if any."""

    name: str
    timeline: Timeline
    targets: tuple[Target, ...]
    error: str | None = None
    failed_step: str | None = None
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """The drill saw every step it waited for."""
        return self.error is None


class Drill(ABC):
    """One game-day scenario."""

    name: str
    title: str
    steps: tuple[Step, ...]
    targets: tuple[Target, ...]
    #: The step from which the time to recovery (MTTR) is counted, and where it ends.
    mttr: tuple[str, str]
    #: alertname → the `for:` hold this drill runs the shipped rule with.
    holds: dict[str, str] = {}
    #: Extra server settings of the drill PostgreSQL cluster.
    pg_settings: dict[str, str] = {}
    #: Programs this drill needs beyond the harness's (`make drill` exits 2 without them).
    binaries: tuple[str, ...] = ()

    def stack_env(self, ctx: Context) -> dict[str, str]:
        """`RUNBOOKS_*` settings the served runbooks need for this drill."""
        return {}

    def parts(self, ctx: Context) -> contextlib.AbstractContextManager[object]:
        """What the drill runs for the whole harness (a platform); stopped on every path."""
        return contextlib.nullcontext()

    def prepare(self, ctx: Context) -> None:  # noqa: B027 (optional hook)
        """Create what the drill works on (databases, roles) before the stack starts."""

    def scrape(self, ctx: Context, parts: contextlib.ExitStack) -> list[dict[str, Any]]:
        """Start the exporters the drill needs (entered on `parts`, stopped with the
        harness); their Prometheus scrape jobs. Called after the stack, before Prometheus."""
        return []

    @abstractmethod
    def routes(self, ctx: Context) -> list[dict[str, Any]]:
        """The drill's rows of the drill routing file."""

    @abstractmethod
    def inject(self, ctx: Context, timeline: Timeline) -> None:
        """Cause the fault; marks the first step."""

    @abstractmethod
    def observe(self, ctx: Context, timeline: Timeline, outcome: Outcome) -> None:
        """Wait for and mark every other step; raise DrillFailed at the first one missing."""

    @abstractmethod
    def cleanup(self, ctx: Context) -> None:
        """Undo the fault's leftovers (sessions, files); never raises for what is gone."""
