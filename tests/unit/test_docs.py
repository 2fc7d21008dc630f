"""Project text names only files that exist in this repository (no design note elsewhere)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_MD_NAME = re.compile(r"(?<![\w./-])([\w./-]+\.md)\b")


def _tracked() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "*.py", "*.md", "*.yaml", "*.toml", "Makefile", "*.sh"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split()


TRACKED = _tracked()


@pytest.mark.parametrize("path", TRACKED)
def test_every_markdown_file_named_exists_here(path: str) -> None:
    text = (REPO / path).read_text(errors="replace")
    missing = sorted(
        {
            name
            for name in _MD_NAME.findall(text)
            if not any(
                t == name.lstrip("./") or t.endswith("/" + name.lstrip("./")) for t in TRACKED
            )
        }
    )
    assert missing == []


#: A path on somebody's machine (a home, a scratch checkout), not a file of this repository.
#: `~/.cache/...` and `~/.kube/config` stay allowed: they are where the code reads or writes.
_MACHINE_PATH = re.compile(r"(?<![\w.])/(?:work|home|root|Users)/")


@pytest.mark.parametrize("path", TRACKED)
def test_no_text_names_a_file_on_an_authors_machine(path: str) -> None:
    text = (REPO / path).read_text(errors="replace")
    found = [
        f"line {text.count(chr(10), 0, m.start()) + 1}: {text[m.start() : m.start() + 60]!r}"
        for m in _MACHINE_PATH.finditer(text)
    ]
    assert found == []
