"""Write `deployments/prefect.yaml` from the catalog: `make prefect-yaml`.

`python -m deployments.prefect_yaml` rewrites the file; `--check` only compares and exits 1
when the committed file is stale (tests/unit/test_prefect_yaml.py runs the same comparison).
Never edit prefect.yaml by hand: change `deployments/catalog.py` and regenerate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deployments.catalog import RUNBOOKS, Runbook

PREFECT_YAML = Path(__file__).resolve().parent / "prefect.yaml"
#: The lowest Prefect the project supports (pyproject.toml); informational for Prefect.
PREFECT_VERSION = "3.9.1"
WORK_POOL = "runbooks-k8s"

HEADER = """\
# GENERATED from deployments/catalog.py by `make prefect-yaml`: do not edit by hand
# (tests/unit/test_prefect_yaml.py fails when this file is stale).
#
# The catalog's deployments for scale-out: a Kubernetes work pool whose worker
# (prefect-kubernetes) starts each run as a Job, under the runbook's own least-privilege
# ServiceAccount from deployments/k8s/ (`service_account_name`). The pool's base job
# template (deployments/k8s/work-pool/) gives every Job the runbooks' settings from the
# Secret incident-runbooks-settings: no setting's value is written here.
#
#   docker build -t registry.example/incident-runbooks:1.2.3 .   # the Dockerfile at the root
#   kubectl -n default create secret generic incident-runbooks-settings --from-env-file=...
#   prefect work-pool create runbooks-k8s --type kubernetes \\
#     --base-job-template deployments/k8s/work-pool/base-job-template.json
#   prefect worker start --pool runbooks-k8s   # in the cluster, with prefect-kubernetes
#   RUNBOOKS_IMAGE=registry.example/incident-runbooks:1.2.3 \\
#     prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml
#
# Deployment names stay "<flow-name>/<flow-name>", so the receiver's routing table and
# run_deployment() calls work unchanged against this server.
name: incident-runbooks
prefect-version: {version}

build: null
push: null

# The image (the repository's Dockerfile) carries the code at /opt/runbooks, installed from
# uv.lock with the project editable in place, so these entrypoints are files under it.
pull:
  - prefect.deployments.steps.set_working_directory:
      directory: /opt/runbooks

definitions:
  # What every run's Job shares; each deployment adds its ServiceAccount.
  job_variables: &job_variables
    image: "{{{{ $RUNBOOKS_IMAGE }}}}"
    namespace: default
    image_pull_policy: IfNotPresent
    env:
      DO_NOT_TRACK: "1"
      # The crash-zombie-runs automation expects a heartbeat well inside its window
      # (docs/triggers.md); Prefect's default of 180 s would mark live runs Crashed.
      PREFECT_FLOWS_HEARTBEAT_FREQUENCY: "30"
      # The Dockerfile's value, on the pod's /tmp emptyDir (the base job template's root
      # filesystem is read-only); set here because the worker copies its own PREFECT_HOME,
      # when it has one, into every Job and that would win over the image's.
      PREFECT_HOME: /tmp/prefect

deployments:
"""


def _q(value: object) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(value, ensure_ascii=False)


def entrypoint_path(rb: Runbook) -> str:
    """`flows.cert_replace:cert_replace` -> `flows/cert_replace.py:cert_replace`."""
    module, _, function = rb.entrypoint.partition(":")
    return f"{module.replace('.', '/')}.py:{function}"


def _schedules(rb: Runbook) -> list[str]:
    if rb.interval_s is not None:
        interval = int(rb.interval_s) if float(rb.interval_s).is_integer() else rb.interval_s
        return ["    schedules:", f"      - interval: {interval}"]
    if rb.cron is not None:
        return ["    schedules:", f"      - cron: {_q(rb.cron)}", "        timezone: UTC"]
    return ["    schedules: []"]


def _deployment(rb: Runbook) -> str:
    limit = "null" if rb.concurrency_limit is None else str(rb.concurrency_limit)
    lines = [
        f"  - name: {rb.name}",
        f"    entrypoint: {entrypoint_path(rb)}",
        f"    description: {_q(rb.description)}",
        f"    tags: [{', '.join(_q(t) for t in rb.tags)}]",
        f"    concurrency_limit: {limit}",
        *_schedules(rb),
        "    work_pool:",
        f"      name: {WORK_POOL}",
        "      work_queue_name: default",
        "      job_variables:",
        "        <<: *job_variables",
        f"        service_account_name: {_q(rb.service_account)}",
    ]
    return "\n".join(lines) + "\n"


def render(runbooks: tuple[Runbook, ...] = RUNBOOKS) -> str:
    """The whole prefect.yaml text for `runbooks`."""
    return HEADER.format(version=PREFECT_VERSION) + "\n".join(_deployment(rb) for rb in runbooks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    parser.add_argument("--output", type=Path, default=PREFECT_YAML)
    args = parser.parse_args(argv)
    text = render()
    current = args.output.read_text() if args.output.exists() else ""
    if args.check:
        if current != text:
            print(f"{args.output} is stale: run `make prefect-yaml`", file=sys.stderr)
            return 1
        return 0
    if current != text:
        args.output.write_text(text)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
