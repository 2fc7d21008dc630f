"""Kubernetes actions: inspect, restart, roll back and isolate Deployments.

One module per concern, all re-exported here (`from tasks.kubernetes import undo_rollout`):

- `semantics`: kubectl's algorithms as pure functions and its constants;
- `api`: one API session per task (client from `tasks.clients.kube_api_client`, the one
  builder), error classification (`classify_api_error`);
- `models`: the pydantic results;
- `rollout`: undo (plan + apply), restart (plan + apply), wait, history;
- `scale`: replicas with a resourceVersion precondition;
- `pods`: pods, logs, events, Nodes (read only).
"""

from tasks.kubernetes.api import classify_api_error
from tasks.kubernetes.models import (
    EventInfo,
    NodeInfo,
    PodInfo,
    PodLogs,
    RestartPlan,
    RestartResult,
    RevisionInfo,
    RollbackPlan,
    RollbackResult,
    RolloutHistory,
    RolloutStatus,
    ScaleResult,
    TailLogsResult,
)
from tasks.kubernetes.pods import list_events, list_pods, node_status, tail_logs
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
    without_hash_label,
)

__all__ = [
    "ANNOTATIONS_TO_SKIP",
    "CHANGE_CAUSE",
    "POD_TEMPLATE_HASH",
    "RESTARTED_AT",
    "REVISION",
    "ROLLOUT_FIELD_MANAGER",
    "TIMED_OUT_REASON",
    "EventInfo",
    "NodeInfo",
    "PodInfo",
    "PodLogs",
    "RestartPlan",
    "RestartResult",
    "RevisionInfo",
    "RollbackPlan",
    "RollbackResult",
    "RolloutHistory",
    "RolloutStatus",
    "ScaleResult",
    "TailLogsResult",
    "apply_restart",
    "apply_rollback",
    "classify_api_error",
    "equal_ignore_hash",
    "images_of",
    "label_selector_string",
    "labels_match",
    "list_events",
    "list_pods",
    "node_status",
    "order_like_kubectl",
    "parse_revision",
    "plan_restart",
    "plan_rollback",
    "restart_rollout",
    "rfc3339_now",
    "rollback_annotations",
    "rollback_patch",
    "rollout_history",
    "rollout_status_message",
    "scale",
    "select_rollback_revision",
    "semantic_equal",
    "tail_logs",
    "undo_rollout",
    "wait_for_rollout",
    "without_hash_label",
]
