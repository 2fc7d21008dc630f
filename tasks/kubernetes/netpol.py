"""Isolate an incident's pods with a deny-all NetworkPolicy, optionally cordon their nodes,
and undo exactly that.

- `plan_isolation` (read): the pods the selector matches now (names), their nodes when
  cordoning, the policy's name `runbooks-isolate-<incident-slug>`. An empty selector is
  refused (it would select every pod); a selector matching no pod is refused (nothing to
  isolate, probably a typo); a selector matching every pod of the namespace is allowed but
  flagged in the plan (`selects_all_pods`) for the approver.
- `apply_isolation` (idempotent write): creates the policy (`podSelector` = the selector,
  `policyTypes` [Ingress, Egress], no rules: nothing in, nothing out), labelled ours; a policy
  of that name already there and ours for this incident is "done". With `cordon`, each planned
  node not already unschedulable is cordoned and annotated `runbooks/cordoned-for=<slug>`;
  one someone else cordoned is left alone (and so never uncordoned by us).
- `undo_isolation`: deletes only the policies labelled ours for that incident, and uncordons
  only the nodes annotated as cordoned for it.

Pods are never deleted, restarted or scaled: their state is evidence. A NetworkPolicy only
takes effect where the cluster's network plugin enforces it.
"""

from __future__ import annotations

from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from tasks.errors import SafetyViolation
from tasks.kubernetes.api import Kube, call, classify_api_error, kube_session, run_logger
from tasks.kubernetes.pods import list_pod_objects
from tasks.kubernetes.semantics import meta, parse_label_selector
from tasks.retry import RETRY_IDEMPOTENT_WRITE, RETRY_READ
from tasks.security.incident import incident_slug
from tasks.settings import KubernetesSettings

MANAGED_BY = "app.kubernetes.io/managed-by"
OURS = "incident-runbooks"
INCIDENT_LABEL = "runbooks/incident"
CORDONED_FOR = "runbooks/cordoned-for"
SELECTOR_ANNOTATION = "runbooks/selector"


class IsolationPlan(BaseModel):
    """What an isolation would do, read once: the policy, the pods it selects now, the nodes."""

    incident: str
    slug: str
    namespace: str
    selector: str
    policy_name: str
    pods: list[str] = Field(description="Pods the selector matches now (names).")
    selects_all_pods: bool = Field(description="The selector matches every pod of the namespace.")
    policy_exists: bool = Field(description="Our policy for this incident is already there.")
    cordon: bool
    nodes: list[str] = Field(default_factory=list, description="Nodes to cordon.")
    nodes_already_unschedulable: list[str] = Field(
        default_factory=list, description="Nodes cordoned before us: left alone, never uncordoned."
    )


class IsolationResult(BaseModel):
    """What `apply_isolation` did."""

    policy_name: str
    namespace: str
    created: bool = Field(description="False when our policy was already there (idempotent).")
    pods: list[str] = Field(description="Pods the selector matched when the policy was written.")
    cordoned: list[str] = Field(default_factory=list)
    dry_run: bool = False


def policy_name(slug: str) -> str:
    """The NetworkPolicy an incident's isolation creates."""
    return f"runbooks-isolate-{slug}"


def platform_namespace(namespace: str | None, settings: KubernetesSettings) -> str:
    """The platform namespace; any other is refused (this runbook acts there only)."""
    if namespace is not None and namespace != settings.namespace:
        raise SafetyViolation(
            f"namespace {namespace!r} is not the platform namespace {settings.namespace!r}: refused"
        )
    return settings.namespace


def _net(kube: Kube) -> Any:
    return k8s.NetworkingV1Api(kube.client)


def _ours(obj: Any, slug: str) -> bool:
    labels = obj.metadata.labels or {}
    return labels.get(MANAGED_BY) == OURS and labels.get(INCIDENT_LABEL) == slug


def _read_policy(kube: Kube, name: str, namespace: str) -> Any | None:
    try:
        return _net(kube).read_namespaced_network_policy(
            name, namespace, _request_timeout=kube.timeout
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise classify_api_error(
            exc,
            verb="get",
            resource="networkpolicies",
            name=name,
            namespace=namespace,
            host=kube.host,
        ) from None


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="plan-isolation-{incident}")
def plan_isolation(
    incident: str,
    selector: str,
    namespace: str | None = None,
    cordon: bool = False,
    kube: KubernetesSettings | None = None,
) -> IsolationPlan:
    """Name the pods a deny-all policy would isolate now, and their nodes (read only)."""
    settings = kube or KubernetesSettings()
    ns = platform_namespace(namespace, settings)
    slug = incident_slug(incident)
    parse_label_selector(selector)  # refuses an empty or unparsable selector up front
    name = policy_name(slug)
    with kube_session(settings) as k:
        pods = list_pod_objects(k, ns, selector)
        everything = list_pod_objects(k, ns, "")
        existing = _read_policy(k, name, ns)
        nodes = sorted({p.spec.node_name for p in pods if p.spec and p.spec.node_name})
        unschedulable: list[str] = []
        if cordon:
            for node in nodes:
                obj: Any = call(k, k.core.read_node, node, verb="get", resource="nodes", name=node)
                annotations = obj.metadata.annotations or {}
                if obj.spec.unschedulable and annotations.get(CORDONED_FOR) != slug:
                    unschedulable.append(node)
    if not pods:
        raise SafetyViolation(
            f"selector {selector!r} matches no pod in namespace {ns}: nothing to isolate"
        )
    if existing is not None and not _ours(existing, slug):
        raise SafetyViolation(
            f"networkpolicy {ns}/{name} exists and is not ours for incident {slug}: refused"
        )
    return IsolationPlan(
        incident=incident,
        slug=slug,
        namespace=ns,
        selector=selector,
        policy_name=name,
        pods=sorted(str(meta(p).name) for p in pods),
        selects_all_pods=len(pods) == len(everything),
        policy_exists=existing is not None,
        cordon=cordon,
        nodes=[n for n in nodes if n not in unschedulable] if cordon else [],
        nodes_already_unschedulable=unschedulable,
    )


def policy_body(plan: IsolationPlan) -> dict[str, Any]:
    """The deny-all ingress + egress policy on the plan's selector, labelled ours."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": plan.policy_name,
            "namespace": plan.namespace,
            "labels": {MANAGED_BY: OURS, INCIDENT_LABEL: plan.slug},
            "annotations": {SELECTOR_ANNOTATION: plan.selector},
        },
        "spec": {
            "podSelector": parse_label_selector(plan.selector),
            # Both types and no rules: no traffic in, none out (DNS included).
            "policyTypes": ["Ingress", "Egress"],
        },
    }


def _create_policy(kube: Kube, plan: IsolationPlan, dry_run: bool) -> bool:
    """Create the policy; False when ours is already there (an earlier attempt landed)."""
    try:
        _net(kube).create_namespaced_network_policy(
            plan.namespace,
            policy_body(plan),
            dry_run="All" if dry_run else None,
            _request_timeout=kube.timeout,
        )
        return True
    except ApiException as exc:
        if exc.status != 409:
            raise classify_api_error(
                exc,
                verb="create",
                resource="networkpolicies",
                name=plan.policy_name,
                namespace=plan.namespace,
                host=kube.host,
            ) from None
    existing = _read_policy(kube, plan.policy_name, plan.namespace)
    if existing is None or not _ours(existing, plan.slug):
        raise SafetyViolation(
            f"networkpolicy {plan.namespace}/{plan.policy_name} exists and is not ours for"
            f" incident {plan.slug}: nothing written"
        )
    return False


def _cordon(kube: Kube, node: str, slug: str, dry_run: bool) -> bool:
    """Cordon one node for the incident; False when it is unschedulable already."""
    obj: Any = call(kube, kube.core.read_node, node, verb="get", resource="nodes", name=node)
    if obj.spec.unschedulable:
        return False  # ours from an earlier attempt, or someone else's: leave it as it is
    body = {
        "metadata": {
            "resourceVersion": obj.metadata.resource_version,
            "annotations": {CORDONED_FOR: slug},
        },
        "spec": {"unschedulable": True},
    }
    call(
        kube,
        kube.core.patch_node,
        node,
        body,
        dry_run="All" if dry_run else None,
        verb="patch",
        resource="nodes",
        name=node,
    )
    return True


@task(
    **RETRY_IDEMPOTENT_WRITE,
    cache_policy=NO_CACHE,
    task_run_name="apply-isolation-{plan.policy_name}",
)
def apply_isolation(
    plan: IsolationPlan, kube: KubernetesSettings | None = None, dry_run: bool = False
) -> IsolationResult:
    """Create the planned deny-all NetworkPolicy (and cordon); a no-op where already done."""
    settings = kube or KubernetesSettings()
    platform_namespace(plan.namespace, settings)
    log = run_logger()
    with kube_session(settings) as k:
        created = _create_policy(k, plan, dry_run)
        pods = sorted(str(meta(p).name) for p in list_pod_objects(k, plan.namespace, plan.selector))
        cordoned = [n for n in plan.nodes if plan.cordon and _cordon(k, n, plan.slug, dry_run)]
    if set(pods) != set(plan.pods):
        log.warning(
            "networkpolicy %s: the selector now matches %d pod(s), the plan named %d",
            plan.policy_name,
            len(pods),
            len(plan.pods),
        )
    log.info(
        "networkpolicy %s/%s %s%s (%d pod(s) isolated%s)",
        plan.namespace,
        plan.policy_name,
        "created" if created else "already there",
        " (server dry run)" if dry_run else "",
        len(pods),
        f", cordoned {', '.join(cordoned)}" if cordoned else "",
    )
    return IsolationResult(
        policy_name=plan.policy_name,
        namespace=plan.namespace,
        created=created,
        pods=pods,
        cordoned=cordoned,
        dry_run=dry_run,
    )


def _nodes_for_undo(kube: Kube, slug: str) -> list[Any]:
    """The nodes annotated as cordoned for the incident; none when Nodes may not be listed
    (the optional cordon's ClusterRole left out: then nothing was cordoned by us)."""
    try:
        nodes = kube.core.list_node(_request_timeout=kube.timeout)
    except ApiException as exc:
        if exc.status == 403:
            run_logger().info("nodes may not be listed (no cordon grant): no node to uncordon")
            return []
        raise classify_api_error(
            exc, verb="list", resource="nodes", name=None, namespace=None, host=kube.host
        ) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise classify_api_error(
            exc, verb="list", resource="nodes", name=None, namespace=None, host=kube.host
        ) from None
    return [n for n in nodes.items if (meta(n).annotations or {}).get(CORDONED_FOR) == slug]


@task(**RETRY_IDEMPOTENT_WRITE, cache_policy=NO_CACHE, task_run_name="undo-isolation-{incident}")
def undo_isolation(
    incident: str, namespace: str | None = None, kube: KubernetesSettings | None = None
) -> list[str]:
    """Delete the policies labelled ours for the incident and uncordon the nodes we cordoned."""
    settings = kube or KubernetesSettings()
    ns = platform_namespace(namespace, settings)
    slug = incident_slug(incident)
    undone: list[str] = []
    with kube_session(settings) as k:
        listed = call(
            k,
            _net(k).list_namespaced_network_policy,
            ns,
            label_selector=f"{MANAGED_BY}={OURS},{INCIDENT_LABEL}={slug}",
            verb="list",
            resource="networkpolicies",
            namespace=ns,
        )
        for policy in listed.items:
            name = policy.metadata.name
            try:
                _net(k).delete_namespaced_network_policy(name, ns, _request_timeout=k.timeout)
            except ApiException as exc:
                if exc.status != 404:  # gone already: an earlier attempt deleted it
                    raise classify_api_error(
                        exc,
                        verb="delete",
                        resource="networkpolicies",
                        name=name,
                        namespace=ns,
                        host=k.host,
                    ) from None
            undone.append(f"networkpolicy/{name}")
        for node in _nodes_for_undo(k, slug):
            body = {
                "metadata": {"annotations": {CORDONED_FOR: None}},
                "spec": {"unschedulable": None},
            }
            name = node.metadata.name
            call(k, k.core.patch_node, name, body, verb="patch", resource="nodes", name=name)
            undone.append(f"node/{name}")
    run_logger().info("isolation of incident %s undone: %s", slug, ", ".join(undone) or "nothing")
    return undone
