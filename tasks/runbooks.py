"""Facts about each runbook, by name, that more than one layer reads.

Today one fact: the parameter field that makes a run plan-only (its dry-run field). The
catalog (`deployments/catalog.py`) reads it to force plan-only runs from alert routes;
`post-incident` reads it to tell a dry run from an acting run in the run history. It lives
here, below both, because imports point downward only (deployments -> flows -> tasks): a
flow cannot import the catalog, and the catalog must not import every flow module.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

#: The field of a runbook not listed below.
DEFAULT_DRY_RUN_FIELD = "dry_run"

#: The dry-run field of each runbook of the catalog (dotted for a nested model); `None` = the
#: runbook never changes anything itself, so none of its runs is a dry run or an acting run.
DRY_RUN_FIELDS: Mapping[str, str | None] = MappingProxyType(
    {
        "db-pool-exhausted": "dry_run",
        # It changes nothing itself; the db-pool-exhausted run it may start plans or acts
        # as `remediation.dry_run` says.
        "pool-threshold": "remediation.dry_run",
        "cert-expiry": None,
        "cert-replace": "dry_run",
        "cert-renew": "dry_run",
        "high-latency": "dry_run",
        "escalate": None,
        "high-error-rate": "dry_run",
        "post-incident": None,
        "audit-retention": "dry_run",
    }
)


def dry_run_field(runbook: str) -> str | None:
    """The field that makes a run of `runbook` plan-only (`dry_run` unless declared above)."""
    return DRY_RUN_FIELDS.get(runbook, DEFAULT_DRY_RUN_FIELD)


def value_at(params: Mapping[str, Any], dotted: str) -> Any:
    """The value at a dotted path of nested parameter dicts; None where a level is missing."""
    node: Any = params
    for name in dotted.split("."):
        if not isinstance(node, Mapping) or name not in node:
            return None
        node = node[name]
    return node


def dry_run_of(runbook: str, params: Mapping[str, Any]) -> bool | None:
    """Whether a run of `runbook` with these `params` plans only: True, False, or None when
    the runbook has no dry-run field or the run's parameters do not say."""
    field = dry_run_field(runbook)
    value = value_at(params, field) if field else None
    return value if isinstance(value, bool) else None
