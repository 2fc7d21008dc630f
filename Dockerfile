# The image every runbook run (a Kubernetes Job started by the prefect-worker chart's worker)
# and the alert receiver (deployments/k8s/receiver) run from. docs/scale-out-kubernetes.md.
#
#   docker build -t registry.example/incident-runbooks:1.2.3 .
#
# Not built in this repository's CI (no container engine there): tests/unit/test_dockerfile.py
# checks that it matches what deployments/prefect.yaml assumes (code at /opt/runbooks, every
# entrypoint copied in), never that it builds.
FROM python:3.11-slim

# uv installs exactly the versions of uv.lock; the same pin as the Makefile's UV_VERSION.
ARG UV_VERSION=0.13.9

# Bytecode is compiled at build time: the root filesystem may be read-only at run time.
# PREFECT_HOME is outside the code, on a path a pod can mount an emptyDir at.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DO_NOT_TRACK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_HOME=/tmp/prefect \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    PATH=/opt/venv/bin:$PATH

RUN pip install --no-cache-dir "uv==${UV_VERSION}" \
    && groupadd --gid 10001 runbooks \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp runbooks

# deployments/prefect.yaml's pull step: `set_working_directory: /opt/runbooks`; the
# deployments' entrypoints (flows/<name>.py:<flow>) are relative to it.
WORKDIR /opt/runbooks

# Dependencies first (their layer is reused while only the code changes), the locked set
# without the dev extra; --frozen fails the build when uv.lock does not match pyproject.toml.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-install-project --no-cache

# The product code only: sandbox/, drills/, bench/ and tests/ stay out of the image. The
# project is installed editable (uv.lock: `source = { editable = "." }`), so the code runs
# from /opt/runbooks and finds deployments/routing.yaml beside it.
COPY deployments ./deployments
COPY flows ./flows
COPY tasks ./tasks
RUN uv sync --frozen --no-cache \
    && python -c "import deployments.cli, flows, tasks"

# Non-root, by number, so a pod's `runAsNonRoot: true` can verify it. The code is root's and
# read-only to this user. No secret is baked in: every credential comes from the pod's env.
USER 10001:10001

# No ENTRYPOINT: the worker's Jobs run their own command (`prefect flow-run execute`).
CMD ["python", "-m", "deployments.cli", "receiver"]
