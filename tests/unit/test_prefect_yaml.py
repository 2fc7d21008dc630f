"""deployments/prefect.yaml declares exactly the catalog's deployments (names, code, limits)."""

from __future__ import annotations

from pathlib import Path

import yaml

from deployments.catalog import RUNBOOKS

PREFECT_YAML = Path(__file__).resolve().parents[2] / "deployments" / "prefect.yaml"


def test_prefect_yaml_matches_the_catalog() -> None:
    doc = yaml.safe_load(PREFECT_YAML.read_text())
    declared = {d["name"]: d for d in doc["deployments"]}
    assert set(declared) == {rb.name for rb in RUNBOOKS}
    for rb in RUNBOOKS:
        d = declared[rb.name]
        module, _, function = rb.entrypoint.partition(":")
        assert d["entrypoint"] == f"{module.replace('.', '/')}.py:{function}"
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
        assert pool["job_variables"]["service_account_name"] == "incident-runbooks"
