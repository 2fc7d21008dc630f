"""What the Kubernetes tasks return: pydantic models, safe to put in artifacts."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator


class RevisionUndo(BaseModel):
    """A revision that was current and then replaced by an older template (an undo)."""

    revision: int = Field(description="The revision that was rolled back from.")
    images: list[str]
    by_revision: int = Field(description="The revision that replaced it (the current one).")
    template_of: int | None = Field(
        description="The earlier revision whose template came back, when known."
    )
    at: datetime | None = Field(description="When the undo took effect (became current).")

    def describe(self) -> str:
        """One short line for a report (a table cell): which revision was undone, when, by what."""
        when = f" at {self.at:%H:%M:%S} UTC" if self.at else ""
        return (
            f"revision {self.revision} ({', '.join(self.images)}) was rolled back from{when} "
            f"by revision {self.by_revision}"
        )


class RollbackPlan(BaseModel):
    """A rollback resolved once, by a read: the revision and the exact template to apply."""

    model_config = {"arbitrary_types_allowed": True}

    deployment: str
    namespace: str
    requested_revision: int = Field(description="The `to_revision` asked for (0 = previous).")
    to_revision: int = Field(description="The revision it resolved to when planned.")
    from_revision: int | None = Field(description="The Deployment's revision when planned.")
    generation: int | None = Field(description="metadata.generation when planned.")
    already_current: bool = Field(description="The template already matched when planned.")
    template: Any = Field(description="The ReplicaSet's pod template (V1PodTemplateSpec).")
    patch: list[dict[str, Any]] = Field(description="kubectl's JSON patch for that template.")
    images_before: list[str]
    images_after: list[str]
    target_undone: RevisionUndo | None = Field(
        None,
        description="Set when the resolved revision is the one the current revision rolled "
        "back from: restoring it would roll forward onto a release just undone.",
    )


class RollbackResult(BaseModel):
    """What `undo_rollout` did (or would do, on a dry run)."""

    deployment: str
    namespace: str
    outcome: Literal["rolled back", "skipped rollback", "already rolled back", "dry run"] = Field(
        description="'already rolled back': a retry found its own earlier patch in place."
    )
    message: str = Field(description="kubectl's wording, e.g. 'deployment.apps/x rolled back'.")
    from_revision: int | None = Field(description="The Deployment's revision before.")
    to_revision: int = Field(description="Revision of the ReplicaSet whose template is restored.")
    images_before: list[str]
    images_after: list[str]
    patch: list[dict[str, Any]] = Field(default_factory=list, description="The JSON patch sent.")


class RestartPlan(BaseModel):
    """A restart decided once, by a read: the `restartedAt` value every attempt sets."""

    deployment: str
    namespace: str
    restarted_at: str = Field(description="RFC 3339 value to set, chosen before any write.")
    previous_restarted_at: str | None
    generation: int | None


class RestartResult(BaseModel):
    """What `restart_rollout` did."""

    deployment: str
    namespace: str
    restarted_at: str = Field(description="RFC 3339 value of kubectl.kubernetes.io/restartedAt.")
    generation: int | None = Field(description="Deployment generation after the patch.")
    dry_run: bool
    patched: bool = Field(description="False when a retry found the value already set.")
    message: str


class RolloutStatus(BaseModel):
    """A Deployment's rollout progress, as `kubectl rollout status` sees it."""

    deployment: str
    namespace: str
    complete: bool
    message: str
    revision: int | None
    generation: int | None
    observed_generation: int | None
    replicas: int = Field(description="Desired replicas (spec).")
    updated_replicas: int
    ready_replicas: int
    available_replicas: int
    elapsed_s: float = 0.0


class PodInfo(BaseModel):
    """One pod, the way `kubectl get pods -o wide` summarises it."""

    name: str
    namespace: str
    phase: str | None
    ready: bool
    ready_containers: int
    containers: int
    restarts: int
    node: str | None
    ip: str | None
    created: datetime | None
    terminating: bool
    reason: str | None = Field(
        None, description="Why not running: the pod's reason, else a container's waiting reason."
    )


class PodLogs(BaseModel):
    """The tail of one container's log."""

    pod: str
    container: str
    lines: list[str]
    error: str | None = Field(None, description="Why this container's log could not be read.")


class TailLogsResult(BaseModel):
    """The last lines of every pod of a Deployment, optionally filtered."""

    deployment: str
    namespace: str
    lines: int
    grep: str | None
    logs: list[PodLogs]

    @property
    def all_lines(self) -> list[str]:
        """Every line, prefixed with pod/container like `kubectl logs --prefix`."""
        return [f"[pod/{p.pod}/{p.container}] {line}" for p in self.logs for line in p.lines]


class EventInfo(BaseModel):
    """One core/v1 Event."""

    namespace: str | None = None
    type: str | None
    reason: str | None
    message: str | None
    kind: str | None
    name: str | None
    count: int | None
    first_seen: datetime | None
    last_seen: datetime = Field(description="lastTimestamp, else eventTime, else creation.")


class NodeInfo(BaseModel):
    """A Node's health."""

    name: str
    ready: bool
    unschedulable: bool
    problems: list[str] = Field(description="Conditions other than Ready that are True.")
    conditions: list[str] = Field(
        default_factory=list, description='Every condition as "Type=Status (Reason)".'
    )
    kubelet_version: str | None
    addresses: list[str]


class ScaleResult(BaseModel):
    """What `scale` did."""

    deployment: str
    namespace: str
    replicas_before: int = Field(description="spec.replicas as read before the write.")
    replicas_after: int
    dry_run: bool
    changed: bool = Field(description="False when the Deployment was already at the target.")
    message: str = ""


class RevisionInfo(BaseModel):
    """One entry of a Deployment's rollout history."""

    revision: int
    replica_set: str
    images: list[str]
    change_cause: str | None
    replicas: int
    ready_replicas: int
    created: datetime | None = Field(description="The ReplicaSet's creationTimestamp.")
    current: bool
    earlier_revisions: list[int] = Field(
        default_factory=list,
        description="Revisions this ReplicaSet held before (`revision-history`): it was made "
        "current again by an undo.",
    )
    became_current: datetime | None = Field(
        None,
        description="When this revision became the Deployment's (`revisions.became_current`); "
        "None when it cannot be told.",
    )
    dated_by: Literal["created", "revision annotation", "unknown"] = Field(
        "unknown", description="What `became_current` was read from."
    )


class RolloutHistory(BaseModel):
    """`kubectl rollout history`, with the images of each revision."""

    deployment: str
    namespace: str
    current_revision: int | None
    revisions: list[RevisionInfo]
    undone: RevisionUndo | None = Field(
        None,
        description="The previous revision, when the current one is an undo of it: never a "
        "rollback target.",
    )


class ContainerRestarts(BaseModel):
    """One container's restarts and why it last stopped (`kubectl describe pod`'s view)."""

    container: str
    restart_count: int
    ready: bool
    state: Literal["running", "waiting", "terminated", "unknown"]
    waiting_reason: str | None = Field(None, description="e.g. CrashLoopBackOff, ImagePullBackOff.")
    last_terminated_reason: str | None = Field(None, description="e.g. OOMKilled, Error.")
    last_exit_code: int | None = None
    last_finished_at: datetime | None = None
    memory_limit: str | None = Field(None, description="resources.limits.memory of the spec.")

    @property
    def oom_killed(self) -> bool:
        """The previous instance was killed for exceeding its memory limit."""
        return self.last_terminated_reason == "OOMKilled"


class PodRestarts(BaseModel):
    """A pod's containers, their restart counts and last termination reasons."""

    pod: str
    namespace: str
    phase: str | None
    node: str | None
    containers: list[ContainerRestarts]
    ready: bool | None = Field(None, description="The pod's Ready condition (None: not read).")

    @property
    def restarts(self) -> int:
        """Total restarts over the pod's containers."""
        return sum(c.restart_count for c in self.containers)

    @property
    def oom_killed(self) -> list[str]:
        """Names of the containers whose last termination was OOMKilled."""
        return [c.container for c in self.containers if c.oom_killed]


class StatefulSetRestartPlan(BaseModel):
    """A StatefulSet restart decided once, by a read: the `restartedAt` every attempt sets."""

    statefulset: str
    namespace: str
    restarted_at: str = Field(description="RFC 3339 value to set, chosen before any write.")
    previous_restarted_at: str | None
    generation: int | None
    update_strategy: str = Field(description="RollingUpdate restarts pods; OnDelete does not.")


class StatefulSetRestartResult(BaseModel):
    """What `restart_statefulset` did."""

    statefulset: str
    namespace: str
    restarted_at: str
    generation: int | None
    dry_run: bool
    patched: bool = Field(description="False when a retry found the value already set.")
    message: str


class StatefulSetRolloutStatus(BaseModel):
    """A StatefulSet's rollout progress, as `kubectl rollout status statefulset/x` sees it."""

    statefulset: str
    namespace: str
    complete: bool
    message: str
    generation: int | None
    observed_generation: int | None
    replicas: int
    ready_replicas: int
    updated_replicas: int
    current_revision: str | None
    update_revision: str | None
    elapsed_s: float = 0.0


#: The most a single memory-limit change may multiply the current limit by.
MEMORY_LIMIT_MAX_FACTOR = 2


class MemoryLimitChange(BaseModel):
    """A raise of one container's memory limit, capped at 2x the current limit.

    The cap lives in the model, so no plan exceeding it can even be built: validation fails.
    """

    kind: Literal["deployment", "statefulset"]
    name: str
    namespace: str
    container: str
    current: str = Field(description="resources.limits.memory when planned, e.g. '256Mi'.")
    current_bytes: int = Field(gt=0)
    target: str = Field(description="The new limit, e.g. '512Mi'.")
    target_bytes: int = Field(gt=0)
    generation: int | None = Field(description="metadata.generation when planned.")

    @model_validator(mode="after")
    def _capped(self) -> MemoryLimitChange:
        if self.target_bytes < self.current_bytes:
            raise ValueError(
                f"memory limit {self.target} is lower than the current {self.current}: "
                "this task only raises limits"
            )
        if self.target_bytes > MEMORY_LIMIT_MAX_FACTOR * self.current_bytes:
            raise ValueError(
                f"memory limit {self.target} is more than {MEMORY_LIMIT_MAX_FACTOR}x the "
                f"current {self.current}; refused"
            )
        return self

    @property
    def already_at_target(self) -> bool:
        """The container already had the target limit when planned."""
        return self.target_bytes == self.current_bytes


class MemoryLimitResult(BaseModel):
    """What `raise_memory_limit` did."""

    kind: Literal["deployment", "statefulset"]
    name: str
    namespace: str
    container: str
    before: str = Field(description="The limit when planned.")
    after: str = Field(description="The limit now (unchanged on a dry run).")
    dry_run: bool
    changed: bool = Field(description="False when it was already at the target when planned.")
    patched: bool = Field(
        description="This attempt sent the patch (False on a retry that found it)."
    )
    message: str
