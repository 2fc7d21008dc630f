"""uv.lock pins what pyproject.toml asks for, and `make setup` installs exactly that lock."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
#: `make setup` puts uv next to the venv's python.
UV = Path(sys.executable).parent / "uv"
#: Packages of the venv itself (seeded by `python -m venv`, or the bootstrap), not of the lock.
NOT_LOCKED = {"pip", "setuptools", "uv"}

Key = tuple[str, tuple[str, ...], SpecifierSet, str]


def _key(name: str, extras: list[str], specifier: str, marker: str) -> Key:
    return (canonicalize_name(name), tuple(sorted(extras)), SpecifierSet(specifier), marker)


def _show(key: Key) -> str:
    """A key as a requirement line, e.g. `pytest>=8; extra == 'dev'`."""
    name, extras, specifier, marker = key
    return (
        name
        + (f"[{','.join(extras)}]" if extras else "")
        + str(specifier)
        + (f"; {marker}" if marker else "")
    )


def _wanted(pyproject: dict[str, Any]) -> set[Key]:
    """Every requirement of pyproject.toml, the optional ones with their `extra == ...` marker."""
    project = pyproject["project"]
    groups: list[tuple[str, list[str]]] = [("", project["dependencies"])]
    groups += [
        (f"extra == '{extra}'", reqs) for extra, reqs in project["optional-dependencies"].items()
    ]
    keys = set()
    for marker, reqs in groups:
        for text in reqs:
            req = Requirement(text)
            keys.add(_key(req.name, list(req.extras), str(req.specifier), marker))
    return keys


def _root(lock: dict[str, Any]) -> dict[str, Any]:
    roots: list[dict[str, Any]] = [
        p for p in lock["package"] if p.get("source") == {"editable": "."}
    ]
    assert len(roots) == 1, "uv.lock has no (or more than one) entry for this project"
    return roots[0]


def _locked(lock: dict[str, Any]) -> set[Key]:
    """The requirements uv.lock was resolved for (its record of pyproject.toml)."""
    return {
        _key(r["name"], r.get("extras", []), r.get("specifier", ""), r.get("marker", ""))
        for r in _root(lock)["metadata"]["requires-dist"]
    }


def _stale(pyproject: dict[str, Any], lock: dict[str, Any]) -> list[str]:
    """What differs between pyproject.toml and the lock's record of it (empty: up to date)."""
    wanted, locked = _wanted(pyproject), _locked(lock)
    diff = [f"pyproject.toml only: {_show(k)}" for k in wanted - locked]
    diff += [f"uv.lock only: {_show(k)}" for k in locked - wanted]
    if lock["requires-python"] != pyproject["project"]["requires-python"]:
        diff.append(f"requires-python: {lock['requires-python']}")
    return sorted(diff)


def _load(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


PYPROJECT = _load(REPO / "pyproject.toml")
LOCK = _load(REPO / "uv.lock")
PYPROJECT_TEXT = (REPO / "pyproject.toml").read_text()


def _edit(text: str) -> str:
    """pyproject.toml with a narrower prefect range and one more dependency."""
    edited = text.replace('"prefect>=3.9.1,<3.10",', '"prefect>=3.9.1,<3.9.5",\n    "tomli-w>=1",')
    assert edited != text
    return edited


def test_the_lock_records_every_requirement_of_pyproject_toml() -> None:
    assert _stale(PYPROJECT, LOCK) == [], "uv.lock is stale: run `make lock`"


def test_the_record_check_sees_a_changed_range_and_a_new_dependency() -> None:
    assert _stale(tomllib.loads(_edit(PYPROJECT_TEXT)), LOCK) == [
        "pyproject.toml only: prefect<3.9.5,>=3.9.1",
        "pyproject.toml only: tomli-w>=1",
        "uv.lock only: prefect<3.10,>=3.9.1",
    ]


def _uv_check(tmp_path: Path, pyproject_text: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pyproject.toml").write_text(pyproject_text)
    shutil.copy(REPO / "uv.lock", tmp_path / "uv.lock")
    return subprocess.run(
        [str(UV), "lock", "--check", "--offline", "--directory", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_uv_finds_the_lock_up_to_date(tmp_path: Path) -> None:
    done = _uv_check(tmp_path, PYPROJECT_TEXT)
    assert done.returncode == 0, done.stderr


def test_uv_refuses_the_lock_once_pyproject_toml_changes(tmp_path: Path) -> None:
    done = _uv_check(tmp_path, _edit(PYPROJECT_TEXT))
    assert done.returncode != 0


def test_this_venv_holds_exactly_the_locked_versions() -> None:
    locked: dict[str, set[str]] = {}
    for p in LOCK["package"]:
        locked.setdefault(canonicalize_name(p["name"]), set()).add(p["version"])
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    off = {
        name: (version, sorted(locked.get(name, [])))
        for name, version in installed.items()
        if name not in NOT_LOCKED and version not in locked.get(name, set())
    }
    assert off == {}, "the venv is not the lock's: run `make setup`"
    # The key runtime pins (the versions the runbooks were tested with).
    for name in ("prefect", "psycopg", "kubernetes", "pydantic", "fastapi", "httpx"):
        assert name in installed


def _dry_run(workdir: Path) -> str:
    """The commands `make setup` would run for a fresh venv in `workdir`."""
    done = subprocess.run(
        ["make", "-n", "setup", "VENV=fresh-venv"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def test_make_setup_installs_from_the_lock_only_after_checking_it() -> None:
    lines = _dry_run(REPO).splitlines()
    check = [i for i, line in enumerate(lines) if re.search(r"\buv lock --check\b", line)]
    sync = [i for i, line in enumerate(lines) if re.search(r"\buv sync\b", line)]
    assert len(check) == 1 and len(sync) == 1, lines
    assert check[0] < sync[0], "the lock is checked before anything is installed from it"
    assert re.search(r" --(frozen|locked)\b", lines[sync[0]]) and "--extra dev" in lines[sync[0]]
    assert "--inexact" not in lines[sync[0]], "packages not in the lock are removed"
    # Nothing else installs a dependency: only the bootstrap of uv itself (pinned).
    others = [ln for ln in lines if re.search(r"\bpip install\b", ln)]
    assert len(others) == 1 and re.search(r" uv==[\d.]+$", others[0]), others
    for target in ("run", "test", "test-fast", "lint"):
        rule = re.search(rf"^{re.escape(target)}:(.*)$", (REPO / "Makefile").read_text(), re.M)
        assert rule and "setup" in rule.group(1).split(), target


def test_a_changed_lock_means_a_new_install(tmp_path: Path) -> None:
    for name in ("Makefile", "pyproject.toml", "uv.lock"):
        shutil.copy(REPO / name, tmp_path / name)

    def stamp() -> str:
        found: list[str] = re.findall(r"touch (fresh-venv/\.installed-\w+)", _dry_run(tmp_path))
        assert len(found) == 1
        return found[0]

    before = stamp()
    with (tmp_path / "uv.lock").open("a") as f:
        f.write("\n")
    assert stamp() != before
