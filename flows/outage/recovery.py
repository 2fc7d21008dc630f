"""The recovery of `system-outage`: when a restart can help, what it is, and the check after.

A restart is planned only when the likely cause is the backend (the first broken layer), or
the endpoint with every layer from the ingress to the database answering: the platform's
own pods. When DNS, the ingress, the cluster, the database or a dependency is the cause, a
restart cannot help and would add a reconnect storm to an outage: the plan says so (an
impossible action with the reason) and nobody is asked.

The restarts are the existing ones (`plan_restart` pinned when planned, `apply_restart`
idempotent, `wait_for_rollout`): backend first, its rollout waited for, `restart_stagger_s`
of quiet so the database sees one wave of reconnects at a time, then the frontend.
"""

from __future__ import annotations

import time

from flows.common import failure_text
from flows.driver import Verification
from flows.outage.params import SystemOutageParams
from flows.restart import DeploymentRestart
from flows.spec import Action
from tasks.cascade.models import LAYER_TITLES, LayerName, LayerResult
from tasks.endpoint import EndpointCheck, endpoint_health
from tasks.errors import RunbookError
from tasks.kubernetes import plan_restart
from tasks.locks import kube_lock_target
from tasks.settings import BackendSettings, KubernetesSettings, OutageSettings

#: The layers that must answer for an endpoint failure to be the platform's own pods.
BELOW_ENDPOINT: tuple[LayerName, ...] = ("ingress", "kubernetes", "backend", "database")

#: Why a restart cannot help when this layer is the likely cause.
NO_RESTART: dict[LayerName, str] = {
    "dns": "the names do not resolve: fix DNS (records, resolver); restarted pods would"
    " still be unreachable",
    "endpoint": "the endpoint fails while a layer below it is not answering well: see it",
    "ingress": "the ingress controller is not ready: its own Deployment, not the backend",
    "kubernetes": "the cluster itself is unhealthy (API, nodes): a restart needs a working"
    " cluster and would reschedule pods onto the broken nodes",
    "database": "the database does not answer: restarted backends would only reconnect in a"
    " storm to a database that is down",
    "dependencies": "an external dependency is down: our pods cannot fix it; degrade or wait"
    " for the provider",
}


def restart_helps(layers: list[LayerResult], first_broken: LayerName | None) -> bool:
    """Whether restarting the platform's pods can fix what the cascade found."""
    return first_broken is not None and why_not(layers, first_broken) is None


def why_not(layers: list[LayerResult], first_broken: LayerName) -> str | None:
    """Why a restart cannot help (None: it can). The backend crash-looping while the
    database is down too is the database's doing: restarted pods would reconnect in a
    storm to a database that is down."""
    status = {r.layer: r.status for r in layers}
    if first_broken == "backend":
        if status.get("database") == "broken":
            return (
                f"{LAYER_TITLES['database']} is broken too: the backend fails because of it;"
                f" {NO_RESTART['database']}"
            )
        return None
    if first_broken == "endpoint" and all(status.get(n) == "ok" for n in BELOW_ENDPOINT):
        return None
    return f"the likely cause is {LAYER_TITLES[first_broken]} ({NO_RESTART[first_broken]})"


def not_planned(
    layers: list[LayerResult], first_broken: LayerName, kube: KubernetesSettings
) -> Action:
    """The restart listed as impossible, with the reason: nothing to approve."""
    reason = why_not(layers, first_broken) or "a restart cannot help here"
    return Action(
        kind="restart",
        target=f"{kube.namespace}/{kube.backend_deployment}+{kube.frontend_deployment}",
        summary=f"not planned: {reason}.",
        possible=False,
    )


def plan_restarts(params: SystemOutageParams, kube: KubernetesSettings) -> list[Action]:
    """Backend then frontend, each pinned by a read now; one that cannot be planned (not
    found, paused) is listed as impossible with the reason."""
    steps: list[Action] = []
    for name in (kube.backend_deployment, kube.frontend_deployment):
        target = kube_lock_target(kube.namespace, name).key
        try:
            plan = plan_restart(name, kube.namespace, settings=kube)
        except RunbookError as exc:
            steps.append(
                Action(
                    kind="restart",
                    target=target,
                    summary=f"cannot be planned: {failure_text(exc)}",
                    possible=False,
                )
            )
            continue
        steps.append(
            DeploymentRestart(
                target=target,
                summary=f"rollout restart of deployment/{name}, then wait for its rollout"
                f" (at most {params.rollout_timeout_s:g} s)",
                restart=plan,
                rollout_timeout_s=params.rollout_timeout_s,
            )
        )
    return steps


class OutageVerification(Verification):
    """The health URL from outside after the restarts: the last answer and how long it took."""

    check: EndpointCheck
    attempts: int
    waited_s: float


def verify_from_outside(params: SystemOutageParams, outage: OutageSettings) -> OutageVerification:
    """GET the health URL as a user does until it answers 2xx/3xx or `verify_timeout_s` ends."""
    started = time.monotonic()
    backend = BackendSettings()
    attempts = 0
    while True:
        attempts += 1
        check = endpoint_health(outage, backend)
        waited = time.monotonic() - started
        if check.ok or waited >= params.verify_timeout_s:
            break
        time.sleep(min(1.0, max(0.0, params.verify_timeout_s - waited)))
    where = (
        "through the endpoint (the path a user takes)"
        if check.via == "endpoint"
        else "at the backend's own health URL: no endpoint URL is configured"
        " (RUNBOOKS_OUTAGE_ENDPOINT_URL), so the path a user takes was not checked"
    )
    summary = f"{check.url} {where}: {check.detail} after {attempts} attempt(s) in {waited:.1f} s"
    return OutageVerification(
        healthy=check.ok, summary=summary, check=check, attempts=attempts, waited_s=waited
    )
