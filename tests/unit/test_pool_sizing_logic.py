"""The pool sizing arithmetic and the env-var change's cap and undo, without any server."""

from __future__ import annotations

import pytest

from tasks.errors import PermanentError
from tasks.kubernetes.env import EnvChange, describe_entry
from tasks.pool_sizing import other_clients, parse_pool_size, size_pool
from tasks.postgres import CountBy, PoolUsage


def test_fitting_pool_is_not_flagged() -> None:
    s = size_pool(
        max_connections=100, reserved=3, other_clients=10, headroom=5, pods=4, pool_size=20
    )
    assert s.budget == 82
    assert s.demand == 80
    assert s.oversubscribed is False
    assert s.recommended == 20  # floor(82 / 4)


def test_oversubscribed_pool_is_flagged_with_a_smaller_recommendation() -> None:
    s = size_pool(
        max_connections=100, reserved=3, other_clients=10, headroom=5, pods=4, pool_size=25
    )
    assert s.demand == 100
    assert s.oversubscribed is True
    assert s.recommended == 20


def test_exactly_at_the_budget_fits() -> None:
    s = size_pool(max_connections=50, reserved=0, other_clients=0, headroom=0, pods=5, pool_size=10)
    assert (s.demand, s.budget, s.oversubscribed) == (50, 50, False)


def test_surge_pods_count_and_zero_pods_divides_by_one() -> None:
    surge = size_pool(
        max_connections=100, reserved=0, other_clients=0, headroom=0, pods=8, pool_size=10
    )
    assert surge.recommended == 12
    none = size_pool(
        max_connections=100, reserved=0, other_clients=0, headroom=0, pods=0, pool_size=10
    )
    assert none.recommended == 100
    assert none.oversubscribed is False


def test_recommendation_never_below_one() -> None:
    s = size_pool(max_connections=20, reserved=3, other_clients=30, headroom=5, pods=4, pool_size=1)
    assert s.budget < 0
    assert s.recommended == 1
    assert s.oversubscribed is True


def test_unknown_pool_size_cannot_be_checked() -> None:
    s = size_pool(
        max_connections=100, reserved=3, other_clients=0, headroom=5, pods=2, pool_size=None
    )
    assert s.demand is None
    assert s.oversubscribed is None
    assert s.recommended == 46


@pytest.mark.parametrize("text", ["", "0", "-3", "ten", "1.5", None])
def test_bad_pool_sizes_are_refused(text: str | None) -> None:
    with pytest.raises(PermanentError, match="not a positive integer"):
        parse_pool_size(text, "env DB_POOL_SIZE")


def test_pool_size_parses() -> None:
    assert parse_pool_size(" 12 ", "x") == 12


def _change(target: int, cap: int, previous: dict[str, object] | None) -> EnvChange:
    return EnvChange(
        deployment="akig-backend",
        namespace="default",
        container="app",
        env="DB_POOL_SIZE",
        previous=previous,
        target=target,
        cap=cap,
        generation=1,
    )


def test_env_change_above_the_cap_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="above the cap of 20"):
        _change(21, 20, None)
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        _change(0, 20, None)


def test_undo_of_an_unset_variable_deletes_it() -> None:
    c = _change(15, 20, None)
    assert c.target_entry == {"name": "DB_POOL_SIZE", "value": "15"}
    (container,) = c.undo_patch["spec"]["template"]["spec"]["containers"]
    assert container == {"name": "app", "env": [{"name": "DB_POOL_SIZE", "$patch": "delete"}]}


def test_undo_of_a_literal_restores_it() -> None:
    c = _change(15, 20, {"name": "DB_POOL_SIZE", "value": "10"})
    (container,) = c.undo_patch["spec"]["template"]["spec"]["containers"]
    assert container["env"] == [{"name": "DB_POOL_SIZE", "value": "10"}]
    assert describe_entry(c.previous) == "'10'"


def test_a_configmap_reference_is_replaced_and_restored() -> None:
    ref = {"configMapKeyRef": {"name": "backend", "key": "pool"}}
    c = _change(15, 20, {"name": "DB_POOL_SIZE", "valueFrom": ref})
    assert c.target_entry == {"name": "DB_POOL_SIZE", "value": "15", "valueFrom": None}
    (container,) = c.undo_patch["spec"]["template"]["spec"]["containers"]
    assert container["env"] == [{"name": "DB_POOL_SIZE", "valueFrom": ref, "value": None}]
    assert describe_entry(c.previous) == "from ConfigMap backend key pool"


def test_other_clients_are_every_role_but_the_backends() -> None:
    usage = PoolUsage.model_validate(
        {
            "taken_at": "2026-11-27T00:00:00Z",
            "target": "db",
            "max_connections": 100,
            "superuser_reserved": 3,
            "reserved": 0,
            "client_connections": 60,
            "percent_used": 60.0,
            "free_for_applications": 37,
            "by_state": [],
            "by_database": [],
            "by_user": [
                CountBy(key="app", count=50),
                CountBy(key="etl", count=7),
                CountBy(key="(none)", count=3),
            ],
        }
    )
    assert other_clients(usage, "app") == 10
    assert other_clients(usage, "nobody") == 60
