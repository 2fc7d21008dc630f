"""The Dockerfile gives deployments/prefect.yaml what it assumes: code at /opt/runbooks.

No container engine runs here, so the image is never built in these tests: they read the
Dockerfile and check it against prefect.yaml's pull step and entrypoints, the locked install,
the non-root user, and that no secret is baked in.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


DOCKER = instructions(DOCKERFILE.read_text())


def _all(kind: str) -> list[str]:
    return [args for word, args in DOCKER if word == kind]


def _copied_paths() -> set[str]:
    """Destination paths under the WORKDIR of every `COPY <src> ./<dst>` (files and dirs)."""
    out = set()
    for args in _all("COPY"):
        *sources, dest = shlex.split(args)
        for src in sources:
            out.add(src.rstrip("/") if dest.rstrip("/") in (".", "./") else dest.strip("./"))
    return out


def _pull_directory() -> str:
    doc = yaml.safe_load(PREFECT_YAML.read_text())
    (step,) = doc["pull"]
    return str(step["prefect.deployments.steps.set_working_directory"]["directory"])


def test_the_parser_sees_the_instructions() -> None:
    kinds = [word for word, _ in instructions("FROM a\n# c\nRUN x \\\n  y\nUSER 1\n")]
    assert kinds == ["FROM", "RUN", "USER"]
    assert instructions("RUN a \\\n b")[0] == ("RUN", "a   b")


def test_based_on_the_python_the_project_requires() -> None:
    (base,) = _all("FROM")
    assert base == "python:3.11-slim"
    assert 'requires-python = ">=3.11"' in (REPO / "pyproject.toml").read_text()


def test_the_workdir_is_prefect_yaml_pull_directory() -> None:
    assert _pull_directory() == "/opt/runbooks"
    assert _all("WORKDIR") == [_pull_directory()]


def test_every_entrypoint_is_copied_into_the_image() -> None:
    copied = _copied_paths()
    doc = yaml.safe_load(PREFECT_YAML.read_text())
    for deployment in doc["deployments"]:
        path = deployment["entrypoint"].partition(":")[0]
        assert (REPO / path).is_file(), path
        assert path.split("/")[0] in copied, f"{path} is not in the image (COPY {copied})"
    # The receiver's routing table and the modules it runs.
    assert {"deployments", "flows", "tasks"} <= copied


def test_installs_exactly_the_lock_without_dev_tools() -> None:
    runs = " ".join(_all("RUN"))
    syncs = re.findall(r"uv sync[^&]*", runs)
    assert syncs and all("--frozen" in s for s in syncs), syncs
    assert not any("--extra" in s or "--all-extras" in s for s in syncs)
    assert {"pyproject.toml", "uv.lock"} <= _copied_paths()
    makefile_uv = re.search(r"^UV_VERSION := (\S+)", (REPO / "Makefile").read_text(), re.M)
    assert makefile_uv is not None
    assert f"UV_VERSION={makefile_uv.group(1)}" in _all("ARG")


def test_runs_as_a_numeric_non_root_user() -> None:
    users = _all("USER")
    assert users, "no USER: the container would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]
    # The receiver's Deployment pins the same user (runAsNonRoot needs a number).
    deployment = yaml.safe_load(
        (REPO / "deployments/k8s/receiver/instance/deployment.yaml").read_text()
    )
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)


def test_no_secret_is_baked_in() -> None:
    settings = " ".join(_all("ENV") + _all("ARG"))
    for word in ("TOKEN", "PASSWORD", "SECRET", "AUTH_STRING", "API_KEY", "DSN", "SIGNING_KEY"):
        assert word not in settings.upper(), word
    copied = _copied_paths()
    assert not {".prefect", ".env", ".venv", ".git"} & copied


def test_no_entrypoint_so_the_workers_command_runs() -> None:
    assert _all("ENTRYPOINT") == []
    assert "deployments.cli" in _all("CMD")[-1]


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".prefect", ".git", "**/__pycache__", ".mypy_cache"} <= ignored
    # Nothing the Dockerfile copies is ignored.
    assert not _copied_paths() & ignored
