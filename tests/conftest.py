"""Shared fixtures: real PostgreSQL and Redis on loopback, one Prefect API per session."""

from __future__ import annotations

import os

# Before Prefect is imported anywhere: no telemetry (there is no internet here), fast
# retries so "unreachable" tests take seconds, not minutes.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RUNBOOKS_RETRY_ATTEMPTS", "2")
os.environ.setdefault("RUNBOOKS_RETRY_BACKOFF_S", "0.05")
os.environ.setdefault("RUNBOOKS_RETRY_JITTER_FACTOR", "0")
# Approval links and votes are signed in every test run (a fixed test key, never a real one).
os.environ.setdefault("RUNBOOKS_APPROVAL_SIGNING_KEY", "test-approval-signing-key-0123456789abcdef")

from collections.abc import Iterator

import pytest
from hypothesis import settings

# Hypothesis fails an example slower than 200 ms by default: a wall-clock assertion that a
# loaded 2-core machine breaks. Examples are judged on what they return, never on time.
settings.register_profile("runbooks", deadline=None)
settings.load_profile("runbooks")

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.faults",
    "tests.fixtures.kube",
    "tests.fixtures.tls",
    "tests.fixtures.triggers",
    "tests.fixtures.sandbox",
    "tests.fixtures.prometheus",
    "tests.fixtures.pg_private",
    "tests.fixtures.sinks",
    "tests.fixtures.slack_api",
    "tests.fixtures.acme",
    "tests.fixtures.worktree",
    "tests.fixtures.outage",
]


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """A throwaway Prefect API (SQLite) for flow tests; ~20 s to enter, so once a session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield
