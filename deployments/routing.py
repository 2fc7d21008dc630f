"""The routing table: which firing alert starts which runbook, how, with which parameters.

YAML (see `routing.yaml` and docs/triggers.md)::

    routes:
      - alertname: DatabaseConnectionPoolExhausted
        match: {severity: critical}        # label == value (optional)
        match_re: {namespace: "prod-.*"}   # label fully matches regex (optional)
        runbook: db-pool-exhausted         # its SPEC.name; the deployment comes from the catalog
        mode: approve                      # plan | approve | auto (default plan)
        cooldown: 10m                      # one run per alert (fingerprint) per 10 min
        params:
          guard: {database: "${datname?}"} # ${label}, ${label:-default}, ${label?}

Modes (`flows.spec.RouteMode`): `plan` forces the runbook's dry-run field on (the run only
plans); `approve` turns it off and `auto_approve` off: the alert's own run plans, pauses for
an approval in the UI, then re-measures under the lock and acts; `auto` turns both dry run
off and `auto_approve` on (an action whose policy is `always` still asks). A read-only
runbook (no dry-run field) gets neither. The receiver fills in who asked and why
(`requested_by`, `reason`) unless the route's params say otherwise.

The first route that matches wins. The table is validated when the receiver starts: unknown
runbooks, the old `deployment:`/`auto:` keys, bad regexes, templates and parameters the
runbook's model rejects, and a `mode: auto` route using `${label?}` all stop the start-up,
so a typo is found at deploy time and not at 3 a.m.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import annotated_types
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from deployments.catalog import Runbook, by_name
from flows.spec import RequestParams, RouteMode, value_at

_TEMPLATE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_OPTIONAL = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\?\}")
_OMIT = object()
_LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ANY_OPTIONAL = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\?\}")
_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
DEFAULT_COOLDOWN = timedelta(minutes=10)
#: Who asked, in the runs the receiver starts (unless the route's params say otherwise).
DEFAULT_REQUESTED_BY = "alertmanager"
#: The run's tag for each mode (a UI filter: which alert runs may act).
MODE_TAGS: dict[RouteMode, str] = {"plan": "plan-only", "approve": "approve", "auto": "auto"}
#: How much a run of each mode may do, for coalescing (deployments/journal.py): an alert is
#: covered only by a run that may do at least as much.
MODE_LEVELS: dict[RouteMode, int] = {"plan": 0, "approve": 1, "auto": 2}


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
    runbook: str = Field(
        min_length=1,
        description="The runbook's name (`SPEC.name`, e.g. `high-error-rate`); its deployment"
        " comes from the catalog.",
    )
    mode: RouteMode = Field(
        "plan",
        description="plan: dry run; approve: plan, pause the run for an approval in the UI,"
        " then act; auto: act as the runbook's approval policies allow.",
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="Fields of the runbook's `params`; `${label}` works."
    )
    cooldown: Duration = Field(
        DEFAULT_COOLDOWN,
        description="One alert (fingerprint) starts at most one run of this route per "
        "cooldown, whatever its `startsAt` (a flapping alert); `0` = no cooldown.",
    )

    @model_validator(mode="before")
    @classmethod
    def _old_keys(cls, data: Any) -> Any:
        """The keys of the previous format, refused with what to write instead."""
        if not isinstance(data, dict):
            return data
        problems = []
        if "deployment" in data:
            name = str(data["deployment"]).partition("/")[0]
            problems.append(
                f"`deployment:` is no longer a route key: name the runbook, `runbook: {name}`"
            )
        if "auto" in data:
            problems.append(
                "`auto:` is no longer a route key: use `mode: plan | approve | auto`"
                " (`auto: false` was `mode: plan`, `auto: true` was `mode: auto`)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return data

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


def _cap(name: str) -> int:
    """The length cap `RequestParams` puts on a request field (one source for both)."""
    return next(
        m.max_length
        for m in RequestParams.model_fields[name].metadata
        if isinstance(m, annotated_types.MaxLen)
    )


def _beside(dotted: str, name: str) -> str:
    """The field `name` next to a dotted field (`remediation.dry_run` -> `remediation.name`)."""
    parent, _, _ = dotted.rpartition(".")
    return f"{parent}.{name}" if parent else name


def auto_approve_field(runbook: Runbook) -> str | None:
    """Where a route's mode sets `auto_approve`: beside the dry-run field; None when the
    runbook has no dry-run field (a read-only runbook: nothing to set)."""
    if not runbook.dry_run_field:
        return None
    return _beside(runbook.dry_run_field, "auto_approve")


def request_fields(
    labels: Mapping[str, str], requested_by: str = DEFAULT_REQUESTED_BY
) -> dict[str, str]:
    """Who asked and why, as the receiver fills them in: `alert <name> on <target>`."""
    on = labels.get("instance") or labels.get("job") or "an unnamed target"
    reason = f"alert {labels.get('alertname') or 'unnamed'} on {on}"
    return {
        "requested_by": requested_by[: _cap("requested_by")],
        "reason": reason[: _cap("reason")],
    }


def build_params(
    route: Route,
    runbook: Runbook,
    labels: Mapping[str, str],
    requested_by: str = DEFAULT_REQUESTED_BY,
) -> dict[str, Any]:
    """The `params` value for the run: templated, the mode applied, the request filled in,
    validated.

    Raises `MissingLabel` or pydantic's `ValidationError`; nothing is started then.
    """
    params = render(dict(route.params), labels)
    model = runbook.params_model()
    if runbook.dry_run_field:
        # The route decides, not the runbook's default: only approve and auto may act.
        _set_path(params, runbook.dry_run_field, route.mode == "plan")
        approve_field = auto_approve_field(runbook)
        if approve_field and route.mode != "plan":
            _set_path(params, approve_field, route.mode == "auto")
    # Beside the dry-run field (pool-threshold: its remediation's request), where the
    # runbook's params have the field and the route did not set it.
    for name, value in request_fields(labels, requested_by).items():
        dotted = _beside(runbook.dry_run_field or name, name)
        if _has_path(model, dotted) and value_at(params, dotted) is None:
            _set_path(params, dotted, value)
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
    """Check runbook names, modes and parameters (with placeholder labels) of every route."""
    index = by_name(runbooks)
    problems: list[str] = []
    for n, route in enumerate(table.routes):
        where = f"{source}: route {n} ({route.alertname})"
        runbook = index.get(route.runbook)
        problem = (
            _route_problem(route, runbook)
            if runbook is not None
            else _unknown_runbook(route.runbook, index)
        )
        if problem:
            problems.append(f"{where}: {problem}")
    if problems:
        raise ValueError("routing table invalid:\n  " + "\n  ".join(problems))


def _unknown_runbook(name: str, index: Mapping[str, Runbook]) -> str:
    hint = (
        f"; name the runbook (`{name.partition('/')[0]}`), not its deployment"
        if "/" in name
        else ""
    )
    return f"unknown runbook {name!r} (known: {', '.join(sorted(index))}){hint}"


def _route_problem(route: Route, runbook: Runbook) -> str | None:
    """What is wrong with one route of a known runbook, or None."""
    model = runbook.params_model()
    if runbook.dry_run_field:
        if not _has_path(model, runbook.dry_run_field):
            return f"runbook has no field {runbook.dry_run_field!r}"
        approve_field = _beside(runbook.dry_run_field, "auto_approve")
        if route.mode != "plan" and not _has_path(model, approve_field):
            # Without it the mode could not tell `approve` (ask) from `auto`: refuse to guess.
            return f"runbook has no field {approve_field!r}: only `mode: plan` can run it"
        for dotted in (runbook.dry_run_field, approve_field):
            if value_at(route.params, dotted) is not None:
                return f"set `mode`, not params.{dotted}"
    optional = [p for p, v in _leaves(route.params) if _ANY_OPTIONAL.search(str(v))]
    if route.mode == "auto" and optional:
        # `${label?}` drops the field when the label is missing: on a route that acts
        # unattended, a missing label would silently widen what the run may change. In
        # `approve` a human reads the plan before anything changes.
        return (
            f"`mode: auto` must not use `${{label?}}` (in {', '.join(optional)}): a missing"
            " label would drop that filter and widen an unattended run; use `${label}`"
            " (required), or `mode: approve` / `mode: plan`"
        )
    unknown = [p for p in _leaf_paths(route.params) if not _has_path(model, p)]
    if unknown:
        return f"{model.__name__} has no field(s) {', '.join(unknown)}"
    # Fixed values must validate now; templated ones are checked per alert (their
    # value comes from the labels), so errors located at a templated field are ignored.
    templated = {tuple(p.split(".")) for p, v in _leaves(route.params) if "${" in str(v)}
    try:
        build_params(route, runbook, _SampleLabels())
    except MissingLabel as exc:
        return str(exc)
    except ValidationError as exc:
        errors = [
            e
            for e in exc.errors()
            if not any(tuple(str(x) for x in e["loc"][: len(t)]) == t for t in templated)
        ]
        if errors:
            return f"params invalid: {errors}"
    return None


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
