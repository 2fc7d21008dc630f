"""What the release drill runs beside the harness: the sandbox platform, the pages' sinks, the link.

The platform is the one `make demo` starts (`tests.fixtures.platform.running_platform`:
the sandbox backend following Deployment `akig-backend` on the test Kubernetes control
plane and its fake kubelet), with its database on the drill's private cluster. The on-call's
pages reach local sinks (`tests.fixtures.sinks.Sink`, the shapes of PagerDuty, Slack and a
plain webhook) through Prefect notification blocks saved under the default contacts' names,
so the default approvers rule (`*`/`*` → the on-call chain) applies unchanged (another
drill's contacts file, when one is in the run, names the blocks instead). The drill then
opens the on-call's Approve link and confirms, as the on-call would in a browser.
"""

from __future__ import annotations

import contextlib
import html
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx

from drills.timeline import DrillFailed
from tests.fixtures.kube import missing_reason
from tests.fixtures.platform import Platform, running_platform
from tests.fixtures.sinks import Kind, Sink, Sinks

#: A link as pages carry it: `Approve: <base>/approvals/<body>.<mac>`.
APPROVE = re.compile(r"Approve: (http://[\w.:-]+/approvals/[\w-]+\.[\w-]+)")


def _kind(block: str) -> Kind:
    """The service shape a default channel block speaks, from its name."""
    if block.endswith("pagerduty"):
        return "pagerduty"
    return "slack" if block.endswith("slack") else "webhook"


@dataclass
class Pages:
    """One local sink per default notification block, by block name (`on-call-pagerduty`)."""

    sinks: Sinks = field(default_factory=Sinks)
    by_block: dict[str, Sink] = field(default_factory=dict)

    def start(self, blocks: list[str]) -> None:
        """A sink per block not yet served, each of the shape the block's name says."""
        for block in blocks:
            if block not in self.by_block:
                self.by_block[block] = getattr(self.sinks, _kind(block))()

    def save_blocks(self, api_url: str) -> None:
        """Save each block in the drill's Prefect, pointing at its sink."""
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            for block, sink in self.by_block.items():
                sink.save_block(block)

    def approve_link(self, block: str) -> str | None:
        """The Approve link of the first approval page `block`'s sink received, or None."""
        for body in list(self.by_block[block].delivered):
            found = APPROVE.search(str(body).replace("\\n", "\n"))
            if found:
                return found.group(1)
        return None

    def stop(self) -> None:
        """Every sink down."""
        for sink in self.sinks.started:
            sink.stop()


def channel_blocks(env: dict[str, str]) -> tuple[list[str], str]:
    """The blocks the stack's contacts page through, and the on-call's first one.

    The contacts are the stack's: the defaults, or the file another drill of the same run
    names (`RUNBOOKS_ESCALATION_CONFIG_FILE`, the cert drill's); its blocks are pointed at
    this drill's sinks while it runs (the drills run one after another).
    """
    from tasks.contacts import EscalationSettings, load_config

    file = env.get("RUNBOOKS_ESCALATION_CONFIG_FILE")
    settings = EscalationSettings(config_file=Path(file) if file else None)
    config = load_config(settings)
    refs = {ref for c in config.contacts.values() for ref in c.channels}
    refs.add(settings.last_resort_block)
    on_call = config.contacts["on-call"].channels[0].split("/", 1)[1]
    return sorted(ref.split("/", 1)[1] for ref in refs), on_call


@contextlib.contextmanager
def platform_and_pages(admin_dsn: str) -> Iterator[tuple[Platform, Pages]]:
    """The platform (database through `admin_dsn`) and the sinks; stopped and removed after."""
    reason = missing_reason()
    if reason:  # without it the platform has no Deployment to roll out
        raise RuntimeError(
            f"drill release needs the Kubernetes test binaries (make kube): {reason}"
        )
    pages = Pages()
    try:
        # Few connections: every /metrics scrape reads the payments queue through the
        # pool, which then keeps them all open, and the pool drill fills the same cluster.
        with running_platform(kube=True, admin_dsn=admin_dsn, db_pool_size=3) as platform:
            yield platform, pages
    finally:
        pages.stop()


@dataclass(frozen=True)
class Followed:
    """What following the link showed: the page's plan, and the confirm's answer."""

    plan: list[str]
    outcome: str
    answered_with: str


def follow_link(link: str, reason: str, expect_in_plan: str) -> Followed:
    """GET the page, check its plan, POST its confirm form with `reason`, as a browser does."""
    with httpx.Client(timeout=30, follow_redirects=True) as client:
        page = client.get(link)
        if page.status_code != 200:
            raise DrillFailed("approval", f"the link's page answered {page.status_code}")
        plan = _plan(page.text)
        if not any(expect_in_plan in line for line in plan):
            raise DrillFailed("approval", f"the page's plan lacks {expect_in_plan!r}: {plan}")
        form = _form(page.text)
        action = urljoin(link, form.pop("action"))
        answer = client.post(action, data={**form, "reason": reason})
    title = _title(answer.text)
    if answer.status_code != 200 or title != "Decision recorded":
        raise DrillFailed("approval", f"the confirm answered {answer.status_code}: {title}")
    return Followed(plan, title, _text(answer.text))


def _title(page: str) -> str:
    found = re.search(r"<title>(.*?)</title>", page, re.S)
    return html.unescape(found.group(1)) if found else ""


def _plan(page: str) -> list[str]:
    """The items of the list under "The plan"."""
    found = re.search(r"<h2>The plan</h2><ul>(.*?)</ul>", page, re.S)
    items = re.findall(r"<li>(.*?)</li>", found.group(1), re.S) if found else []
    return [html.unescape(i) for i in items]


def _form(page: str) -> dict[str, Any]:
    """The confirm form's action and hidden fields."""
    action = re.search(r'<form method="post" action="([^"]*)"', page)
    if action is None:
        raise DrillFailed("approval", "the link's page has no confirm form")
    hidden = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page)
    return {"action": html.unescape(action.group(1))} | {k: html.unescape(v) for k, v in hidden}


def _text(page: str) -> str:
    """The page's paragraph text, for the drill's log."""
    found = re.search(r"<p>(.*?)</p>", page, re.S)
    return html.unescape(found.group(1)) if found else ""
