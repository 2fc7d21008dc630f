# Two commands for a newcomer: `make run` and `make test`. Both set everything up first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# uv resolves and installs from uv.lock; pinned, because it is also what writes uv.lock.
UV_VERSION := 0.13.9
UV := UV_PROJECT_ENVIRONMENT=$(abspath $(VENV)) $(VENV)/bin/uv
# A new stamp (so a re-install) whenever the ranges, the pins or uv itself change.
STAMP := $(VENV)/.installed-$(shell { echo $(UV_VERSION); cat pyproject.toml uv.lock; } | sha1sum | cut -c1-12)
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup lock system-deps kube lint test test-fast run bench demo drill clean prefect-yaml docs-tables screenshots

define uv_bootstrap
	@test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip uv==$(UV_VERSION)
endef

# Exactly the versions of uv.lock (the project itself editable, with the dev extra); packages
# not in the lock are removed. A uv.lock older than pyproject.toml stops here: `make lock`.
$(STAMP): pyproject.toml uv.lock
	$(uv_bootstrap)
	@$(UV) lock --check -q || { echo "uv.lock does not match pyproject.toml:" \
	  "run 'make lock' and commit uv.lock (README: Updating dependencies)" >&2; exit 1; }
	$(UV) sync -q --frozen --extra dev
	@rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

# Re-pin after editing pyproject.toml (pins still in range stay); to move pins forward:
# make lock LOCK_ARGS='--upgrade-package prefect'  (or LOCK_ARGS=--upgrade for all of them).
lock:
	$(uv_bootstrap)
	$(UV) lock $(LOCK_ARGS)

# apt packages the tests drive for real (etcd, Alertmanager, Chromium, ...); idempotent.
system-deps:
	bash scripts/install-system-deps.sh

# kube-apiserver + kube-controller-manager built from Debian's source, cached in ~/.cache.
kube: system-deps
	bash scripts/build-kube.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .
	$(VENV)/bin/lint-imports

test: setup system-deps kube lint
	$(PY) -m pytest

# Unit tests and lint only: no services beyond PostgreSQL/Redis needed.
test-fast: setup lint
	$(PY) -m pytest tests/unit

run: setup
	$(PY) -m deployments.cli run

# deployments/prefect.yaml from deployments/catalog.py (with the default schedules);
# tests/unit/test_prefect_yaml.py fails while the committed file is stale.
prefect-yaml: setup
	env -u RUNBOOKS_POOL_CHECK_INTERVAL_S $(PY) -m deployments.prefect_yaml

# The runbook tables in README.md and docs/escalation.md from the specs and the catalog;
# tests/unit/test_docs_tables.py fails while they are stale.
docs-tables: setup
	env -u RUNBOOKS_POOL_CHECK_INTERVAL_S $(PY) -m deployments.docs_tables

# Refresh the Prefect UI screenshots in docs/ (`make test` writes them to a temporary folder);
# docs/img/drill-*.png: every drill run, the UI shot before the teardown (docs/drills.md).
screenshots: setup system-deps
	RUNBOOKS_SCREENSHOT_DIR=$(CURDIR)/docs $(PY) -m pytest tests/e2e/test_alert_to_run.py -k prefect_ui
	$(PY) -m drills --screenshots $(CURDIR)/docs/img

bench: setup
	for b in bench/*.py; do $(PY) $$b || exit 1; done

# The sandbox platform (PostgreSQL, Kubernetes API, backend, Prometheus), a bad :v2 rollout,
# high-error-rate acting on it unattended (dry_run off, auto_approve), its artifact; cleaned up.
demo: setup system-deps kube
	$(PY) scripts/demo.py

# Game day (drills/, docs/drills.md): `make drill` runs every drill, `make drill pool` one.
# Real Prometheus, postgres_exporter, Alertmanager and the `make run` stack; prints each
# timeline, the MTTR and a summary table; leaves nothing running.
ifeq (drill,$(firstword $(MAKECMDGOALS)))
DRILL_NAMES := $(wordlist 2,$(words $(MAKECMDGOALS)),$(MAKECMDGOALS))
$(eval $(DRILL_NAMES):;@:)
endif
drill: setup system-deps
	$(PY) -m drills $(DRILL_NAMES)

clean:
	rm -rf $(VENV) .prefect .mypy_cache .ruff_cache .pytest_cache
