"""What every runbook shares: the audit tags, the report artifact, and
the last check before acting (is the alert that started the run still firing?)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from prefect.states import Running

from tasks.alerts import alert_status
from tasks.errors import RunbookError
from tasks.run_tags import parse_run_tags, runbook_tag, source_tag


def _end_expired_pause() -> None:
    """Take the run out of its expired pause, as a resume would, so it can report and end.

    Prefect's server refuses every transition out of a pause whose timeout has passed and
    fails the run ("never resumed") instead, whatever the flow then does. A timed-out approval
    is a refusal, not a failure of the runbook: the run goes on (Running, forced past that
    rule) to write its report and end as the flow decides.
    """
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(ctx.flow_run.id, Running(), force=True)


def run_source() -> str:
    """How this run started: `alert`, `schedule`, `ui` (a deployment run) or `local`."""
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return "local"
    run = ctx.flow_run
    tags = parse_run_tags(set(run.tags or []))
    if tags.from_alert:
        return "alert"
    # A run another runbook started (pool-threshold's remediation) carries its trigger's
    # source from creation: keep it rather than add a second `source:` tag.
    declared = sorted(tags.sources)
    if declared:
        return declared[0]
    if run.auto_scheduled:
        return "schedule"
    return "ui" if run.deployment_id else "local"


def run_link(run_id: object) -> str:
    """The run's page in the Prefect UI (absolute when the UI's address is known)."""
    from prefect.settings import get_current_settings

    base = get_current_settings().ui_url
    return f"{str(base).rstrip('/') if base else ''}/runs/flow-run/{run_id}"


def tag_run(runbook: str) -> str:
    """Add `runbook:<name>` and `source:<how>` tags to the current run; returns the source."""
    source = run_source()
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return source
    wanted = {runbook_tag(runbook), source_tag(source)}
    current = set(ctx.flow_run.tags or [])
    if not wanted <= current:
        with get_client(sync_client=True) as client:
            client.update_flow_run(ctx.flow_run.id, tags=sorted(current | wanted))
    return source


def _artifact_key(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100]


@dataclass
class Report:
    """A markdown audit record built section by section and published once per run."""

    runbook: str
    title: str
    sections: list[str] = field(default_factory=list)

    def add(self, heading: str, body: str) -> None:
        self.sections.append(f"## {heading}\n\n{body.strip()}\n")

    def markdown(self) -> str:
        ctx = FlowRunContext.get()
        run = ctx.flow_run if ctx else None
        who = f"run `{run.name}` ({run_source()})" if run else "local run"
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        head = f"# {self.title}\n\n_{self.runbook} · {who} · {stamp}_\n"
        return "\n".join([head, *self.sections])

    def publish(self, description: str) -> str:
        """Create the run's markdown artifact (keyed by runbook, so history groups)."""
        text = self.markdown()
        create_markdown_artifact(
            key=_artifact_key(self.runbook), markdown=text, description=description
        )
        return text


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+!|~&])")
#: What opens a block at the start of a line: a list item ("- x", "1. x", "2) x") or a rule
#: ("---", "- - -"). Escaped there only: "-5", "0.54" or "v1.2" elsewhere read as written.
_MD_BLOCK_START = re.compile(r"^(?:-(?=\s|$)|-(?=[- ]*$)|\d{1,9}(?=[.)](?:\s|$)))")


def md_escape(value: object) -> str:
    """Text from outside (alert labels, role names, query text) as inert markdown, one line."""
    text = _MD_SPECIAL.sub(r"\\\1", " ".join(str(value).split()))
    # The & too (above): "&amp;" must not render as "&".
    return _MD_BLOCK_START.sub(_escape_block_start, text)


def _escape_block_start(match: re.Match[str]) -> str:
    """A leading `-` becomes `\\-`; the `1` of `1. x` becomes `1\\`, escaping the `.`."""
    return "\\-" if match[0] == "-" else match[0] + "\\"


def md_code(value: object) -> str:
    """Text from outside shown verbatim as one inline code span (a command, a host name):
    never markdown, and a backtick inside cannot close it (the fence is longer)."""
    text = " ".join(str(value).split())
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if longest else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], cell_limit: int = 200) -> str:
    """A markdown table; cells are escaped so a label or query text cannot break the layout."""

    def cell(value: object) -> str:
        return md_escape(str(value)[:cell_limit])

    if not rows:
        return "_none_"
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def failure_text(exc: BaseException) -> str:
    """An exception for the audit report: our own errors' messages, others by type only."""
    # RunbookError messages are written secret-free; a library's text may quote anything.
    if isinstance(exc, RunbookError):
        return f"{type(exc).__name__}: {md_escape(str(exc)[:500])}"
    return f"{type(exc).__name__} (details in the run's logs)"


@contextmanager
def publish_on_exit(report: Report, summary: Callable[[], str]) -> Iterator[Report]:
    """Publish `report` when the block ends however it ends: return, refusal or exception.

    On an exception a "Failed" section names it, the artifact is still written, and the
    exception goes on. `summary()` gives the artifact description on a normal exit.
    """
    failure: BaseException | None = None
    try:
        yield report
    except BaseException as exc:
        failure = exc
        report.add("Failed", f"The run stopped with **{failure_text(exc)}**.")
        raise
    finally:
        description = (
            summary() if failure is None else f"{report.runbook}: failed ({type(failure).__name__})"
        )
        try:
            report.publish(description)
        except Exception:  # noqa: BLE001 - the report must never hide the run's own outcome
            get_run_logger().exception("could not publish the %s report", report.runbook)


_T = TypeVar("_T")


class Unavailable:
    """A check whose source failed: the reason, safe for the report."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Unavailable({self.reason!r})"


def collect(fut: PrefectFuture[_T]) -> _T | Unavailable:
    """The task's result, or why it failed (never raises: one source down is one row)."""
    fut.wait()
    state = fut.state
    if state.is_completed():
        return fut.result()
    exc: Any = state.result(raise_on_failure=False)
    if isinstance(exc, BaseException):
        return Unavailable(failure_text(exc))
    return Unavailable(f"{state.name}: no result")


def run_alert() -> tuple[str, str] | None:
    """The alert that started this run, `(fingerprint, alertname)`, from its tags; or None."""
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return None
    tags = parse_run_tags(ctx.flow_run.tags)
    if not tags.from_alert:
        return None
    return (tags.alert, tags.alertname or "") if tags.alert is not None else None


def alert_resolved(report: Report) -> str | None:
    """Right before acting: None to go on, or why not (the run's alert has resolved).

    Runs not started by an alert always go on. An alert whose state is unknown (no source
    configured or reachable) does not stop the run: its own measurements still gate the
    action. Either way the report says what was asked and what came back.
    """
    alert = run_alert()
    if alert is None:
        return None
    fingerprint, alertname = alert
    status = alert_status(fingerprint, alertname)
    report.add(
        "Alert still firing?",
        f"Alert {md_code(fingerprint)} ({md_escape(alertname) or 'unnamed'}): "
        f"**{status.state}** (source: {status.source}"
        + (f"; {md_escape(status.detail)}" if status.detail else "")
        + ")",
    )
    if status.state != "resolved":
        return None
    return f"the alert that started this run ({fingerprint}) has resolved: nothing changed"
