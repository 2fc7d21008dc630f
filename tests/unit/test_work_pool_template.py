"""deployments/k8s/work-pool/base-job-template.json, rendered for every deployment of prefect.yaml.

The template is prefect-kubernetes 0.8.0's default base job template with the runbooks'
settings Secret (`envFrom`) and a restricted security context added
(docs/scale-out-kubernetes.md). Each deployment's job variables are applied with Prefect's
own templating (tests/fixtures/work_pool.py); the Job each run would get must carry the
runbook's ServiceAccount, the settings Secret, and no setting's value.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
from prefect.utilities.templating import find_placeholders

from deployments.catalog import RUNBOOKS
from tests.fixtures.work_pool import (
    IMAGE,
    PREFECT_YAML,
    SETTINGS_SECRET,
    TEMPLATE_PATH,
    deployments,
    job_configuration,
    job_manifest,
    job_variables,
    template,
)

DEPLOYMENTS = deployments()
SERVICE_ACCOUNTS = {rb.name: rb.service_account for rb in RUNBOOKS}
#: The paths prefect-kubernetes 0.8.0 (`_get_base_job_manifest`) refuses a template without,
#: with these values: the worker will not start a run from a template that lacks one.
WORKER_REQUIRED = {
    ("apiVersion",): "batch/v1",
    ("kind",): "Job",
    ("spec", "template", "spec", "parallelism"): 1,
    ("spec", "template", "spec", "completions"): 1,
    ("spec", "template", "spec", "restartPolicy"): "Never",
}
#: Shapes of credentials that must never be written into the template or the job variables.
SECRET_SHAPES = re.compile(
    r"postgres(ql)?(\+\w+)?://|rediss?://[^\"]*@|xox[abp]-|Bearer |://[^/\"\s]+:[^@/\"\s]+@",
    re.IGNORECASE,
)


@pytest.fixture(autouse=True)
def _image(monkeypatch: pytest.MonkeyPatch) -> None:
    """`prefect deploy` reads `{{ $RUNBOOKS_IMAGE }}` from the environment."""
    monkeypatch.setenv("RUNBOOKS_IMAGE", IMAGE)


def _pod(manifest: dict[str, Any]) -> dict[str, Any]:
    pod = manifest["spec"]["template"]["spec"]
    assert isinstance(pod, dict)
    return pod


def check_job(manifest: dict[str, Any], service_account: str) -> None:
    """What every run's Job must hold; raises AssertionError naming what it lacks."""
    assert find_placeholders(manifest) == set(), "a placeholder was left unrendered"
    pod = _pod(manifest)
    assert pod["serviceAccountName"] == service_account
    (container,) = pod["containers"]
    assert container.get("envFrom") == [{"secretRef": {"name": SETTINGS_SECRET}}]
    # The Dockerfile's user; runAsNonRoot lets the kubelet refuse an image that runs as root.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    if context.get("readOnlyRootFilesystem"):
        # PREFECT_HOME (/tmp/prefect, Dockerfile) must stay writable.
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
    # The settings come only from the Secret: no RUNBOOKS_* value is written into the Job.
    env = container.get("env", {})
    assert not [name for name in env if name.startswith("RUNBOOKS_")]


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_every_deployment_renders_a_job_with_its_account_and_the_settings_secret(
    deployment: dict[str, Any],
) -> None:
    values = job_variables(deployment)
    manifest = job_manifest(values)
    check_job(manifest, SERVICE_ACCOUNTS[deployment["name"]])
    (container,) = _pod(manifest)["containers"]
    assert container["image"] == IMAGE
    assert container["imagePullPolicy"] == values["image_pull_policy"]
    assert manifest["metadata"]["namespace"] == values["namespace"] == "default"
    # The job variables' env reaches the container (the worker turns it into a list).
    assert container["env"] == values["env"]
    assert container["env"]["PREFECT_HOME"] == "/tmp/prefect"


def test_every_catalog_runbook_is_rendered() -> None:
    assert {d["name"] for d in DEPLOYMENTS} == set(SERVICE_ACCOUNTS)
    # More than one identity: a template that ignored service_account_name would show.
    assert len({SERVICE_ACCOUNTS[d["name"]] for d in DEPLOYMENTS}) > 5


def test_the_job_configuration_keeps_the_workers_fields() -> None:
    values = job_variables(DEPLOYMENTS[0])
    config = job_configuration(values)
    assert config["namespace"] == values["namespace"]
    assert config["env"] == values["env"]
    assert config["stream_output"] is True
    manifest = config["job_manifest"]
    for path, value in WORKER_REQUIRED.items():
        node: Any = manifest
        for key in path:
            node = node[key]
        assert node == value, path
    assert _pod(manifest)["containers"][0]["name"] == "prefect-job"


def test_every_job_variable_prefect_yaml_sets_is_a_template_variable() -> None:
    properties = template()["variables"]["properties"]
    for deployment in DEPLOYMENTS:
        values = job_variables(deployment)
        assert set(values) <= set(properties), deployment["name"]
        assert values["image_pull_policy"] in properties["image_pull_policy"]["enum"]


def test_no_credential_is_written_in_the_template_or_prefect_yaml() -> None:
    for path in (TEMPLATE_PATH, PREFECT_YAML):
        text = path.read_text()
        assert not SECRET_SHAPES.search(text), path
        assert "RUNBOOKS_" not in text.replace("RUNBOOKS_IMAGE", ""), path
    # The Secret is referenced by name only: no key, no value.
    assert SETTINGS_SECRET in TEMPLATE_PATH.read_text()


def test_secret_shapes_are_caught() -> None:
    for literal in (
        "postgresql://runbooks:hunter2@db:5432/app",
        "postgresql+asyncpg://u:p@h/d",
        "redis://:pw@redis:6379/0",
        "xoxb-123",
        "https://user:pass@host/",
    ):
        assert SECRET_SHAPES.search(json.dumps({"value": literal})), literal
    assert not SECRET_SHAPES.search("http://prefect-server.prefect.svc.cluster.local:4200/api")


@pytest.mark.parametrize(
    "breakage",
    ["no-envFrom", "fixed-service-account", "root", "escalation", "literal-setting"],
)
def test_a_template_that_breaks_a_promise_is_caught(breakage: str) -> None:
    base = template()
    pod = base["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    if breakage == "no-envFrom":
        del container["envFrom"]
    elif breakage == "fixed-service-account":
        pod["serviceAccountName"] = "incident-runbooks"
    elif breakage == "root":
        pod["securityContext"]["runAsUser"] = 0
    elif breakage == "literal-setting":
        base["variables"]["properties"]["env"]["default"] = {"RUNBOOKS_PG_DSN": "x"}
    elif breakage == "escalation":
        container["securityContext"]["allowPrivilegeEscalation"] = True
    deployment = next(d for d in DEPLOYMENTS if d["name"] == "cert-renew")
    values = copy.deepcopy(job_variables(deployment))
    if breakage == "literal-setting":
        # A variable default reaches the Job only where the deployment sets no env.
        del values["env"]
    with pytest.raises(AssertionError):
        check_job(job_manifest(values, base), SERVICE_ACCOUNTS["cert-renew"])


def test_the_prefect_server_accepts_the_template_for_a_pool() -> None:
    # The validation `prefect work-pool create --base-job-template` meets at the server:
    # every placeholder of job_configuration must be a declared variable.
    from prefect.server.schemas.actions import WorkPoolCreate

    WorkPoolCreate(name="runbooks-k8s", type="kubernetes", base_job_template=template())
    bad = template()
    pod = bad["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    pod["serviceAccountName"] = "{{ service_account }}"
    with pytest.raises(ValueError, match="undeclared variable"):
        WorkPoolCreate(name="runbooks-k8s", type="kubernetes", base_job_template=bad)
