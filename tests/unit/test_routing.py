"""Routing table: matchers, label templates, auto vs dry run, start-up validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from deployments.catalog import RUNBOOKS, by_deployment
from deployments.routing import (
    MissingLabel,
    Route,
    RoutingTable,
    build_params,
    load_routing,
    render,
    validate_routing,
)
from tests.fixtures.stub_runbooks import STUB_RUNBOOKS
from tests.fixtures.triggers import stub_table

STUB = by_deployment(STUB_RUNBOOKS)
REPO = Path(__file__).resolve().parents[2]


def test_first_matching_route_wins_and_matchers_apply() -> None:
    table = stub_table()
    auto = table.route_for({"alertname": "StubAuto", "namespace": "x"})
    assert auto is not None and auto.auto
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


def test_auto_false_forces_dry_run_and_auto_true_turns_it_off() -> None:
    table = stub_table()
    plan_route = table.route_for(
        {"alertname": "StubPlan", "severity": "critical", "namespace": "prod-a"}
    )
    assert plan_route is not None
    params = build_params(plan_route, STUB["stub-remediate/stub-remediate"], {"namespace": "p"})
    assert params == {"namespace": "p", "dry_run": True}
    auto_route = table.route_for({"alertname": "StubAuto", "namespace": "x"})
    assert auto_route is not None
    params = build_params(auto_route, STUB["stub-remediate/stub-remediate"], {"namespace": "x"})
    assert params == {"namespace": "x", "dry_run": False}


def test_label_values_are_validated_by_the_runbook_model() -> None:
    route = Route(
        alertname="A",
        deployment="stub-remediate/stub-remediate",
        params={"max_sessions": "${n}"},
    )
    runbook = STUB["stub-remediate/stub-remediate"]
    assert build_params(route, runbook, {"n": "5"})["max_sessions"] == 5
    with pytest.raises(ValidationError):
        build_params(route, runbook, {"n": "100000"})  # above the blast-radius cap
    with pytest.raises(MissingLabel):
        build_params(route, runbook, {})


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({"alertname": "A", "deployment": "nope/nope"}, "unknown deployment"),
        (
            {"alertname": "A", "deployment": "stub-remediate/stub-remediate", "params": {"x": 1}},
            "no field",
        ),
        (
            {
                "alertname": "A",
                "deployment": "stub-remediate/stub-remediate",
                "params": {"dry_run": False},
            },
            "set `auto`",
        ),
        (
            {
                "alertname": "A",
                "deployment": "stub-remediate/stub-remediate",
                "params": {"max_sessions": 10_000},
            },
            "params invalid",
        ),
    ],
)
def test_validation_refuses_bad_routes(route: dict[str, object], message: str) -> None:
    table = RoutingTable.model_validate({"routes": [route]})
    with pytest.raises(ValueError, match=message):
        validate_routing(table, STUB_RUNBOOKS, source="test")


def test_bad_regex_and_unknown_keys_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text(
        "routes:\n  - alertname: A\n    deployment: stub-remediate/stub-remediate\n"
        "    match_re: {x: '('}\n"
    )
    with pytest.raises(ValueError, match="match_re"):
        load_routing(bad, STUB_RUNBOOKS)
    bad.write_text(
        "routes:\n  - alertname: A\n    deployment: stub-remediate/stub-remediate\n    atuo: true\n"
    )
    with pytest.raises(ValueError, match="atuo"):
        load_routing(bad, STUB_RUNBOOKS)


def test_shipped_routing_table_is_valid_and_plans_pool_cleanup() -> None:
    table = load_routing(REPO / "deployments" / "routing.yaml", RUNBOOKS)
    index = by_deployment(RUNBOOKS)
    labels = {"alertname": "DatabaseConnectionPoolExhausted", "datname": "orders"}
    route = table.route_for(labels)
    assert route is not None and route.deployment == "db-pool-exhausted/db-pool-exhausted"
    params = build_params(route, index[route.deployment], labels)
    assert params["dry_run"] is True
    assert params["guard"] == {"database": "orders"}
    cert = table.route_for({"alertname": "CertificateExpiringInDays"})
    assert cert is not None and cert.deployment == "cert-expiry/cert-expiry"
    high = table.route_for({"alertname": "DatabaseConnectionPoolHigh"})
    assert high is not None
    assert build_params(high, index[high.deployment], {})["remediation"]["dry_run"] is True


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
                {
                    "alertname": "A",
                    "deployment": "stub-remediate/stub-remediate",
                    "auto": True,
                    "params": params,
                }
            ]
        }
    )
    with pytest.raises(ValueError, match=r"`auto: true` must not use `\$\{label\?\}`"):
        validate_routing(table, STUB_RUNBOOKS, source="test")


def test_an_auto_route_with_an_optional_label_stops_the_start_up(tmp_path: Path) -> None:
    path = tmp_path / "routing.yaml"
    path.write_text(
        "routes:\n  - alertname: A\n    deployment: stub-remediate/stub-remediate\n"
        "    auto: true\n    params: {namespace: x, database: '${datname?}'}\n"
    )
    with pytest.raises(ValueError, match=r"auto: true` must not use .* \(in database\)"):
        load_routing(path, STUB_RUNBOOKS)


def test_a_plan_only_route_may_use_an_optional_label() -> None:
    table = RoutingTable.model_validate(
        {
            "routes": [
                {
                    "alertname": "A",
                    "deployment": "stub-remediate/stub-remediate",
                    "params": {"database": "${datname?}"},
                }
            ]
        }
    )
    validate_routing(table, STUB_RUNBOOKS, source="test")
    assert table.routes[0].auto is False


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("10m", 600), ("1h30m", 5400), ("45s", 45), (90, 90), ("0", 0), (0, 0)],
)
def test_a_route_cooldown_reads_durations(value: object, seconds: int) -> None:
    route = Route.model_validate({"alertname": "A", "deployment": "d/d", "cooldown": value})
    assert route.cooldown.total_seconds() == seconds


def test_a_route_cooldown_defaults_to_ten_minutes() -> None:
    assert Route(alertname="A", deployment="d/d").cooldown.total_seconds() == 600


@pytest.mark.parametrize("value", ["-5", "ten minutes", -1])
def test_a_bad_cooldown_is_refused(value: object) -> None:
    with pytest.raises(ValidationError):
        Route.model_validate({"alertname": "A", "deployment": "d/d", "cooldown": value})
