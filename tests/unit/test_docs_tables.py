"""The docs' runbook tables are generated from the specs and the catalog, and kept current."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from deployments.catalog import RUNBOOKS
from deployments.docs_tables import ROOT, TABLES, identities, rewrite, severities


def test_committed_tables_are_current() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RUNBOOKS_POOL_CHECK_INTERVAL_S"}
    done = subprocess.run(
        [sys.executable, "-m", "deployments.docs_tables", "--check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def test_every_table_block_is_in_its_file() -> None:
    for rel, tables in TABLES.items():
        text = (ROOT / rel).read_text()
        for name in tables:
            assert f"<!-- generated: {name} -->" in text and f"<!-- end: {name} -->" in text


def test_a_spec_change_shows_in_the_tables() -> None:
    first = RUNBOOKS[0]
    quiet = dataclasses.replace(first, overrides={"severity": None})
    assert f"`{first.name}` {first.severity}/{first.topic}" in severities()
    assert f"`{first.name}`" not in severities((quiet,))
    assert f"| `{first.name}` | never |" in identities((quiet,))


def test_rewrite_replaces_only_its_block_and_refuses_a_missing_one() -> None:
    text = "a\n<!-- generated: t -->\nold\n<!-- end: t -->\nb\n"
    assert rewrite(text, "t", "new") == "a\n<!-- generated: t -->\nnew\n<!-- end: t -->\nb\n"
    with pytest.raises(ValueError, match="no <!-- generated: u -->"):
        rewrite(text, "u", "x")
