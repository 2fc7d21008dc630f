"""The runbooks page through `escalate_incident`: db-pool-exhausted and cert-expiry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flows.cert_expiry import CertExpiryParams, cert_expiry
from flows.db_pool_exhausted import PoolStillExhausted, db_pool_exhausted
from tests.fixtures.postgres import PgWorld
from tests.fixtures.tls import CertFactory
from tests.integration.test_db_pool_flow import params

pytestmark = pytest.mark.usefixtures("prefect_api")


def test_pool_still_exhausted_pages_critical_database(world_env: Any, pg_env: PgWorld) -> None:
    world = world_env()
    with pytest.raises(PoolStillExhausted, match="escalated"):
        db_pool_exhausted(params(pg_env, dry_run=False, healthy_below_percent=0.001))
    assert world.counts() == {"on-call": 1, "leadership": 1, "db-team": 1}
    (page,) = world.sink["on-call"].delivered
    assert page["payload"]["summary"].startswith("[CRITICAL] database:")
    assert "usage still" in page["payload"]["custom_details"]["details"]


def test_a_healthy_pool_pages_nobody(world_env: Any, pg_env: PgWorld) -> None:
    world = world_env()
    db_pool_exhausted(params(pg_env, dry_run=False))
    assert world.counts() == {}


@pytest.mark.parametrize(
    ("days_left", "expected"),
    [
        (0.5, {"on-call": 1, "leadership": 1, "security-team": 1}),  # < 1 day: critical
        (3, {"team-lead": 1, "incidents": 1, "security-team": 1}),  # < 7 days: high
        (10, {}),  # medium: the run fails, nobody is paged from inside it
    ],
)
def test_cert_expiry_pages_by_days_left(
    world_env: Any, pki: CertFactory, tmp_path: Path, days_left: float, expected: dict[str, int]
) -> None:
    world = world_env()
    path = tmp_path / "akig.pem"
    path.write_bytes(pki.leaf(days_left=days_left, lifetime_days=90).chain_pem())
    state = cert_expiry(CertExpiryParams(files=[str(path)]), return_state=True)
    assert state.is_failed()
    assert world.counts() == expected
