"""The routing table: which firing alert starts which deployment, with which parameters.

YAML (see `routing.yaml` and docs/triggers.md)::

    routes:
      - alertname: DatabaseConnectionPoolExhausted
        match: {severity: critical}        # label == value (optional)
        match_re: {namespace: "prod-.*"}   # label fully matches regex (optional)
        deployment: db-pool-exhausted/db-pool-exhausted
        auto: false                        # false: the run only plans (dry_run forced on)
        cooldown: 10m                      # one run per alert (fingerprint) per 10 min
        params:
          guard: {database: "${datname?}"} # ${label}, ${label:-default}, ${label?}

The first route that matches wins. The table is validated when the receiver starts: unknown
deployments, bad regexes, templates and parameters the runbook's model rejects, and an
`auto: true` route using `${label?}` all stop the start-up, so a typo is found at deploy time
and not at 3 a.m.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from deployments.catalog import Runbook, by_deployment
from flows.spec import value_at

_TEMPLATE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_OPTIONAL = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\?\}")
_OMIT = object()
_LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ANY_OPTIONAL = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\?\}")
_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
DEFAULT_COOLDOWN = timedelta(minutes=10)


def _duration(value: Any) -> Any:
    """Alertmanager-style `10m`, `1h30m`, `45s`, or a number of seconds."""
    if isinstance(value, str):
        if value.strip().isdigit():
            return timedelta(seconds=int(value))
        m = _DURATION.fullmatch(value.strip())
        if m and any(m.groups()):
            h, mins, sec = (int(g or 0) for g in m.groups())
            return timedelta(hours=h, minutes=mins, seconds=sec)
    return value


#: A duration in routing.yaml: `10m`, `1h`, `90s`, `0` (no cooldown) or seconds.
Duration = Annotated[timedelta, BeforeValidator(_duration)]


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
        False,
        description="True: the run may act (dry run off); false: it only plans (dry run on).",
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="Fields of the runbook's `params`; `${label}` works."
    )
    cooldown: Duration = Field(
        DEFAULT_COOLDOWN,
        description="One alert (fingerprint) starts at most one run of this route per "
        "cooldown, whatever its `startsAt` (a flapping alert); `0` = no cooldown.",
    )

    @field_validator("cooldown")
    @classmethod
    def _not_negative(cls, value: timedelta) -> timedelta:
        if value < timedelta(0):
            raise ValueError("cooldown must not be negative")
        return value

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
    """Fill `${label}` / `${label:-default}` in strings (recursively in lists and dicts).

    A value that is exactly `${label?}` is the label, or, when the alert lacks it, the field
    is left out so the runbook's default applies (never an empty filter).
    """
    if isinstance(value, str):
        optional = _OPTIONAL.fullmatch(value)
        if optional:
            return labels.get(optional.group(1), _OMIT)

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in labels:
                return labels[name]
            if default is not None:
                return default
            raise MissingLabel(f"label {name!r} is not on the alert")

        return _TEMPLATE.sub(sub, value)
    if isinstance(value, list):
        return [v for v in (render(v, labels) for v in value) if v is not _OMIT]
    if isinstance(value, dict):
        rendered = {k: render(v, labels) for k, v in value.items()}
        return {k: v for k, v in rendered.items() if v is not _OMIT}
    return value


def _set_path(params: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = params
    for name in parents:
        child = node.get(name)
        if not isinstance(child, dict):
            child = {}
            node[name] = child
        node = child
    node[leaf] = value


def _has_path(model: type[BaseModel], dotted: str) -> bool:
    *parents, leaf = dotted.split(".")
    for name in parents:
        field = model.model_fields.get(name)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return False
        model = annotation
    return leaf in model.model_fields


def build_params(route: Route, runbook: Runbook, labels: Mapping[str, str]) -> dict[str, Any]:
    """The `params` value for the run: templated, dry run forced unless `auto`, validated.

    Raises `MissingLabel` or pydantic's `ValidationError`; nothing is started then.
    """
    params = render(dict(route.params), labels)
    if runbook.dry_run_field:
        # The route decides, not the runbook's default: auto acts, anything else plans.
        _set_path(params, runbook.dry_run_field, not route.auto)
    model = runbook.params_model()
    # Only what the route set: the runbook's own defaults apply where it runs.
    return model.model_validate(params).model_dump(mode="json", exclude_unset=True)


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
            if not _has_path(runbook.params_model(), runbook.dry_run_field):
                problems.append(f"{where}: runbook has no field {runbook.dry_run_field!r}")
                continue
            if value_at(route.params, runbook.dry_run_field) is not None:
                problems.append(f"{where}: set `auto`, not params.{runbook.dry_run_field}")
                continue
        optional = [p for p, v in _leaves(route.params) if _ANY_OPTIONAL.search(str(v))]
        if route.auto and optional:
            # `${label?}` drops the field when the label is missing: on a route that acts
            # unattended, a missing label would silently widen what the run may change.
            problems.append(
                f"{where}: `auto: true` must not use `${{label?}}` (in {', '.join(optional)}): "
                "a missing label would drop that filter and widen an unattended run; use "
                "`${label}` (required) or `auto: false`"
            )
            continue
        model = runbook.params_model()
        unknown = [p for p in _leaf_paths(route.params) if not _has_path(model, p)]
        if unknown:
            problems.append(f"{where}: {model.__name__} has no field(s) {', '.join(unknown)}")
            continue
        # Fixed values must validate now; templated ones are checked per alert (their
        # value comes from the labels), so errors located at a templated field are ignored.
        templated = {tuple(p.split(".")) for p, v in _leaves(route.params) if "${" in str(v)}
        try:
            build_params(route, runbook, _SampleLabels())
        except MissingLabel as exc:
            problems.append(f"{where}: {exc}")
        except ValidationError as exc:
            errors = [
                e
                for e in exc.errors()
                if not any(tuple(str(x) for x in e["loc"][: len(t)]) == t for t in templated)
            ]
            if errors:
                problems.append(f"{where}: params invalid: {errors}")
    if problems:
        raise ValueError("routing table invalid:\n  " + "\n  ".join(problems))


def _leaves(params: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in params.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += _leaves(value, path + ".")
        else:
            out.append((path, value))
    return out


def _leaf_paths(params: dict[str, Any]) -> list[str]:
    return [p for p, _ in _leaves(params)]


class _SampleLabels(dict[str, str]):
    """Labels that have every name, so each template renders during validation."""

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str)

    def __missing__(self, key: str) -> str:
        return "1"  # valid for str, int, float and bool fields alike
