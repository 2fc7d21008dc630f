"""Kubernetes actions: inspect, restart, roll back and isolate Deployments.

One module per concern, all re-exported here (`from tasks.kubernetes import undo_rollout`):

- `semantics`: kubectl's algorithms as pure functions and its constants;
- `api`: one API session per task (client from `tasks.clients.kube_api_client`, the one
  builder), error classification (`classify_api_error`);
- `models`: the pydantic results;
- `workload`: the one plan -> apply mechanism every workload write uses (`WorkloadWrite`);
- `rollout`: undo (plan + apply), restart (plan + apply), wait, history;
- `revisions`: when a revision became current (not when its ReplicaSet was created), and
  whether the previous revision was just rolled back from;
- `scale`: replicas with a resourceVersion precondition;
- `statefulset`: StatefulSet restart (plan + apply) and rollout status;
- `resources`: a container's memory limit, raised at most 2x (plan + apply);
- `env`: one container env var set to a capped literal, with its undo (plan + apply);
- `pods`: pods, restarts and OOMKilled reasons, logs, events (one namespace or all), Nodes,
  the pods of all namespaces not Running/Ready (read only);
- `netpol` (security-breach): the deny-all NetworkPolicy isolation, its undo, the cordon;
- `secret_rotation` (security-breach): Secret rotation with a backup and the restart of
  exactly the workloads that use the Secret (plan + apply).
`netpol` and `secret_rotation` are imported from their modules (not re-exported here).
"""

from tasks.kubernetes.api import classify_api_error
from tasks.kubernetes.models import (
    MEMORY_LIMIT_MAX_FACTOR,
    ContainerRestarts,
    EventInfo,
    MemoryLimitChange,
    MemoryLimitResult,
    NodeInfo,
    PodInfo,
    PodLogs,
    PodRestarts,
    RestartPlan,
    RestartResult,
    RevisionInfo,
    RevisionUndo,
    RollbackPlan,
    RollbackResult,
    RolloutHistory,
    RolloutStatus,
    ScaleResult,
    StatefulSetRestartPlan,
    StatefulSetRestartResult,
    StatefulSetRolloutStatus,
    TailLogsResult,
)
from tasks.kubernetes.pods import (
    cluster_events,
    event_time,
    list_events,
    list_pods,
    node_status,
    pod_restarts,
    pods_not_ready,
    tail_logs,
)
from tasks.kubernetes.resources import (
    apply_memory_limit,
    memory_bytes,
    plan_memory_limit,
    raise_memory_limit,
)
from tasks.kubernetes.revisions import (
    ONSET_TOLERANCE_S,
    became_current,
    began_after_rollout,
    began_before_rollout,
    current_and_previous,
    earlier_revisions,
    revision_written_at,
    undone_previous,
)
from tasks.kubernetes.rollout import (
    apply_restart,
    apply_rollback,
    plan_restart,
    plan_rollback,
    restart_rollout,
    rollout_history,
    undo_rollout,
    wait_for_rollout,
)
from tasks.kubernetes.scale import scale
from tasks.kubernetes.semantics import (
    ANNOTATIONS_TO_SKIP,
    CHANGE_CAUSE,
    POD_TEMPLATE_HASH,
    RESTARTED_AT,
    REVISION,
    REVISION_HISTORY,
    ROLLOUT_FIELD_MANAGER,
    TIMED_OUT_REASON,
    equal_ignore_hash,
    images_of,
    label_selector_string,
    labels_match,
    order_like_kubectl,
    parse_revision,
    rfc3339_now,
    rollback_annotations,
    rollback_patch,
    rollout_status_message,
    select_rollback_revision,
    semantic_equal,
    statefulset_status_message,
    without_hash_label,
)
from tasks.kubernetes.statefulset import (
    apply_statefulset_restart,
    plan_statefulset_restart,
    restart_statefulset,
    wait_for_statefulset,
)

__all__ = [
    "ANNOTATIONS_TO_SKIP",
    "CHANGE_CAUSE",
    "MEMORY_LIMIT_MAX_FACTOR",
    "ONSET_TOLERANCE_S",
    "POD_TEMPLATE_HASH",
    "RESTARTED_AT",
    "REVISION",
    "REVISION_HISTORY",
    "ROLLOUT_FIELD_MANAGER",
    "TIMED_OUT_REASON",
    "ContainerRestarts",
    "EventInfo",
    "MemoryLimitChange",
    "MemoryLimitResult",
    "NodeInfo",
    "PodInfo",
    "PodLogs",
    "PodRestarts",
    "RestartPlan",
    "RestartResult",
    "RevisionInfo",
    "RevisionUndo",
    "RollbackPlan",
    "RollbackResult",
    "RolloutHistory",
    "RolloutStatus",
    "ScaleResult",
    "StatefulSetRestartPlan",
    "StatefulSetRestartResult",
    "StatefulSetRolloutStatus",
    "TailLogsResult",
    "apply_memory_limit",
    "apply_restart",
    "apply_rollback",
    "apply_statefulset_restart",
    "became_current",
    "began_after_rollout",
    "began_before_rollout",
    "classify_api_error",
    "cluster_events",
    "current_and_previous",
    "earlier_revisions",
    "equal_ignore_hash",
    "event_time",
    "images_of",
    "label_selector_string",
    "labels_match",
    "list_events",
    "list_pods",
    "memory_bytes",
    "node_status",
    "order_like_kubectl",
    "parse_revision",
    "plan_memory_limit",
    "plan_restart",
    "plan_rollback",
    "plan_statefulset_restart",
    "pod_restarts",
    "pods_not_ready",
    "raise_memory_limit",
    "restart_rollout",
    "restart_statefulset",
    "revision_written_at",
    "rfc3339_now",
    "rollback_annotations",
    "rollback_patch",
    "rollout_history",
    "rollout_status_message",
    "scale",
    "select_rollback_revision",
    "semantic_equal",
    "statefulset_status_message",
    "tail_logs",
    "undo_rollout",
    "undone_previous",
    "wait_for_rollout",
    "wait_for_statefulset",
    "without_hash_label",
]
