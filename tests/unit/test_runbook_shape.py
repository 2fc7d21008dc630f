"""Every runbook in the catalog publishes its audit report on every exit path.

The behaviour (a failing step, a refusal, a timeout still leave the artifact) is tested per
runbook against real systems; this check makes the next runbook start from the same shape:
its flow function runs inside `with publish_on_exit(...)`, which publishes in `finally`,
or calls the driver (`flows.driver.drive`), which does.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest

from deployments.catalog import RUNBOOKS, Runbook
from flows.driver import drive


def _publishes_on_exit(source: str) -> bool:
    for node in ast.walk(ast.parse(textwrap.dedent(source))):
        if isinstance(node, ast.With):
            for item in node.items:
                call = item.context_expr
                if isinstance(call, ast.Call) and getattr(call.func, "id", None) == (
                    "publish_on_exit"
                ):
                    return True
    return False


def _calls_drive(source: str) -> bool:
    return any(
        isinstance(node, ast.Call) and getattr(node.func, "id", None) == "drive"
        for node in ast.walk(ast.parse(textwrap.dedent(source)))
    )


def test_the_driver_runs_inside_publish_on_exit() -> None:
    assert _publishes_on_exit(inspect.getsource(drive))


@pytest.mark.parametrize("rb", RUNBOOKS, ids=lambda rb: rb.name)
def test_the_flow_runs_inside_publish_on_exit(rb: Runbook) -> None:
    source = inspect.getsource(rb.load().fn)
    assert _publishes_on_exit(source) or _calls_drive(source)
