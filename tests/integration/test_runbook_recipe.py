"""The README's recipe for a new runbook, followed for a throwaway one and run for real.

`tests/fixtures/throwaway_runbook.py` is the flow module (spec + check/plan/act/verify on
the driver), the catalog entry and the route below are the rest of the recipe. The runs act
on a real Redis key through the driver: dry run, nothing to do, auto, approval in the run's
own pause (approved and refused), and a fix that does not hold (failed, published).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.flow_runs import resume_flow_run

from deployments.catalog import Runbook
from deployments.routing import RoutingTable, build_params, validate_routing
from flows.common import Report
from flows.driver import NotFixed, PartlyDone, drive
from flows.driver import Runbook as DriverRunbook
from flows.spec import Action, ActionRecord, RunbookParams, RunbookSpec
from tasks.errors import SafetyViolation
from tests.fixtures.prefect_runs import flow_run_artifacts, wait_for_paused_run
from tests.fixtures.throwaway_runbook import SPEC, StaleFlagParams, read_flag, stale_flag, stale_key

pytestmark = pytest.mark.usefixtures("prefect_api")

#: Step 2 of the recipe: one catalog entry.
ENTRY = Runbook(
    entrypoint="tests.fixtures.throwaway_runbook:stale_flag",
    description="Throwaway: a stale Redis flag, set back.",
    concurrency_limit=None,
)


@pytest.fixture
def key() -> Iterator[str]:
    with stale_key("recipe") as made:
        yield made


def _value(key: str) -> str | None:
    return read_flag(key)


def _history(run_id: uuid.UUID) -> list[StateType]:
    with get_client(sync_client=True) as client:
        return [s.type for s in client.read_flow_run_states(run_id)]


def test_the_catalog_entry_reads_everything_else_from_the_spec() -> None:
    assert ENTRY.spec is SPEC
    assert (ENTRY.name, ENTRY.deployment, ENTRY.dry_run_field) == (
        "stale-flag",
        "stale-flag/stale-flag",
        "dry_run",
    )
    assert ENTRY.params_model() is StaleFlagParams
    assert ENTRY.target_of({"key": "k1"}) == "redis-flag:k1"


def test_a_route_for_it_validates_and_fills_the_request() -> None:
    table = RoutingTable.model_validate(
        {
            "routes": [
                {
                    "alertname": "FlagStale",
                    "runbook": "stale-flag",
                    "mode": "plan",
                    "params": {"key": "${key}"},
                }
            ]
        }
    )
    validate_routing(table, (ENTRY,), "test")
    params = build_params(table.routes[0], ENTRY, {"alertname": "FlagStale", "key": "k9"})
    assert params["key"] == "k9" and params["dry_run"] is True
    assert (params["requested_by"], params["reason"]) == (
        "alertmanager",
        "alert FlagStale on an unnamed target",
    )


def test_dry_run_plans_and_changes_nothing(key: str) -> None:
    out = stale_flag(StaleFlagParams(key=key))
    assert out["outcome"] == "planned"
    assert _value(key) == "stale"


def test_a_healthy_flag_is_nothing_to_do_and_asks_nobody(key: str) -> None:
    redis.Redis(host="127.0.0.1", port=6379).set(key, "ok")
    state = stale_flag(StaleFlagParams(key=key, dry_run=False), return_state=True)
    assert state.result()["outcome"] == "nothing to do"
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    assert StateType.PAUSED not in _history(run_id)


def test_auto_approve_acts_records_the_undo_and_verifies(key: str) -> None:
    state = stale_flag(
        StaleFlagParams(key=key, dry_run=False, auto_approve=True), return_state=True
    )
    out = state.result()
    assert out["outcome"] == "acted"
    assert out["records"][0]["before"] == "stale"
    assert _value(key) == "ok"
    (md,) = flow_run_artifacts(state.state_details.flow_run_id, "stale-flag")
    assert "Undo record" in md and "Re-planned under the lock" in md and "**acted**" in md


@pytest.mark.parametrize("approved", [True, False])
def test_approval_resumes_the_same_run(key: str, approved: bool) -> None:
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(stale_flag, StaleFlagParams(key=key, dry_run=False))
        run_id = wait_for_paused_run("stale-flag")
        assert _value(key) == "stale"  # nothing happens while the run waits
        resume_flow_run(run_id, run_input={"approved": approved, "approver": "bob"})
        out = fut.result(timeout=60)
    assert out["outcome"] == ("acted" if approved else "refused")
    assert _value(key) == ("ok" if approved else "stale")
    (md,) = flow_run_artifacts(run_id, "stale-flag")
    assert "bob" in md


def test_a_fix_that_does_not_hold_fails_the_run_with_its_report(key: str) -> None:
    state = stale_flag(
        StaleFlagParams(key=key, dry_run=False, auto_approve=True, sabotage="stale-again"),
        return_state=True,
    )
    assert state.is_failed()
    with pytest.raises(NotFixed):
        state.result()
    (md,) = flow_run_artifacts(state.state_details.flow_run_id, "stale-flag")
    assert "**failed**" in md and "stale-again" in md


class _Write(Action):
    """A pinned write that may refuse itself before writing (as a 409 precondition does)."""

    key: str
    refuse: bool = False

    def apply(self) -> ActionRecord:
        if self.refuse:
            raise SafetyViolation(f"{self.kind} refused; nothing written")
        redis.Redis(host="127.0.0.1", port=6379).set(self.key, self.kind)
        return ActionRecord(kind=self.kind, target=self.key, before="-", after="set", message="")


class _Writes(DriverRunbook[RunbookParams, None]):
    spec = RunbookSpec(name="two-writes", title="Two writes", severity=None)

    def __init__(self, key: str, refusing: tuple[bool, ...]) -> None:
        self.key, self.refusing = key, refusing

    def check(self, params: RunbookParams, report: Report) -> None:
        return None

    def plan(self, params: RunbookParams, findings: None) -> list[Action]:
        return [
            _Write(kind=f"w{n}", target=self.key, summary="", key=self.key, refuse=refuse)
            for n, refuse in enumerate(self.refusing, 1)
        ]


@flow(name="two-writes")
def _two_writes(key: str, refusing: tuple[bool, ...]) -> str:
    params = RunbookParams(dry_run=False, auto_approve=True)
    return drive(_Writes(key, refusing), params).outcome


def test_a_first_write_that_refuses_itself_is_a_refusal(key: str) -> None:
    assert _two_writes(key, (True, False)) == "refused"
    assert _value(key) == "stale"


def test_a_later_write_that_refuses_fails_the_run_naming_what_was_applied(key: str) -> None:
    state = _two_writes(key, (False, True), return_state=True)
    assert state.is_failed()
    with pytest.raises(PartlyDone, match="already applied: w1"):
        state.result()
    assert _value(key) == "w1"  # the first write stays, and the report says so
    (md,) = flow_run_artifacts(state.state_details.flow_run_id, "two-writes")
    assert "## Done (w1)" in md and "already applied: w1" in md
