"""Alert-storm coalescing in the receiver: which run covers which alerts.

A covered alert's run waits for its handler's run (`handler_run`), then gets a `covered-by`
artifact naming it; the handler gets a `covered-alerts` artifact listing every run tagged
`covered-by:<handler>`, rewritten whenever one more is created.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from deployments.journal import Entry, Journal
from deployments.prefect_runs import PrefectRuns, PrefectUnavailable
from flows.common import md_escape
from tasks.run_tags import covered_by_tag, parse_run_tags

log = logging.getLogger("runbooks.receiver")


@dataclass
class CoveredArtifacts:
    """Writes the `covered-by` and `covered-alerts` artifacts of coalesced runs."""

    runs: PrefectRuns
    #: Handler runs whose `covered-alerts` artifact is to be (re)written, and its id.
    _covered_dirty: set[str] = field(default_factory=set)
    _covered_writers: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _covered_artifacts: dict[str, str] = field(default_factory=dict)

    def mark(
        self,
        handler: str,
        keep: Callable[[asyncio.Task[Any]], asyncio.Task[Any]],
    ) -> None:
        """The handler covers one more run: (re)write its list, in a task held by `keep`."""
        self._covered_dirty.add(handler)
        if handler not in self._covered_writers:
            writer = keep(asyncio.get_running_loop().create_task(self._write_covered(handler)))
            self._covered_writers[handler] = writer

    async def note(self, run_id: str, handler: str) -> None:
        """The covered run's own artifact: which run handles its alert, with a link."""
        text = (
            f"# Covered by run [{handler}](/runs/flow-run/{handler})\n\n"
            "Another alert for the same target started that run within the route's "
            "cooldown: it handles this alert too (alert storm coalescing). This run never "
            "executed; see that run's `covered-alerts` artifact and report."
        )
        try:
            await self.runs.put_markdown(None, run_id, "covered-by", text, f"covered by {handler}")
        except PrefectUnavailable as exc:  # the tag and the state message still say it
            log.warning("covered run %s: artifact not written: %s", run_id, exc)

    async def _write_covered(self, handler: str) -> None:
        """Keep the handler's `covered-alerts` artifact equal to its `covered-by:` runs.

        The list is read back from the tags each time (never accumulated here), and the
        loop runs again whenever a covered run was created meanwhile, so the last write
        always follows the last tag.
        """
        try:
            while handler in self._covered_dirty:
                self._covered_dirty.discard(handler)
                try:
                    runs = await self.runs.runs_tagged(covered_by_tag(handler))
                    text = covered_markdown(handler, runs)
                    self._covered_artifacts[handler] = await self.runs.put_markdown(
                        self._covered_artifacts.get(handler),
                        handler,
                        "covered-alerts",
                        text,
                        f"{len(runs)} alert(s) covered by this run",
                    )
                except PrefectUnavailable as exc:
                    log.warning("covered-alerts of run %s not written yet: %s", handler, exc)
                    self._covered_dirty.add(handler)
                    await asyncio.sleep(1.0)
        finally:
            self._covered_writers.pop(handler, None)


def covered_markdown(handler: str, runs: list[dict[str, Any]]) -> str:
    """The handler's list of the alerts it covers, one row per covered run."""
    rows = []
    for run in runs:
        tags = parse_run_tags(run.get("tags", []))
        rows.append(
            f"| [{run['name']}](/runs/flow-run/{run['id']}) | `{tags.alert or ''}` "
            f"| {md_escape(tags.alertname or '')} | {str(run.get('created', ''))[:19]} |"
        )
    return (
        f"# Alerts covered by this run ({len(runs)})\n\n"
        "Alerts of other fingerprints for the same target, received within the route's "
        "cooldown: recorded as Completed runs tagged "
        f"`{covered_by_tag(handler)}`, never executed.\n\n"
        "| run | alert | alertname | received (UTC) |\n|---|---|---|---|\n" + "\n".join(rows)
    )


async def handler_run(
    entry: Entry,
    inflight: Mapping[str, asyncio.Task[Any]],
    journal: Journal,
    max_age_s: float,
) -> str | None:
    """The run id of the alert covering `entry`, once created; None if it never will be."""
    assert entry.covered_by is not None
    while True:
        creating = inflight.get(entry.covered_by)
        if creating is not None:  # its run is being created here: wait for that, not a poll
            await asyncio.wait([creating])
        record = await asyncio.to_thread(journal.get, entry.covered_by)
        if record is None or record.status in ("failed", "expired", "cancelled"):
            return None
        if record.flow_run_id is not None:
            return record.flow_run_id
        if time.time() - entry.accepted_ts > max_age_s:
            return None
        await asyncio.sleep(0.1)
