"""The routing table: which firing alert starts which deployment, with which parameters.

YAML (see `routing.yaml` and docs/triggers.md)::

    routes:
      - alertname: DatabaseConnectionPoolExhausted
        match: {severity: critical}        # label == value (optional)
        match_re: {namespace: "prod-.*"}   # label fully matches regex (optional)
        deployment: db-pool-exhausted/db-pool-exhausted
        auto: false                        # false: the run only plans (dry_run forced on)
        params:
          database: "${datname:-}"         # ${label}, ${label:-default}

The first route that matches wins. The table is validated when the receiver starts: unknown
deployments, bad regexes, templates and parameters the runbook's model rejects all stop the
start-up, so a typo is found at deploy time and not at 3 a.m.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deployments.catalog import Runbook, by_deployment

_TEMPLATE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class MissingLabel(ValueError):
    """A parameter template names a label the alert does not carry (and has no default)."""


class Route(BaseModel):
    """One row of the routing table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alertname: str = Field(min_length=1, description="Alertmanager `alertname` label.")
    match: dict[str, str] = Field(default_factory=dict, description="Labels that must equal.")
    match_re: dict[str, str] = Field(
        default_factory=dict, description="Labels that must fully match these regexes."
    )
    deployment: str = Field(description="`<flow-name>/<deployment-name>` to start.")
    auto: bool = Field(
        False, description="May act without a human; false forces the runbook's dry run."
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="Fields of the runbook's `params`; `${label}` works."
    )

    @field_validator("match", "match_re")
    @classmethod
    def _label_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _LABEL_NAME.fullmatch(name):
                raise ValueError(f"invalid label name {name!r}")
        return value

    @field_validator("match_re")
    @classmethod
    def _regexes(cls, value: dict[str, str]) -> dict[str, str]:
        for name, pattern in value.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"match_re[{name}]: {exc}") from None
        return value

    def matches(self, labels: Mapping[str, str]) -> bool:
        """True when the alert's labels satisfy this route (Alertmanager-style matchers)."""
        if labels.get("alertname") != self.alertname:
            return False
        if any(labels.get(k) != v for k, v in self.match.items()):
            return False
        return all(re.fullmatch(p, labels.get(k, "")) for k, p in self.match_re.items())


class RoutingTable(BaseModel):
    """All routes, in order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    routes: list[Route] = Field(default_factory=list)

    def route_for(self, labels: Mapping[str, str]) -> Route | None:
        """The first matching route, or None when the alert is not ours to handle."""
        return next((r for r in self.routes if r.matches(labels)), None)


def render(value: Any, labels: Mapping[str, str]) -> Any:
    """Fill `${label}` / `${label:-default}` in strings (recursively in lists and dicts)."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in labels:
                return labels[name]
            if default is not None:
                return default
            raise MissingLabel(f"label {name!r} is not on the alert")

        return _TEMPLATE.sub(sub, value)
    if isinstance(value, list):
        return [render(v, labels) for v in value]
    if isinstance(value, dict):
        return {k: render(v, labels) for k, v in value.items()}
    return value


def build_params(route: Route, runbook: Runbook, labels: Mapping[str, str]) -> dict[str, Any]:
    """The `params` value for the run: templated, dry run forced unless `auto`, validated.

    Raises `MissingLabel` or pydantic's `ValidationError`; nothing is started then.
    """
    params = render(dict(route.params), labels)
    if not route.auto and runbook.dry_run_field:
        params[runbook.dry_run_field] = True
    model = runbook.params_model()
    return model.model_validate(params).model_dump(mode="json")


def load_routing(path: Path, runbooks: tuple[Runbook, ...]) -> RoutingTable:
    """Read and validate the table against the catalog; raises ValueError on any problem."""
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        table = RoutingTable.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(f"{path}: {exc}") from None
    validate_routing(table, runbooks, source=str(path))
    return table


def validate_routing(table: RoutingTable, runbooks: tuple[Runbook, ...], source: str) -> None:
    """Check deployments, dry-run capability and parameters with placeholder labels."""
    index = by_deployment(runbooks)
    problems: list[str] = []
    for n, route in enumerate(table.routes):
        where = f"{source}: route {n} ({route.alertname})"
        runbook = index.get(route.deployment)
        if runbook is None:
            problems.append(f"{where}: unknown deployment {route.deployment!r}")
            continue
        if runbook.dry_run_field:
            fields = runbook.params_model().model_fields
            if runbook.dry_run_field not in fields:
                problems.append(f"{where}: runbook has no field {runbook.dry_run_field!r}")
                continue
            if runbook.dry_run_field in route.params:
                problems.append(f"{where}: set `auto`, not params.{runbook.dry_run_field}")
                continue
        # Every template must render and validate with sample labels.
        sample = _SampleLabels()
        try:
            build_params(route, runbook, sample)
        except (ValidationError, MissingLabel, TypeError) as exc:
            problems.append(f"{where}: params invalid: {exc}")
    if problems:
        raise ValueError("routing table invalid:\n  " + "\n  ".join(problems))


class _SampleLabels(dict[str, str]):
    """Labels that have every name, so each template renders during validation."""

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str)

    def __missing__(self, key: str) -> str:
        return "1"  # valid for str, int, float and bool fields alike
