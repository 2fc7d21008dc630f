"""Integration-wide fixtures: approval pauses notice a resume within a fraction of a second."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# Prefect's in-process pause sleeps `poll_interval` before it first looks for a resume, then
# between looks. The runbooks poll every min(5, timeout // 4) s, so each approval a test
# gives cost up to 5 s of sleep after the answer was in. Tests answer at once: polling every
# 0.2 s gives them the same outcome in a fraction of that. Timeouts are unchanged (Prefect's
# loop still ends at `timeout`), so a form nobody answers still times out when it should.
FAST_POLL_S = 0.2
PAUSING_MODULES = ("flows.approval", "flows.post_incident", "flows.escalate")


def _fast(pause: Callable[..., Any]) -> Callable[..., Any]:
    def pause_flow_run(*args: Any, **kwargs: Any) -> Any:
        kwargs["poll_interval"] = min(kwargs.get("poll_interval", FAST_POLL_S), FAST_POLL_S)
        return pause(*args, **kwargs)

    return pause_flow_run


@pytest.fixture(scope="session", autouse=True)
def fast_pause_polls() -> Iterator[None]:
    """Every runbook's `pause_flow_run` polls every 0.2 s for the session."""
    with pytest.MonkeyPatch.context() as mp:
        for name in PAUSING_MODULES:
            module = importlib.import_module(name)
            mp.setattr(module, "pause_flow_run", _fast(module.pause_flow_run))
        yield
