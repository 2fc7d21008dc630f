"""deployments/prefect.yaml is generated from the catalog, is current, and Prefect reads it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.cli.deploy._models import PrefectYamlModel

from deployments.catalog import RUNBOOKS
from deployments.prefect_yaml import PREFECT_YAML

REPO = Path(__file__).resolve().parents[2]


def _generate(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m deployments.prefect_yaml` as `make prefect-yaml` runs it (no env override)."""
    env = {k: v for k, v in os.environ.items() if k != "RUNBOOKS_POOL_CHECK_INTERVAL_S"}
    return subprocess.run(
        [sys.executable, "-m", "deployments.prefect_yaml", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _declared() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load(PREFECT_YAML.read_text())
    return {d["name"]: d for d in doc["deployments"]}


def test_committed_prefect_yaml_is_current() -> None:
    check = _generate("--check")
    assert check.returncode == 0, check.stderr


def test_check_reports_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "prefect.yaml"
    stale.write_text(PREFECT_YAML.read_text().replace("cert_replace.py", "cert_expiry.py"))
    check = _generate("--check", "--output", str(stale))
    assert check.returncode == 1
    assert "make prefect-yaml" in check.stderr


def test_generating_writes_the_catalog(tmp_path: Path) -> None:
    out = tmp_path / "prefect.yaml"
    assert _generate("--output", str(out)).returncode == 0
    assert out.read_text() == PREFECT_YAML.read_text()


def test_prefect_accepts_the_file() -> None:
    model = PrefectYamlModel.model_validate(yaml.safe_load(PREFECT_YAML.read_text()))
    assert [d.name for d in model.deployments] == [rb.name for rb in RUNBOOKS]


def test_prefect_yaml_declares_exactly_the_catalog() -> None:
    assert set(_declared()) == {rb.name for rb in RUNBOOKS}


@pytest.mark.parametrize("rb", RUNBOOKS, ids=lambda rb: rb.name)
def test_each_deployment_matches_its_runbook(rb: Any) -> None:
    d = _declared()[rb.name]
    module, _, function = rb.entrypoint.partition(":")
    assert d["entrypoint"] == f"{module.replace('.', '/')}.py:{function}"
    assert (REPO / d["entrypoint"].partition(":")[0]).is_file()
    assert rb.load().name == rb.name  # deployment "<flow-name>/<flow-name>"
    assert d["description"] == rb.description
    assert d["tags"] == list(rb.tags)
    assert d["concurrency_limit"] == rb.concurrency_limit
    schedules = d["schedules"]
    if rb.interval_s is not None:
        assert schedules == [{"interval": rb.interval_s}]
    elif rb.cron is not None:
        assert schedules == [{"cron": rb.cron, "timezone": "UTC"}]
    else:
        assert schedules == []
    pool = d["work_pool"]
    assert pool["name"] == "runbooks-k8s"
    assert pool["job_variables"]["service_account_name"] == rb.service_account
    assert pool["job_variables"]["image"] == "{{ $RUNBOOKS_IMAGE }}"  # shared part merged


def test_every_catalog_entry_names_its_service_account() -> None:
    """Who a runbook is in Kubernetes is a deliberate choice in its catalog entry, never the
    inherited default (prefect.yaml then carries it: test_each_deployment_matches_its_runbook)."""
    import ast

    tree = ast.parse((REPO / "deployments" / "catalog.py").read_text())
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Runbook"
    ]
    assert len(calls) == len(RUNBOOKS)
    for call in calls:
        assert "service_account" in {k.arg for k in call.keywords}, ast.unparse(call)[:80]


def _shipped_service_accounts() -> set[str]:
    names: set[str] = set()
    for path in (REPO / "deployments" / "k8s").rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "ServiceAccount":
                names.add(doc["metadata"]["name"])
    return names


@pytest.mark.parametrize("rb", RUNBOOKS, ids=lambda rb: rb.name)
def test_every_service_account_is_shipped_in_the_manifests(rb) -> None:
    assert rb.service_account in _shipped_service_accounts()
