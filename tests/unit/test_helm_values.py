"""deployments/helm/*.yaml: the values of PrefectHQ's prefect-server and prefect-worker charts.

Helm is not installed here, so the charts are never rendered: these tests parse both files,
check each key set is one the chart has (CHART_KEYS, read from the chart release the files
name) and that the worker polls the work pool deployments/prefect.yaml's deployments use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.prefect_yaml import WORK_POOL

REPO = Path(__file__).resolve().parents[2]
HELM = REPO / "deployments" / "helm"
CHART_RELEASE = "2026.8.18172642"

#: Every key path the files may set, as charts/<chart>/values.yaml of prefect-helm release
#: CHART_RELEASE defines it (checked by hand against that file; add a key only from it).
CHART_KEYS = {
    "prefect-server": {
        "global.prefect.image.prefectTag",
        "server.basicAuth.enabled",
        "server.basicAuth.existingSecret",
        "server.automountServiceAccountToken",
        "server.uiConfig.prefectUiApiUrl",
        "server.env",
        "postgresql.enabled",
        "externalDatabase.existingSecret",
        "externalDatabase.connectionStringSecretKey",
        "sqlite.enabled",
    },
    "prefect-worker": {
        "worker.image.prefectTag",
        "worker.config.workPool",
        "worker.config.type",
        "worker.config.installPolicy",
        "worker.config.limit",
        "worker.config.baseJobTemplate.existingConfigMapName",
        "worker.apiConfig",
        "worker.selfHostedServerApiConfig.apiUrl",
        "worker.selfHostedServerApiConfig.basicAuth.enabled",
        "worker.selfHostedServerApiConfig.basicAuth.existingSecret",
    },
}


def values(chart: str) -> dict[str, Any]:
    doc = yaml.safe_load((HELM / f"{chart}-values.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def leaves(doc: Any, prefix: str = "") -> set[str]:
    """Dotted paths of the values set (a list or scalar is a leaf)."""
    if not isinstance(doc, dict):
        return {prefix}
    return {p for k, v in doc.items() for p in leaves(v, f"{prefix}.{k}" if prefix else k)}


def test_leaves() -> None:
    assert leaves({"a": {"b": 1, "c": [1]}, "d": None}) == {"a.b", "a.c", "d"}


@pytest.mark.parametrize("chart", sorted(CHART_KEYS))
def test_only_keys_the_chart_has(chart: str) -> None:
    assert leaves(values(chart)) <= CHART_KEYS[chart]


@pytest.mark.parametrize("chart", sorted(CHART_KEYS))
def test_the_file_names_the_chart_release_it_follows(chart: str) -> None:
    text = (HELM / f"{chart}-values.yaml").read_text()
    assert f"release {CHART_RELEASE}" in text
    assert f"--version {CHART_RELEASE}" in text


def test_the_worker_polls_the_pool_of_prefect_yaml() -> None:
    worker = values("prefect-worker")["worker"]
    assert worker["config"]["workPool"] == WORK_POOL
    assert worker["config"]["type"] == "kubernetes"
    doc = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    pools = {d["work_pool"]["name"] for d in doc["deployments"]}
    assert pools == {worker["config"]["workPool"]}


def test_worker_and_receiver_reach_the_server_chart_service() -> None:
    # The server chart's Service is its fullnameOverride (default prefect-server), port 4200.
    api = values("prefect-worker")["worker"]["selfHostedServerApiConfig"]["apiUrl"]
    assert api == "http://prefect-server.prefect.svc.cluster.local:4200/api"
    receiver = yaml.safe_load(
        (REPO / "deployments/k8s/receiver/instance/deployment.yaml").read_text()
    )
    env = {e["name"]: e for e in receiver["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["PREFECT_API_URL"]["value"] == api


def test_api_auth_comes_from_one_secret_never_a_literal() -> None:
    server = values("prefect-server")["server"]["basicAuth"]
    worker = values("prefect-worker")["worker"]["selfHostedServerApiConfig"]["basicAuth"]
    assert server["enabled"] and worker["enabled"]
    assert server["existingSecret"] == worker["existingSecret"] == "prefect-api-auth"
    assert "authString" not in server and "authString" not in worker
    receiver = yaml.safe_load(
        (REPO / "deployments/k8s/receiver/instance/deployment.yaml").read_text()
    )
    env = {e["name"]: e for e in receiver["spec"]["template"]["spec"]["containers"][0]["env"]}
    # The charts read key `auth-string` of basicAuth.existingSecret; the receiver the same.
    assert env["PREFECT_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"] == {
        "name": "prefect-api-auth",
        "key": "auth-string",
    }


def test_the_server_runs_on_postgresql_from_a_secret() -> None:
    server = values("prefect-server")
    assert server["sqlite"]["enabled"] is False
    assert server["postgresql"]["enabled"] is False  # the external database, below
    db = server["externalDatabase"]
    assert db["existingSecret"] and db["connectionStringSecretKey"]
    assert "connectionString" not in db and "password" not in db


def test_the_prefect_release_matches_the_lock() -> None:
    lock = (REPO / "uv.lock").read_text()
    start = lock.index('name = "prefect"\nversion = "')
    locked = lock[start:].split('"')[3]
    assert values("prefect-server")["global"]["prefect"]["image"]["prefectTag"].startswith(
        f"{locked}-python3.11"
    )
    assert values("prefect-worker")["worker"]["image"]["prefectTag"] == (
        f"{locked}-python3.11-kubernetes"
    )


def test_the_worker_reads_the_shipped_base_job_template() -> None:
    # The chart mounts key baseJobTemplate.json of worker.config.baseJobTemplate
    # .existingConfigMapName; deployments/k8s/work-pool generates that ConfigMap from the
    # template file `prefect work-pool create --base-job-template` takes.
    name = values("prefect-worker")["worker"]["config"]["baseJobTemplate"]["existingConfigMapName"]
    folder = REPO / "deployments" / "k8s" / "work-pool"
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    assert generator["name"] == name
    assert generator["options"]["disableNameSuffixHash"] is True
    assert generator["files"] == ["baseJobTemplate.json=base-job-template.json"]
    assert (folder / "base-job-template.json").is_file()
    # The ConfigMap must be where the worker runs: the runbooks' namespace.
    doc = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    assert {d["work_pool"]["job_variables"]["namespace"] for d in doc["deployments"]} == {
        kustomization["namespace"]
    }
