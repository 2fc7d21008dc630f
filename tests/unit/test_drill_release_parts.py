"""The release drill's pieces: a target less the approval wait, the page and link it follows."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import yaml

from drills.__main__ import DRILLS, summary
from drills.base import Outcome
from drills.monitoring import _prometheus_config
from drills.release import BadRelease
from drills.release_parts import APPROVE, Pages, _form, _kind, _plan, channel_blocks
from drills.timeline import Step, Target, Timeline
from tests.fixtures.sinks import CONTACTS

T0 = datetime(2026, 12, 6, 3, 0, tzinfo=UTC)
STEPS = (
    Step("fault injected"),
    Step("page received", ("fault injected",)),
    Step("approval", ("page received",)),
    Step("verify passed", ("approval",)),
)
LESS = Target("recovered, less the wait", "fault injected", "verify passed", 30.0,
              less=("page received", "approval"))  # fmt: skip


def timeline(**seconds: float) -> Timeline:
    tl = Timeline(STEPS)
    for step, s in seconds.items():
        tl.mark(step.replace("_", " "), T0 + timedelta(seconds=s), "test")
    return tl


def test_a_target_less_the_approval_wait_leaves_the_wait_out() -> None:
    tl = timeline(fault_injected=0, page_received=10, approval=130, verify_passed=145)
    assert tl.between("fault injected", "verify passed") == 145
    assert tl.took(LESS) == 25
    assert tl.met(LESS) is True
    assert tl.took(Target("plain", "fault injected", "verify passed", 30.0)) == 145


def test_a_target_whose_wait_was_not_seen_is_not_reached() -> None:
    tl = timeline(fault_injected=0, page_received=10, verify_passed=145)
    assert tl.took(LESS) is None
    assert tl.met(LESS) is None


def test_the_summary_shows_the_figure_less_the_wait() -> None:
    drill = BadRelease()
    tl = Timeline(drill.steps)
    for step, s in [("fault injected", 0), ("page received", 14), ("approval", 74),
                    ("verify passed", 100)]:  # fmt: skip
        tl.mark(step, T0 + timedelta(seconds=s), "test")
    table = summary([Outcome("release", tl, drill.targets)], {"release": drill})
    assert "100.00 s" in table  # the MTTR, the wait included
    assert "(40.00 s)" in table and "met" in table.splitlines()[1]


def test_release_is_registered_beside_pool() -> None:
    assert DRILLS["release"] is BadRelease and "pool" in DRILLS
    assert BadRelease.holds == {"HighErrorRate": "1s"}


def test_prometheus_scrapes_the_backend_beside_postgres(tmp_path: Path) -> None:
    drill = BadRelease()
    drill.platform = cast(Any, SimpleNamespace(backend=SimpleNamespace(url="http://127.0.0.1:2")))
    drill.pages = Pages()
    jobs = drill.scrape(cast(Any, None), contextlib.ExitStack())
    path = _prometheus_config(tmp_path, tmp_path / "r.yml", ["127.0.0.1:1"], "a", "1s", jobs)
    config = yaml.safe_load(path.read_text())
    got = {c["job_name"]: c["static_configs"][0]["targets"] for c in config["scrape_configs"]}
    assert got == {"postgres": ["127.0.0.1:1"], "akig-backend": ["127.0.0.1:2"]}


def test_every_default_channel_gets_a_sink_of_its_shape() -> None:
    blocks, on_call = channel_blocks({})
    assert {"on-call-pagerduty", "on-call-slack", "team-lead-slack", "last-resort"} <= set(blocks)
    assert on_call == "on-call-pagerduty"
    assert [_kind(b) for b in ("on-call-pagerduty", "db-team-slack", "tickets")] == [
        "pagerduty",
        "slack",
        "webhook",
    ]


def test_another_drills_contacts_file_names_the_blocks(tmp_path: Path) -> None:
    """The cert drill's contacts (`test-*` blocks): the on-call's page is looked for there."""
    names = [n for n in CONTACTS if n != "on-call-slack"]  # as `World` writes it
    contacts = {n: {"channels": [f"custom-webhook/test-{n}"]} for n in names}
    contacts["on-call"]["channels"].append("custom-webhook/test-on-call-slack")
    file = tmp_path / "escalation.yaml"
    topics = {"database": "db-team", "security": "security-team"}
    file.write_text(yaml.safe_dump({"contacts": contacts, "topics": topics}))
    blocks, on_call = channel_blocks({"RUNBOOKS_ESCALATION_CONFIG_FILE": str(file)})
    assert on_call == "test-on-call"
    assert {"test-on-call", "test-on-call-slack", "test-team-lead"} <= set(blocks)
    assert "on-call-pagerduty" not in blocks


PAGE = (
    "<html><head><title>Approve high-error-rate?</title></head><body>"
    "<h2>The plan</h2><ul><li>D: rollback deployment/akig-backend in default: "
    "roll back from revision 2 (…:v2) to revision 1 (…:v1)</li></ul>"
    '<form method="post" action="../approvals">'
    '<input type="hidden" name="token" value="abc.d&#x27;ef">'
    '<textarea id="reason" name="reason"></textarea></form></body></html>'
)


def test_the_page_is_read_as_the_on_call_reads_it() -> None:
    assert _plan(PAGE) == [
        "D: rollback deployment/akig-backend in default: "
        "roll back from revision 2 (…:v2) to revision 1 (…:v1)"
    ]
    assert _form(PAGE) == {"action": "../approvals", "token": "abc.d'ef"}


def test_the_approve_link_is_taken_from_the_on_calls_page_only() -> None:
    pages = Pages()
    pages.start(["on-call-pagerduty", "team-lead-slack"])
    try:
        link = "http://127.0.0.1:9095/approvals/eyJh_b-c.MAC-_1"
        body = {"payload": {"custom_details": {"text": f"Plan…\nApprove: {link}\nRefuse: x"}}}
        sink = pages.by_block["on-call-pagerduty"]
        assert pages.approve_link("on-call-pagerduty") is None
        from tests.fixtures.sinks import Request

        sink.requests.append(Request("/v2/enqueue", body, True, 202))
        assert pages.approve_link("on-call-pagerduty") == link
        assert pages.approve_link("team-lead-slack") is None
        assert APPROVE.search(f"Approve: {link}")
    finally:
        pages.stop()
