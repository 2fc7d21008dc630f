"""Reading the run history from Prefect's API: an incident's runs, their task runs,
artifacts and form answers, and the incident keys runs carry.

Shared by `post-incident` (which turns an incident's runs into a record) and
`audit-retention` (which keeps the runs of open or unrecorded incidents). Read-only.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Any, Self, TypeVar
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterExpectedStartTime,
    FlowRunFilterId,
    FlowRunFilterParentTaskRunId,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import Artifact, FlowRun, FlowRunInput, TaskRun
from prefect.client.schemas.sorting import FlowRunSort
from pydantic import BaseModel, Field, model_validator

from tasks.approvals.store import DECISION
from tasks.errors import PermanentError, TransientError
from tasks.run_tags import ALERT, alert_tag, covered_by_tag, parse_run_tags

#: Flows that describe incidents rather than act in them: never part of a timeline.
NOT_IN_TIMELINE = frozenset({"post-incident", "audit-retention"})
PAGE = 200
#: The key prefix of every approval record a gate and the receiver store on a run.
APPROVAL = "approval-"
#: More runs than this under one key is not an incident but a mistyped key (a tag on
#: everything): refused, rather than read for minutes.
MAX_RUNS = 500


def incident_keys(tags: list[str] | None) -> set[str]:
    """The incident keys (`alert:<fp>`) a run belongs to, from its tags."""
    return parse_run_tags(tags).incident_keys()


_T = TypeVar("_T")


def page_of_runs(
    client: SyncPrefectClient,
    run_filter: FlowRunFilter,
    *,
    limit: int,
    offset: int,
    flow_filter: FlowFilter | None = None,
) -> list[FlowRun]:
    """One page of flow runs, newest id first (a stable order to page through)."""
    return client.read_flow_runs(
        flow_filter=flow_filter,
        flow_run_filter=run_filter,
        sort=FlowRunSort.ID_DESC,
        limit=limit,
        offset=offset,
    )


def every_run(
    client: SyncPrefectClient, run_filter: FlowRunFilter, flow_filter: FlowFilter | None = None
) -> list[FlowRun]:
    """Every flow run the filters match, page by page."""
    return _all_pages(
        lambda offset: page_of_runs(
            client, run_filter, limit=PAGE, offset=offset, flow_filter=flow_filter
        )
    )


def _all_pages(read: Callable[[int], list[_T]]) -> list[_T]:
    """Every item `read(offset)` returns, one page of `PAGE` at a time."""
    out: list[_T] = []
    while True:
        page = read(len(out))
        out += page
        if len(page) < PAGE:
            return out


_RANGE = re.compile(r"^(?P<runbook>[a-z0-9][a-z0-9-]*)@(?P<since>[^.]+)\.\.(?P<until>.+)$")


class IncidentKey(BaseModel):
    """Which runs make one incident: an alert fingerprint, a tag, or a runbook + time range."""

    fingerprint: str | None = None
    tag: str | None = None
    runbook: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        ranged = (self.runbook, self.since, self.until)
        kinds = [
            self.fingerprint is not None,
            self.tag is not None,
            any(x is not None for x in ranged),
        ]
        if sum(kinds) != 1:
            raise ValueError("an incident key is a fingerprint, a tag, or a runbook + time range")
        if kinds[2]:
            if self.runbook is None or self.since is None or self.until is None:
                raise ValueError("a time-range key needs the runbook, since and until")
            if self.since.tzinfo is None or self.until.tzinfo is None:
                raise ValueError("since and until need a time zone (e.g. ...Z)")
            if self.until <= self.since:
                raise ValueError("until must be after since")
        for text in (self.fingerprint, self.tag):
            if text is not None and (not 0 < len(text) <= 200 or text != text.strip()):
                raise ValueError("the fingerprint or tag must be 1-200 characters, no padding")
        return self

    @classmethod
    def parse(cls, text: str) -> IncidentKey:
        """`alert:<fp>`, a bare fingerprint, `tag:<tag>` or `<runbook>@<since>..<until>`."""
        text = text.strip()
        if text.startswith(ALERT):
            return cls(fingerprint=text.removeprefix(ALERT))
        if text.startswith("tag:"):
            return cls(tag=text.removeprefix("tag:"))
        found = _RANGE.match(text)
        if found:
            return cls(
                runbook=found["runbook"],
                since=datetime.fromisoformat(found["since"]),
                until=datetime.fromisoformat(found["until"]),
            )
        if re.fullmatch(r"[A-Za-z0-9_-]{1,200}", text):
            return cls(fingerprint=text)
        raise ValueError(
            "incident key: alert:<fingerprint>, tag:<tag> or <runbook>@<since>..<until>"
        )

    def label(self) -> str:
        """The key as text; `parse(label())` gives the same key."""
        if self.fingerprint is not None:
            return alert_tag(self.fingerprint)
        if self.tag is not None:
            return f"tag:{self.tag}"
        assert self.since is not None and self.until is not None
        return f"{self.runbook}@{self.since.isoformat()}..{self.until.isoformat()}"

    def run_filter(self) -> tuple[FlowFilter | None, FlowRunFilter]:
        """The API filter for the incident's top-level runs."""
        if self.fingerprint is not None:
            return None, FlowRunFilter(tags=FlowRunFilterTags(all_=[alert_tag(self.fingerprint)]))
        if self.tag is not None:
            return None, FlowRunFilter(tags=FlowRunFilterTags(all_=[self.tag]))
        return FlowFilter(name=FlowFilterName(any_=[self.runbook or ""])), FlowRunFilter(
            expected_start_time=FlowRunFilterExpectedStartTime(
                after_=self.since, before_=self.until
            )
        )


class Gathered(BaseModel):
    """What the API holds about the incident, before it becomes a timeline."""

    runs: list[FlowRun]
    flows: dict[UUID, str]
    states: dict[UUID, list[Any]]
    task_runs: dict[UUID, list[TaskRun]]
    artifacts: dict[UUID, list[Artifact]]
    inputs: dict[UUID, list[FlowRunInput]]
    approvals: dict[UUID, list[FlowRunInput]] = Field(
        default_factory=dict, description="The approval gates' decisions, per run."
    )


def classified(exc: Exception, what: str) -> Exception:
    """A Prefect API error as a runbook error: 5xx/transport transient, the rest permanent."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    # The path names the call; the query and body are left out (they never hold secrets
    # here, but a URL may carry credentials in other setups).
    request = getattr(exc, "_request", None)
    where = f" {request.method} {request.url.path}" if isinstance(request, httpx.Request) else ""
    if status is None or status >= 500 or status == 429:
        return TransientError(f"Prefect API{where}: {what}: {type(exc).__name__} {status or ''}")
    return PermanentError(f"Prefect API{where}: {what}: HTTP {status}")


def incident_runs(
    client: SyncPrefectClient, flow_filter: FlowFilter | None, run_filter: FlowRunFilter
) -> list[FlowRun]:
    """Every flow run the filters match; refused past `MAX_RUNS` (not one incident)."""
    runs: list[FlowRun] = []
    while True:
        page = page_of_runs(
            client, run_filter, limit=PAGE, offset=len(runs), flow_filter=flow_filter
        )
        runs += page
        if len(runs) > MAX_RUNS:
            raise PermanentError(
                f"more than {MAX_RUNS} runs under this incident key: too wide (is it a tag on"
                " everything?)"
            )
        if len(page) < PAGE:
            return runs


def add_coalesced(client: SyncPrefectClient, found: dict[UUID, FlowRun]) -> None:
    """Alerts coalesced in a storm are one incident: add the run that covered an alert of
    the incident, and every alert covered by one of its runs (their `covered-by:` tags)."""
    handlers = {
        UUID(run_id) for run in found.values() for run_id in parse_run_tags(run.tags).covered_by
    }
    for handler in handlers - found.keys():
        found[handler] = client.read_flow_run(handler)
    tags = [covered_by_tag(run_id) for run_id in found]
    for start in range(0, len(tags), PAGE):
        covered = incident_runs(
            client, None, FlowRunFilter(tags=FlowRunFilterTags(any_=tags[start : start + PAGE]))
        )
        for run in covered:
            found.setdefault(run.id, run)


def collect(client: SyncPrefectClient, key: IncidentKey) -> Gathered:
    """Every run of the incident (subflows too) with its states, tasks, artifacts, inputs."""
    flow_filter, run_filter = key.run_filter()
    found: dict[UUID, FlowRun] = {r.id: r for r in incident_runs(client, flow_filter, run_filter)}
    add_coalesced(client, found)
    task_runs: dict[UUID, list[TaskRun]] = {}
    todo = list(found)
    # Subflows are found through their parent task run, whatever their tags: repeat until
    # no run adds a child.
    while todo:
        batch, todo = todo[:PAGE], todo[PAGE:]
        tasks = task_runs_of(client, batch)
        for run_id in batch:
            task_runs[run_id] = [t for t in tasks if t.flow_run_id == run_id]
        if not tasks:
            continue
        children = incident_runs(
            client,
            None,
            FlowRunFilter(
                parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[t.id for t in tasks])
            ),
        )
        for child in children:
            if child.id not in found:
                found[child.id] = child
                todo.append(child.id)
    flow_ids = list({r.flow_id for r in found.values()})
    names = {flow_id: client.read_flow(flow_id).name for flow_id in flow_ids}
    runs = [r for r in found.values() if names[r.flow_id] not in NOT_IN_TIMELINE]
    ids = [r.id for r in runs]
    artifacts: dict[UUID, list[Artifact]] = {i: [] for i in ids}
    for art in artifacts_of(client, ids):
        if art.flow_run_id in artifacts:
            artifacts[art.flow_run_id].append(art)
    return Gathered(
        runs=runs,
        flows=names,
        states={r.id: client.read_flow_run_states(r.id) for r in runs},
        task_runs={i: task_runs.get(i, []) for i in ids},
        artifacts=artifacts,
        inputs={i: run_answers(client, i) for i in ids},
        approvals={i: approval_records(client, i, DECISION) for i in ids},
    )


def artifacts_of(client: SyncPrefectClient, run_ids: list[UUID]) -> list[Artifact]:
    """Every artifact of these flow runs, page by page."""
    if not run_ids:
        return []
    only = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=run_ids))
    return _all_pages(
        lambda offset: client.read_artifacts(artifact_filter=only, limit=PAGE, offset=offset)
    )


def task_runs_of(client: SyncPrefectClient, run_ids: list[UUID]) -> list[TaskRun]:
    """Every task run of these flow runs, page by page."""
    runs = FlowRunFilter(id=FlowRunFilterId(any_=run_ids))
    return _all_pages(
        lambda offset: client.read_task_runs(flow_run_filter=runs, limit=PAGE, offset=offset)
    )


def run_answers(client: SyncPrefectClient, run_id: UUID) -> list[FlowRunInput]:
    """The answers given to the run's pauses (approval and checklist forms), oldest first.

    Prefect stores a `pause_flow_run(wait_for_input=...)` answer as a flow run input keyed
    `paused-<n>-response`; audit-retention exports them with the run."""
    inputs = client.filter_flow_run_input(
        flow_run_id=run_id, key_prefix="paused-", limit=100, exclude_keys=set()
    )
    return sorted((i for i in inputs if i.key.endswith("-response")), key=created_at)


def approval_records(
    client: SyncPrefectClient, run_id: UUID, prefix: str = APPROVAL
) -> list[FlowRunInput]:
    """The run's approval records (`tasks/approvals/store.py`: request, sealed votes,
    decision), oldest first; `prefix` narrows them (the decisions alone)."""
    inputs = client.filter_flow_run_input(
        flow_run_id=run_id, key_prefix=prefix, limit=500, exclude_keys=set()
    )
    return sorted(inputs, key=created_at)


def created_at(obj: Any) -> datetime:
    """When an API object (a form answer, an artifact) was created."""
    value = obj.created
    assert isinstance(value, datetime)
    return value
