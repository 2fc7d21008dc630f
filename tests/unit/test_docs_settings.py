"""Every `RUNBOOKS_*` variable the docs name is one the code reads.

Settings classes read `<env_prefix><FIELD>`; a few variables are read directly (`os.environ`).
A setting renamed in code but not in the README, or documented but never read, fails here.
"""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

REPO = Path(__file__).resolve().parents[2]
_NAME = re.compile(r"\bRUNBOOKS_[A-Z0-9_]*[A-Z0-9]\b")
MODULES = [
    "tasks.settings",
    "tasks.acme",
    "tasks.contacts",
    "tasks.approvals.signing",
    "tasks.pool_sizing",
    "deployments.settings",
]


def _read_by_settings() -> set[str]:
    names: set[str] = set()
    for module_name in MODULES:
        for _, cls in inspect.getmembers(importlib.import_module(module_name), inspect.isclass):
            if issubclass(cls, BaseSettings) and cls is not BaseSettings:
                prefix = str(cls.model_config.get("env_prefix", ""))
                names |= {f"{prefix}{field}".upper() for field in cls.model_fields}
    return names


def _tracked(*patterns: str) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", *patterns], cwd=REPO, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def _named_in(paths: list[str]) -> set[str]:
    return {n for p in paths for n in _NAME.findall((REPO / p).read_text(errors="replace"))}


READ = _read_by_settings() | _named_in(
    _tracked("tasks/*.py", "flows/*.py", "deployments/*.py", "Makefile", "scripts/*")
)
DOCS = _tracked("*.md")


def test_the_settings_scan_finds_the_known_names() -> None:
    assert {"RUNBOOKS_PG_DSN", "RUNBOOKS_RECEIVER_MAX_AGE_S", "RUNBOOKS_K8S_NAMESPACE"} <= READ


@pytest.mark.parametrize("doc", DOCS)
def test_every_variable_a_doc_names_is_read_by_the_code(doc: str) -> None:
    named = _named_in([doc])
    # A name ending in "_" or "*" is a prefix ("RUNBOOKS_PG_*"); the pattern skips those.
    assert sorted(named - READ) == []
