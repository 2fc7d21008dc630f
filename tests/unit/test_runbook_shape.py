"""Every runbook in the catalog publishes its audit report on every exit path.

The behaviour (a failing step, a refusal, a timeout still leave the artifact) is tested per
runbook against real systems; this check makes the next runbook start from the same shape:
its flow function runs inside `with publish_on_exit(...)`, which publishes in `finally`, or
hands the run to the driver (`flows.driver.drive`), which does so for it.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest

from deployments.catalog import RUNBOOKS, Runbook


def _publishes_on_exit(source: str) -> bool:
    for node in ast.walk(ast.parse(textwrap.dedent(source))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "drive":
            return True
        if isinstance(node, ast.With):
            for item in node.items:
                call = item.context_expr
                if isinstance(call, ast.Call) and getattr(call.func, "id", None) == (
                    "publish_on_exit"
                ):
                    return True
    return False


@pytest.mark.parametrize("rb", RUNBOOKS, ids=lambda rb: rb.name)
def test_the_flow_runs_inside_publish_on_exit(rb: Runbook) -> None:
    assert _publishes_on_exit(inspect.getsource(rb.load().fn))
