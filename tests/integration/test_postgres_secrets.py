"""A DSN password never leaks, whatever its characters: logs, artifacts, states, exceptions.

The password holds `/`, `@`, `%`, `:` and a space; each piece between them is a distinctive
token, so a leak of any fragment (as a mis-parsed URL would put in a "host" or "port") shows.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

import pytest
from prefect.blocks.system import Secret

from flows.db_pool_exhausted import DbPoolParams, db_pool_exhausted
from tasks.errors import PermanentError, TransientError
from tasks.postgres import TerminationGuard
from tests.fixtures.postgres import PgWorld
from tests.fixtures.prefect_runs import flow_run_artifacts, flow_run_logs, task_run_states

pytestmark = pytest.mark.usefixtures("prefect_api")

TOKENS = ["Kq7vX", "Wm3zR", "Jt9pL", "Hy4cN", "Bz6fD", "Lu2sE"]
PASSWORD = "Kq7vX/Wm3zR@Jt9pL%Hy4cN:Bz6fD Lu2sE"
ENCODED = quote(PASSWORD, safe="")

GOOD = {
    "url": f"postgresql://postgres:{ENCODED}@127.0.0.1:5432/postgres",
    "keyword": f"host=127.0.0.1 port=5432 dbname=postgres user=postgres password='{PASSWORD}'",
}
MALFORMED = {
    # Not percent-encoded: libpq refuses the space, and would quote the text around it.
    "raw-url": f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/postgres",
    # No space: libpq "parses" it, with password pieces as host and port.
    "raw-url-no-space": "postgresql://postgres:Kq7vX/Wm3zR@Jt9pL@127.0.0.1:5432/postgres",
    "unquoted-keyword": f"host=127.0.0.1 dbname=postgres user=postgres password={PASSWORD}",
}
UNREACHABLE = f"postgresql://postgres:{ENCODED}@127.0.0.1:1/postgres"


def leaks(texts: list[str]) -> list[str]:
    """The password, its encoded form or any of its pieces found in `texts`."""
    found = []
    for text in texts:
        for needle in [PASSWORD, ENCODED, *TOKENS]:
            if needle in text:
                found.append(f"{needle!r} in {text[:200]!r}")
    return found


def run_and_collect(
    world: PgWorld, caplog: pytest.LogCaptureFixture
) -> tuple[object, list[str], BaseException | None]:
    """Run a dry run; everything a person could read afterwards, and the run's exception."""
    params = DbPoolParams(guard=TerminationGuard(database=world.database, idle_minutes=1 / 60))
    with caplog.at_level(logging.DEBUG):
        state = db_pool_exhausted(params, return_state=True)
    run_id = state.state_details.flow_run_id
    error: BaseException | None = None
    try:
        state.result()
    except Exception as exc:
        error = exc
    texts = [
        caplog.text,
        *flow_run_logs(run_id),
        *flow_run_artifacts(run_id),
        str(state.message),
        *task_run_states(run_id),
        repr(error),
        str(error),
    ]
    return state, texts, error


@pytest.mark.parametrize("form", sorted(GOOD))
def test_password_in_a_dsn_never_shows(
    form: str, pg_env: PgWorld, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("RUNBOOKS_PG_DSN", GOOD[form])
    state, texts, _ = run_and_collect(pg_env, caplog)
    assert state.is_completed()  # type: ignore[attr-defined]
    assert any("127.0.0.1:5432/postgres" in t for t in texts)  # the scan saw the run's text
    assert leaks(texts) == []


def test_password_in_a_secret_block_never_shows(
    pg_env: PgWorld, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    Secret(value=GOOD["url"]).save("rb-test-pg-dsn", overwrite=True)
    monkeypatch.setenv("RUNBOOKS_PG_DSN", "postgresql://nobody@127.0.0.1:1/none")
    monkeypatch.setenv("RUNBOOKS_PG_DSN_SECRET_BLOCK", "rb-test-pg-dsn")
    state, texts, _ = run_and_collect(pg_env, caplog)
    assert state.is_completed()  # type: ignore[attr-defined]
    assert leaks(texts) == []


@pytest.mark.parametrize("form", sorted(MALFORMED))
def test_a_malformed_dsn_fails_with_a_fixed_message(
    form: str, pg_env: PgWorld, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("RUNBOOKS_PG_DSN", MALFORMED[form])
    state, texts, error = run_and_collect(pg_env, caplog)
    assert state.is_failed()  # type: ignore[attr-defined]
    assert isinstance(error, PermanentError)
    assert "DSN is malformed" in str(error)
    assert leaks(texts) == []


def test_a_malformed_dsn_in_a_secret_block_fails_with_a_fixed_message(
    pg_env: PgWorld, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    Secret(value=MALFORMED["raw-url-no-space"]).save("rb-test-pg-bad-dsn", overwrite=True)
    monkeypatch.setenv("RUNBOOKS_PG_DSN_SECRET_BLOCK", "rb-test-pg-bad-dsn")
    _state, texts, error = run_and_collect(pg_env, caplog)
    assert isinstance(error, PermanentError)
    assert leaks(texts) == []


def test_an_unreachable_server_fails_without_the_password(
    pg_env: PgWorld, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("RUNBOOKS_PG_DSN", UNREACHABLE)
    _state, texts, error = run_and_collect(pg_env, caplog)
    assert isinstance(error, TransientError)
    assert "127.0.0.1:1/postgres" in str(error)
    assert leaks(texts) == []
