"""Routing table: matchers, label templates, modes (plan, approve, auto), the filled-in request,
start-up validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from deployments.catalog import RUNBOOKS, Runbook, by_name
from deployments.routing import (
    MissingLabel,
    Route,
    RoutingTable,
    build_params,
    load_routing,
    render,
    validate_routing,
)
from tests.fixtures.stub_runbooks import NESTED_STUB, STUB_RUNBOOKS
from tests.fixtures.triggers import stub_table

STUB = by_name(STUB_RUNBOOKS)
#: The throwaway runbook on the driver: its params have `dry_run` and `auto_approve`.
FLAG = Runbook(entrypoint="tests.fixtures.throwaway_runbook:stale_flag", description="flag")
REPO = Path(__file__).resolve().parents[2]


def test_first_matching_route_wins_and_matchers_apply() -> None:
    table = stub_table()
    auto = table.route_for({"alertname": "StubAuto", "namespace": "x"})
    assert auto is not None and auto.mode == "auto"
    plan = {"alertname": "StubPlan", "severity": "critical", "namespace": "prod-eu"}
    assert table.route_for(plan) is not None
    assert table.route_for({**plan, "severity": "warning"}) is None
    # match_re is a full match, as in Alertmanager: "preprod-eu" does not match "prod-.*".
    assert table.route_for({**plan, "namespace": "preprod-eu"}) is None
    assert table.route_for({"alertname": "Unknown"}) is None
    assert table.route_for({}) is None


def test_templates_fill_from_labels() -> None:
    labels = {"namespace": "shop", "datname": "orders"}
    assert render("${namespace}", labels) == "shop"
    assert render("ns=${namespace}/${missing:-none}", labels) == "ns=shop/none"
    assert render({"a": ["${datname}"], "b": {"c": "${datname?}"}}, labels) == {
        "a": ["orders"],
        "b": {"c": "orders"},
    }
    # optional label absent: the field is left out (runbook default), never an empty filter
    assert render({"guard": {"database": "${nope?}"}}, labels) == {"guard": {}}
    with pytest.raises(MissingLabel):
        render("${nope}", labels)


def test_plan_forces_dry_run_and_auto_turns_it_off() -> None:
    table = stub_table()
    plan_route = table.route_for(
        {"alertname": "StubPlan", "severity": "critical", "namespace": "prod-a"}
    )
    assert plan_route is not None
    params = build_params(plan_route, STUB["stub-remediate"], {"namespace": "p"})
    assert params == {"namespace": "p", "dry_run": True}
    auto_route = table.route_for({"alertname": "StubAuto", "namespace": "x"})
    assert auto_route is not None
    params = build_params(auto_route, STUB["stub-remediate"], {"namespace": "x"})
    assert params == {"namespace": "x", "dry_run": False, "auto_approve": True}


def test_label_values_are_validated_by_the_runbook_model() -> None:
    route = Route(alertname="A", runbook="stub-remediate", params={"max_sessions": "${n}"})
    runbook = STUB["stub-remediate"]
    assert build_params(route, runbook, {"n": "5"})["max_sessions"] == 5
    with pytest.raises(ValidationError):
        build_params(route, runbook, {"n": "100000"})  # above the blast-radius cap
    with pytest.raises(MissingLabel):
        build_params(route, runbook, {})


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (
            {"alertname": "A", "runbook": "nope"},
            r"unknown runbook 'nope' \(known: .*stub-remediate",
        ),
        (
            {"alertname": "A", "runbook": "stub-remediate/stub-remediate"},
            r"name the runbook \(`stub-remediate`\), not its deployment",
        ),
        ({"alertname": "A", "runbook": "stub-remediate", "params": {"x": 1}}, "no field"),
        (
            {"alertname": "A", "runbook": "stub-remediate", "params": {"dry_run": False}},
            "set `mode`, not params.dry_run",
        ),
        (
            {
                "alertname": "A",
                "runbook": "stale-flag",
                "params": {"key": "k", "auto_approve": True},
            },
            "set `mode`, not params.auto_approve",
        ),
        (
            {"alertname": "A", "runbook": "stub-remediate", "params": {"max_sessions": 10_000}},
            "params invalid",
        ),
    ],
)
def test_validation_refuses_bad_routes(route: dict[str, object], message: str) -> None:
    table = RoutingTable.model_validate({"routes": [route]})
    with pytest.raises(ValueError, match=message):
        validate_routing(table, (*STUB_RUNBOOKS, FLAG), source="test")


def test_bad_regex_and_unknown_keys_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text(
        "routes:\n  - alertname: A\n    runbook: stub-remediate\n    match_re: {x: '('}\n"
    )
    with pytest.raises(ValueError, match="match_re"):
        load_routing(bad, STUB_RUNBOOKS)
    bad.write_text("routes:\n  - alertname: A\n    runbook: stub-remediate\n    mdoe: auto\n")
    with pytest.raises(ValueError, match="mdoe"):
        load_routing(bad, STUB_RUNBOOKS)


def test_shipped_routing_table_is_valid_and_says_how_each_alert_runs() -> None:
    table = load_routing(REPO / "deployments" / "routing.yaml", RUNBOOKS)
    index = by_name(RUNBOOKS)
    labels = {
        "alertname": "DatabaseConnectionPoolExhausted",
        "datname": "orders",
        "instance": "db1",
    }
    route = table.route_for(labels)
    assert route is not None and (route.runbook, route.mode) == ("db-pool-exhausted", "approve")
    runbook = index[route.runbook]
    assert runbook.deployment == "db-pool-exhausted/db-pool-exhausted"
    params = build_params(route, runbook, labels)
    assert params["dry_run"] is False
    assert params["guard"] == {"database": "orders"}
    assert (params["requested_by"], params["reason"]) == (
        "alertmanager",
        "alert DatabaseConnectionPoolExhausted on db1",
    )
    assert params["auto_approve"] is False
    errors = table.route_for({"alertname": "HighErrorRate", "job": "akig-backend"})
    assert errors is not None and errors.mode == "approve"
    params = build_params(
        errors, index[errors.runbook], {"alertname": "HighErrorRate", "job": "akig-backend"}
    )
    assert (params["dry_run"], params["auto_approve"]) == (False, False)
    assert params["reason"] == "alert HighErrorRate on akig-backend"
    cert = table.route_for({"alertname": "CertificateExpiringInDays"})
    assert cert is not None and cert.runbook == "cert-expiry"
    # Read-only: no mode to apply, only the request filled in.
    assert build_params(cert, index[cert.runbook], {}) == {
        "requested_by": "alertmanager",
        "reason": "alert unnamed on an unnamed target",
    }
    high = table.route_for({"alertname": "DatabaseConnectionPoolHigh"})
    assert high is not None and high.mode == "plan"
    remediation = build_params(high, index[high.runbook], {})["remediation"]
    assert remediation["dry_run"] is True
    assert remediation["requested_by"] == "alertmanager"
    # The receiver fills the request in: no shipped route writes it by hand.
    for shipped in table.routes:
        assert not _keys(shipped.params) & {"requested_by", "reason"}, shipped.alertname


def _keys(params: object) -> set[str]:
    """Every key at any depth of nested parameter dicts."""
    if not isinstance(params, dict):
        return set()
    return set(params) | {k for v in params.values() for k in _keys(v)}


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("plan", {"dry_run": True}),
        ("approve", {"dry_run": False, "auto_approve": False}),
        ("auto", {"dry_run": False, "auto_approve": True}),
    ],
)
def test_the_mode_sets_dry_run_and_auto_approve(mode: str, expected: dict[str, bool]) -> None:
    route = Route.model_validate(
        {"alertname": "A", "runbook": "stale-flag", "mode": mode, "params": {"key": "k"}}
    )
    validate_routing(RoutingTable(routes=[route]), (FLAG,), source="test")
    params = build_params(route, FLAG, {"alertname": "A"})
    assert {k: v for k, v in params.items() if k in ("dry_run", "auto_approve")} == expected


@pytest.mark.parametrize(
    ("mode", "dry_run", "auto_approve"),
    [("plan", True, None), ("approve", False, False), ("auto", False, True)],
)
def test_a_nested_dry_run_field_gets_its_auto_approve_and_request_beside_it(
    mode: str, dry_run: bool, auto_approve: bool | None
) -> None:
    route = Route.model_validate({"alertname": "A", "runbook": "stub-nested", "mode": mode})
    validate_routing(RoutingTable(routes=[route]), (NESTED_STUB,), source="test")
    params = build_params(route, NESTED_STUB, {"alertname": "A", "instance": "h:1"})
    inner = params["inner"]
    assert (inner["dry_run"], inner.get("auto_approve")) == (dry_run, auto_approve)
    assert (inner["requested_by"], inner["reason"]) == ("alertmanager", "alert A on h:1")
    assert set(params) == {"inner"}


def test_approve_turns_dry_run_and_auto_approve_off() -> None:
    # The alert's own run plans, then pauses for a human: it must never act unattended.
    route = Route(alertname="A", runbook="stub-remediate", mode="approve")
    params = build_params(route, STUB["stub-remediate"], {"alertname": "A"})
    assert params == {"dry_run": False, "auto_approve": False}


@pytest.mark.parametrize("mode", ["plan", "approve", "auto"])
def test_a_read_only_runbook_takes_any_mode_and_sets_nothing(mode: str) -> None:
    route = Route.model_validate({"alertname": "A", "runbook": "stub-readonly", "mode": mode})
    validate_routing(RoutingTable(routes=[route]), STUB_RUNBOOKS, source="test")
    assert build_params(route, STUB["stub-readonly"], {"alertname": "A"}) == {}


@pytest.mark.parametrize(
    ("labels", "reason"),
    [
        ({"alertname": "X", "instance": "db1:5432", "job": "pg"}, "alert X on db1:5432"),
        ({"alertname": "X", "job": "akig-backend"}, "alert X on akig-backend"),
        ({"alertname": "X"}, "alert X on an unnamed target"),
    ],
)
def test_the_receiver_fills_in_who_asked_and_why(labels: dict[str, str], reason: str) -> None:
    route = Route(alertname="X", runbook="stale-flag", params={"key": "k"})
    params = build_params(route, FLAG, labels, requested_by="am-eu")
    assert (params["requested_by"], params["reason"]) == ("am-eu", reason)


def test_the_filled_in_request_is_capped_as_the_params_cap_it() -> None:
    route = Route(alertname="X", runbook="stale-flag", params={"key": "k"})
    params = build_params(route, FLAG, {"alertname": "X", "instance": "i" * 5000}, "r" * 500)
    assert params["requested_by"] == "r" * 200
    assert len(params["reason"]) == 2000 and params["reason"].startswith("alert X on iii")


def test_a_route_may_still_say_who_asked_and_why() -> None:
    route = Route(
        alertname="X",
        runbook="stale-flag",
        params={"key": "k", "requested_by": "night shift", "reason": "flag ${key} stale"},
    )
    validate_routing(RoutingTable(routes=[route]), (FLAG,), source="test")
    params = build_params(route, FLAG, {"alertname": "X", "key": "k1", "instance": "h"})
    assert (params["requested_by"], params["reason"]) == ("night shift", "flag k1 stale")


@pytest.mark.parametrize(
    ("yaml_route", "message"),
    [
        (
            "    deployment: stub-remediate/stub-remediate\n",
            r"`deployment:` is no longer a route key: name the runbook, `runbook: stub-remediate`",
        ),
        (
            "    runbook: stub-remediate\n    auto: true\n",
            r"`auto:` is no longer a route key: use `mode: plan \| approve \| auto`",
        ),
    ],
)
def test_the_old_route_keys_stop_the_start_up_with_what_to_write(
    tmp_path: Path, yaml_route: str, message: str
) -> None:
    path = tmp_path / "routing.yaml"
    path.write_text("routes:\n  - alertname: A\n" + yaml_route)
    with pytest.raises(ValueError, match=message):
        load_routing(path, STUB_RUNBOOKS)


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValidationError, match="'plan', 'approve' or 'auto'"):
        Route.model_validate({"alertname": "A", "runbook": "stub-remediate", "mode": "yes"})


@pytest.mark.parametrize(
    "params",
    [
        {"database": "${datname?}"},
        {"namespace": "${namespace}", "database": "${datname?}"},
        {"namespace": "ns-${datname?}"},  # inside a longer string too
    ],
)
def test_an_auto_route_must_not_drop_a_filter_with_an_optional_label(
    params: dict[str, object],
) -> None:
    table = RoutingTable.model_validate(
        {
            "routes": [
                {"alertname": "A", "runbook": "stub-remediate", "mode": "auto", "params": params}
            ]
        }
    )
    with pytest.raises(ValueError, match=r"`mode: auto` must not use `\$\{label\?\}`"):
        validate_routing(table, STUB_RUNBOOKS, source="test")


def test_an_auto_route_with_an_optional_label_stops_the_start_up(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    path.write_text(
        "routes:\n  - alertname: A\n    runbook: stub-remediate\n"
        "    mode: auto\n    params: {namespace: x, database: '${datname?}'}\n"
    )
    with pytest.raises(ValueError, match=r"mode: auto` must not use .* \(in database\)"):
        load_routing(path, STUB_RUNBOOKS)


@pytest.mark.parametrize("mode", ["plan", "approve"])
def test_plan_and_approve_routes_may_use_an_optional_label(mode: str) -> None:
    # approve: a human reads the plan (and who it would touch) before anything changes.
    table = RoutingTable.model_validate(
        {
            "routes": [
                {
                    "alertname": "A",
                    "runbook": "stub-remediate",
                    "mode": mode,
                    "params": {"database": "${datname?}"},
                }
            ]
        }
    )
    validate_routing(table, STUB_RUNBOOKS, source="test")
    expected = {"dry_run": True} if mode == "plan" else {"dry_run": False, "auto_approve": False}
    assert build_params(table.routes[0], STUB["stub-remediate"], {}) == expected


def test_a_route_plans_unless_it_says_otherwise() -> None:
    assert Route(alertname="A", runbook="stub-remediate").mode == "plan"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("10m", 600), ("1h30m", 5400), ("45s", 45), (90, 90), ("0", 0), (0, 0)],
)
def test_a_route_cooldown_reads_durations(value: object, seconds: int) -> None:
    route = Route.model_validate({"alertname": "A", "runbook": "d", "cooldown": value})
    assert route.cooldown.total_seconds() == seconds


def test_a_route_cooldown_defaults_to_ten_minutes() -> None:
    assert Route(alertname="A", runbook="d").cooldown.total_seconds() == 600


@pytest.mark.parametrize("value", ["-5", "ten minutes", -1])
def test_a_bad_cooldown_is_refused(value: object) -> None:
    with pytest.raises(ValidationError):
        Route.model_validate({"alertname": "A", "runbook": "d", "cooldown": value})


def test_an_acting_mode_needs_the_auto_approve_field_beside_the_dry_run_field() -> None:
    """Without `auto_approve` a route's mode could not tell "ask" from "act": refused at start-up
    (an `approve` route must never act unattended on a runbook that cannot be told to ask)."""
    from pydantic import BaseModel

    from deployments.routing import _route_problem

    class NoAutoApprove(BaseModel):
        dry_run: bool = True

    class Stand:
        dry_run_field = "dry_run"

        def params_model(self) -> type[BaseModel]:
            return NoAutoApprove

    for mode, refused in (("approve", True), ("auto", True), ("plan", False)):
        route = Route.model_validate({"alertname": "A", "runbook": "x", "mode": mode})
        problem = _route_problem(route, Stand())  # type: ignore[arg-type]
        assert (problem is not None and "auto_approve" in problem) is refused, mode
