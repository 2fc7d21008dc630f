"""docs/coverage.md names only flows, tasks and files that exist (it goes stale on a rename)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEXT = (REPO / "docs" / "coverage.md").read_text()

#: `tasks.postgres::terminate_sessions`, `more`, `names` (the list shares the module).
_TASKS = re.compile(r"`(tasks(?:\.\w+)+)::(\w+)`((?:, `\w+`)*)")
#: `flows/db_pool_exhausted.py` / `db_pool_exhausted`
_FLOWS = re.compile(r"`flows/(\w+)\.py` / `(\w+)`")
#: A file of the repository named as a path.
_PATHS = re.compile(r"`((?:deployments|flows|tasks)/[\w./-]+\.(?:py|yaml|yml))`")


def _named() -> list[tuple[str, str]]:
    found = []
    for module, first, rest in _TASKS.findall(TEXT):
        found += [(module, name) for name in [first, *re.findall(r"`(\w+)`", rest)]]
    found += [(f"flows.{module}", name) for module, name in _FLOWS.findall(TEXT)]
    return sorted(set(found))


NAMED = _named()


def test_the_doc_names_flows_and_tasks() -> None:
    # The patterns still match the doc's way of naming things (else the test below is empty).
    modules = {module for module, _ in NAMED}
    assert {"tasks.postgres", "tasks.kubernetes", "flows.db_pool_exhausted"} <= modules
    assert len(NAMED) > 40


@pytest.mark.parametrize(("module", "name"), NAMED, ids=[f"{m}::{n}" for m, n in NAMED])
def test_every_named_function_exists(module: str, name: str) -> None:
    assert hasattr(importlib.import_module(module), name)


@pytest.mark.parametrize("path", sorted(set(_PATHS.findall(TEXT))))
def test_every_named_file_exists(path: str) -> None:
    assert (REPO / path).is_file()


def test_the_reload_function_is_the_real_one() -> None:
    assert "pg_reload_conf()" in TEXT
    # Named only as the on-call runbook's mistake.
    assert all("does not exist" in line for line in TEXT.splitlines() if "pg_ctl_reload" in line)
