"""The high-error-rate runbook's pure logic: onset dating, log counts, classification, re-plan."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from flows.common import Unavailable
from flows.driver import Stop, needs_approval
from flows.high_error_rate import (
    DatabaseRestartAction,
    Findings,
    HighErrorRate,
    HighErrorRateParams,
    RestartAction,
    RollbackAction,
    classify,
    count_log_errors,
    error_onset,
    make_plan,
)
from flows.spec import Action
from tasks.kubernetes import (
    PodLogs,
    RestartPlan,
    RevisionInfo,
    RollbackPlan,
    RolloutHistory,
    StatefulSetRestartPlan,
    TailLogsResult,
)
from tasks.prometheus import RangeResult, RouteFigures, Series

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
T0 = NOW.timestamp()


def history(*values: float | None, step: float = 5.0) -> RangeResult:
    start = T0 - step * (len(values) - 1)
    points = [(start + i * step, v) for i, v in enumerate(values)]
    return RangeResult(query="q", series=[Series(points=points)], start=NOW, end=NOW)


def test_onset_is_the_start_of_the_current_run_above_the_threshold() -> None:
    onset = error_onset(history(0.0, 0.3, 0.0, 0.2, 0.3, 0.3), 0.05)
    assert onset == datetime.fromtimestamp(T0 - 10, UTC)


@pytest.mark.parametrize("values", [(0.3, 0.3, 0.01), (0.3, None), (), (0.05, 0.05)], ids=str)
def test_no_onset_when_not_above_now(values: tuple[float | None, ...]) -> None:
    assert error_onset(history(*values), 0.05) is None


def test_a_gap_without_traffic_ends_the_run() -> None:
    assert error_onset(history(0.3, None, 0.3), 0.05) == NOW


def test_log_counts() -> None:
    lines = [
        "t level=info method=GET path=/api/x status=200 duration=1ms",
        't level=error method=GET status=500 error="OperationalError: connection failed"',
        't level=error method=GET status=500 error="JSONDecodeError: Expecting value"',
        "t level=warn method=GET status=404",
        't level=error method=GET status=503 error="PoolExhaustedError: database pool"',
    ]
    logs = TailLogsResult(
        deployment="d",
        namespace="n",
        lines=10,
        grep=None,
        logs=[PodLogs(pod="p", container="app", lines=lines)],
    )
    n = count_log_errors(logs)
    assert (n.lines, n.errors, n.database, n.cache) == (5, 3, 2, 1)
    assert "PoolExhausted" in n.sample


def revision(rev: int, image: str, current: bool, created: datetime) -> RevisionInfo:
    return RevisionInfo(
        revision=rev,
        replica_set=f"rs-{rev}",
        images=[image],
        change_cause=None,
        replicas=1 if current else 0,
        ready_replicas=1 if current else 0,
        created=created,
        current=current,
        became_current=created,
        dated_by="created",
    )


def gathered(
    rolled: datetime, onset_s_ago: float | None, ratio: float, previous: bool = True
) -> dict[str, Any]:
    """Evidence where only Prometheus and the rollout history answered."""
    steps = 60
    values: list[float | None] = [0.0] * steps
    if onset_s_ago is not None:
        above = int(onset_s_ago // 5) + 1
        values[-above:] = [ratio] * above
    revisions = [revision(2, "img:v2", True, rolled)]
    if previous:
        revisions.insert(0, revision(1, "img:v1", False, rolled - timedelta(days=1)))
    down = Unavailable("TransientError: down")
    return {
        "logs": down,
        "health": down,
        "pods": down,
        "activity": down,
        "pool": Unavailable("PermanentError: bad DSN"),
        "redis": Unavailable("PermanentError: refused our credentials"),
        "errors": RouteFigures(what="5xx ratio", window="1m", query="q", overall=ratio),
        "history": history(*values),
        "rollout": RolloutHistory(
            deployment="akig-backend", namespace="n", current_revision=2, revisions=revisions
        ),
    }


def scenarios(got: dict[str, Any], **params: Any) -> set[str]:
    found = classify(HighErrorRateParams(**params), got, NOW)
    return {s.scenario for s in found.scenarios}


def test_code_when_errors_began_after_the_rollout() -> None:
    got = gathered(rolled=NOW - timedelta(seconds=120), onset_s_ago=100, ratio=0.3)
    found = classify(HighErrorRateParams(), got, NOW)
    assert [s.scenario for s in found.scenarios] == ["D"]
    (evidence,) = found.scenarios[0].evidence
    assert "after revision 2 (img:v2)" in evidence and "previous revision 1 (img:v1)" in evidence


def test_not_code_when_errors_began_before_the_rollout() -> None:
    got = gathered(rolled=NOW - timedelta(seconds=60), onset_s_ago=200, ratio=0.3)
    assert scenarios(got) == set()


def test_not_code_when_the_rollout_is_older_than_the_window() -> None:
    got = gathered(rolled=NOW - timedelta(minutes=40), onset_s_ago=100, ratio=0.3)
    assert scenarios(got, rollout_window_minutes=30) == set()


def test_not_code_without_a_previous_revision() -> None:
    got = gathered(rolled=NOW - timedelta(seconds=120), onset_s_ago=100, ratio=0.3, previous=False)
    assert scenarios(got) == set()


def test_not_code_when_the_ratio_is_below_the_threshold() -> None:
    got = gathered(rolled=NOW - timedelta(seconds=120), onset_s_ago=None, ratio=0.01)
    assert scenarios(got) == set()


def test_unreachable_sources_are_rows_and_only_transient_ones_are_evidence() -> None:
    got = gathered(rolled=NOW - timedelta(seconds=120), onset_s_ago=None, ratio=0.0)
    got["redis"] = Unavailable("TransientError: Redis 127.0.0.1:1/0 unavailable")
    found = classify(HighErrorRateParams(), got, NOW)
    assert {s.scenario for s in found.scenarios} == {"C"}
    unavailable = {r.item for r in found.checks if r.verdict == "unavailable"}
    assert {"backend logs (tail)", "backend health", "Redis", "PostgreSQL connections"} <= (
        unavailable
    )


def plan(to_revision: int, image: str) -> RollbackAction:
    rb = RollbackPlan(
        deployment="akig-backend",
        namespace="n",
        requested_revision=0,
        to_revision=to_revision,
        from_revision=3,
        generation=3,
        already_current=False,
        template=None,
        patch=[],
        images_before=["img:v3"],
        images_after=[image],
    )
    return RollbackAction(scenario="D", target="t", summary="s", rollback=rb, rollout_timeout_s=5)


def still_valid(approved: list[Action], fresh: list[Action]) -> list[Action] | Stop:
    """The runbook's own re-plan check; no 5xx ratio when planned, so no Prometheus read."""
    found = Findings(checks=[], scenarios=[], error_rate=None, onset=None)
    return HighErrorRate().still_valid(HighErrorRateParams(), approved, fresh, found, found)


def test_a_rollback_acts_only_on_the_approved_revision() -> None:
    approved: list[Action] = [plan(1, "img:v1")]
    assert still_valid(approved, [plan(1, "img:v1")]) == [plan(1, "img:v1")]
    # Someone rolled out meanwhile: "previous" now means another revision. Not approved.
    skipped = still_valid(approved, [plan(2, "img:v2")])
    assert isinstance(skipped, Stop) and skipped.outcome == "skipped"
    # A scenario that no longer holds is not in the fresh plan: nothing to act on.
    assert isinstance(still_valid(approved, []), Stop)
    # Not a rollback (a restart of the same Deployment) is not the approved rollback either.
    restart = RestartAction(
        scenario="B",
        target="t",
        summary="s",
        restart=RestartPlan(
            deployment="akig-backend",
            namespace="n",
            restarted_at="2026-11-27T12:00:00Z",
            previous_restarted_at=None,
            generation=3,
        ),
        rollout_timeout_s=5,
    )
    assert isinstance(still_valid(approved, [restart]), Stop)
    # Nor one the fresh plan marks impossible.
    impossible = plan(1, "img:v1").model_copy(update={"possible": False})
    assert isinstance(still_valid(approved, [impossible]), Stop)


def after_an_undo(undone_s_ago: float, onset_s_ago: float) -> dict[str, Any]:
    """v1 (its ReplicaSet made 10 min ago), v2 (5 min ago, bad), then an undo back to v1's
    ReplicaSet: revision 3, current since the undo; the 5xx still above the threshold."""
    undo = NOW - timedelta(seconds=undone_s_ago)
    got = gathered(rolled=NOW, onset_s_ago=onset_s_ago, ratio=0.3)
    v1 = revision(3, "img:v1", True, NOW - timedelta(minutes=10)).model_copy(
        update={
            "earlier_revisions": [1],
            "became_current": undo,
            "dated_by": "revision annotation",
        }
    )
    v2 = revision(2, "img:v2", False, NOW - timedelta(minutes=5))
    got["rollout"] = RolloutHistory(
        deployment="akig-backend",
        namespace="n",
        current_revision=3,
        revisions=[v2, v1],
        undone={
            "revision": 2,
            "images": ["img:v2"],
            "by_revision": 3,
            "template_of": 1,
            "at": undo,
        },
    )
    return got


@pytest.mark.parametrize(
    ("undone_s_ago", "onset_s_ago"),
    [(60, 200), (120, 30)],
    ids=["the 5xx continued through the undo", "the 5xx began after the undo"],
)
def test_never_code_to_roll_forward_onto_the_release_just_undone(
    undone_s_ago: float, onset_s_ago: float
) -> None:
    found = classify(HighErrorRateParams(), after_an_undo(undone_s_ago, onset_s_ago), NOW)
    # v1's ReplicaSet is 10 min old, but revision 3 is current only since the undo, and
    # revision 2 is the one it rolled back from: D is not claimed, whatever the timing.
    assert found.scenarios == []
    (rollout,) = [r for r in found.checks if r.item == "rollout history"]
    assert "revision 3 (img:v1) current since" in rollout.observed and "an undo" in rollout.observed
    assert "revision 2 (img:v2) was rolled back from" in rollout.detail
    assert "never a rollback target: it is the release just undone" in rollout.detail
    assert len(rollout.detail) <= 200  # what a table cell of the artifact keeps
    if onset_s_ago > undone_s_ago:
        assert "before revision 3" in rollout.detail
        assert rollout.verdict == "pass"
    else:
        assert rollout.verdict == "FAIL"  # the timing points at revision 3, still no D
    # The plan says why no rollback is planned.
    (withheld,) = make_plan(HighErrorRateParams(), found.scenarios, found.withheld)
    assert withheld.kind == "rollback" and not withheld.possible
    assert withheld.summary.startswith("not planned (D not claimed): revision 2 (img:v2) was")
    assert "release just undone" in withheld.summary


def test_code_dates_the_rollout_from_when_it_became_current() -> None:
    # A ReplicaSet created long ago, current only since 60 s (an undo to it, with nothing
    # left to undo): errors that began before it became current are not its doing.
    got = gathered(rolled=NOW - timedelta(minutes=10), onset_s_ago=200, ratio=0.3)
    rollout = got["rollout"]
    current = rollout.revisions[-1].model_copy(
        update={"became_current": NOW - timedelta(seconds=60)}
    )
    got["rollout"] = rollout.model_copy(update={"revisions": [rollout.revisions[0], current]})
    assert scenarios(got) == set()


def test_never_a_rollback_onto_a_revision_just_undone_even_if_approved() -> None:
    approved: list[Action] = [plan(1, "img:v1")]
    undone = plan(1, "img:v1")
    undone.rollback = undone.rollback.model_copy(
        update={
            "target_undone": {
                "revision": 1,
                "images": ["img:v1"],
                "by_revision": 3,
                "template_of": 2,
                "at": NOW,
            }
        }
    )
    assert isinstance(still_valid(approved, [undone]), Stop)


def test_only_the_database_restart_always_asks() -> None:
    db = DatabaseRestartAction(
        scenario="A",
        target="statefulset/akig-postgres in n",
        summary="s",
        database=StatefulSetRestartPlan(
            statefulset="akig-postgres",
            namespace="n",
            restarted_at="2026-11-27T12:00:00Z",
            previous_restarted_at=None,
            generation=1,
            update_strategy="RollingUpdate",
        ),
        rollout_timeout_s=5,
    )
    assert (db.approval, plan(1, "img:v1").approval) == ("always", "unless-auto")
    assert not needs_approval([plan(1, "img:v1")], auto_approve=True)
    assert needs_approval([plan(1, "img:v1"), db], auto_approve=True)
    assert db.describe().startswith("A: database-restart statefulset/akig-postgres")
