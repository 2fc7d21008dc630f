"""The on-call runbook's check cascade for a complete outage, as one call inside a flow.

Seven layers, in the runbook's order: DNS, the load balancer / ingress endpoint, the ingress
controller, Kubernetes, the backend pods, the database, the external dependencies. Each is
one read-only Prefect task (`tasks.cascade.layers`) bounded by its own timeout; none is
retried (for an outage, the timeout is the verdict). They are submitted at once, since no
check needs another's answer; the verdict still reads in the runbook's order: the first
broken layer is the likely cause, and every later layer, still checked and shown, is marked
"downstream of" it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from prefect.futures import PrefectFuture
from prefect.tasks import Task
from pydantic import BaseModel, Field

from flows.common import md_escape, table
from flows.spec import Check, Verdict
from tasks.cascade.layers import (
    check_backend,
    check_database,
    check_dependencies,
    check_dns,
    check_endpoint,
    check_ingress,
    check_kubernetes,
)
from tasks.cascade.models import LAYER_TITLES, LAYERS, LayerName, LayerResult, LayerStatus
from tasks.settings import KubernetesSettings, OutageSettings, PostgresSettings

_VERDICTS: dict[LayerStatus, Verdict] = {
    "ok": Verdict.PASS,
    "broken": Verdict.FAIL,
    "unavailable": Verdict.UNAVAILABLE,
    "not configured": Verdict.NOT_CONFIGURED,
}


@dataclass(frozen=True)
class CascadeTargets:
    """What the cascade looks at: the outage settings, the cluster, the database."""

    outage: OutageSettings
    kube: KubernetesSettings
    pg: PostgresSettings

    @classmethod
    def from_env(cls) -> CascadeTargets:
        """All three from the environment (RUNBOOKS_OUTAGE_*, RUNBOOKS_KUBE_*, RUNBOOKS_PG_*)."""
        return cls(outage=OutageSettings(), kube=KubernetesSettings(), pg=PostgresSettings())


def first_broken_of(layers: list[LayerResult]) -> LayerName | None:
    """The first broken layer in the runbook's order (not the first to answer)."""
    by_name = {r.layer: r for r in layers}
    return next((n for n in LAYERS if n in by_name and by_name[n].status == "broken"), None)


class Cascade(BaseModel):
    """The seven layers' results in the runbook's order, and the likely cause."""

    layers: list[LayerResult] = Field(description="Always all seven, in LAYERS order.")
    first_broken: LayerName | None = Field(description="The likely cause.")
    seconds: float = Field(description="Wall time to the verdict.")
    concurrent: bool

    @classmethod
    def of(cls, results: list[LayerResult], *, seconds: float, concurrent: bool) -> Cascade:
        """The verdict over `results` (any order; a missing layer is `unavailable`)."""
        by_name = {r.layer: r for r in results}
        layers = [
            by_name.get(n)
            or LayerResult(layer=n, status="unavailable", summary="not checked", seconds=0.0)
            for n in LAYERS
        ]
        return cls(
            layers=layers,
            first_broken=first_broken_of(layers),
            seconds=round(seconds, 3),
            concurrent=concurrent,
        )

    def layer(self, name: LayerName) -> LayerResult:
        """One layer's result."""
        return next(r for r in self.layers if r.layer == name)

    def downstream_of(self, layer: LayerName) -> LayerName | None:
        """The first broken layer when `layer` comes after it in the runbook's order."""
        if self.first_broken is None:
            return None
        return self.first_broken if LAYERS.index(layer) > LAYERS.index(self.first_broken) else None

    def summary(self) -> str:
        """One line: the likely cause, or that every layer answered."""
        if self.first_broken is None:
            bad = [r.layer for r in self.layers if r.status == "unavailable"]
            extra = f" (could not check: {', '.join(bad)})" if bad else ""
            return f"no layer broken{extra}"
        cause = self.layer(self.first_broken)
        return f"first broken: {LAYER_TITLES[cause.layer]}: {cause.summary}"

    def checks(self) -> list[Check]:
        """One evidence row per layer, in order; later layers say whose downstream they are."""
        rows = []
        for r in self.layers:
            upstream = self.downstream_of(r.layer)
            if upstream is not None:
                detail = f"downstream of {upstream}"
            elif r.layer == self.first_broken:
                detail = "first broken layer: the likely cause"
            else:
                detail = ""
            rows.append(
                Check(
                    item=LAYER_TITLES[r.layer],
                    observed=r.summary,
                    verdict=_VERDICTS[r.status],
                    detail=detail,
                )
            )
        return rows

    def probes_md(self) -> str:
        """Every layer's figures (its probes), markdown, in the runbook's order."""
        out = [
            f"Cascade {'concurrent' if self.concurrent else 'one after another'}: "
            f"verdict in {self.seconds:.2f} s; {md_escape(self.summary())}"
        ]
        for i, r in enumerate(self.layers, 1):
            upstream = self.downstream_of(r.layer)
            note = f", downstream of {upstream}" if upstream else ""
            out.append(
                f"\n#### {i}. {LAYER_TITLES[r.layer]}: {r.status}{note} ({r.seconds:.2f} s)\n\n"
                f"{md_escape(r.summary)}\n"
            )
            if r.probes:
                out.append(
                    table(
                        ["probe", "threshold", "observed", "ok", "ms", "detail"],
                        [
                            [
                                p.item,
                                p.threshold or "-",
                                p.observed,
                                {True: "yes", False: "NO", None: "?"}[p.ok],
                                "-" if p.ms is None else f"{p.ms:.1f}",
                                p.detail,
                            ]
                            for p in r.probes
                        ],
                    )
                )
        return "\n".join(out)


def layer_checks(
    targets: CascadeTargets,
) -> dict[LayerName, tuple[Task[..., LayerResult], tuple[Any, ...]]]:
    """Each layer's task and its arguments, in the runbook's order (the bench runs them too)."""
    o, k, pg = targets.outage, targets.kube, targets.pg
    return {
        "dns": (check_dns, (o,)),
        "endpoint": (check_endpoint, (o,)),
        "ingress": (check_ingress, (o, k)),
        "kubernetes": (check_kubernetes, (o, k)),
        "backend": (check_backend, (o, k)),
        "database": (check_database, (o, pg)),
        "dependencies": (check_dependencies, (o,)),
    }


def _crashed(layer: LayerName, exc: BaseException) -> LayerResult:
    # The checks never raise; a crash of the task machinery itself still yields a row.
    return LayerResult(
        layer=layer,
        status="unavailable",
        summary=f"check crashed: {type(exc).__name__}",
        seconds=0.0,
    )


def _collect(layer: LayerName, future: PrefectFuture[LayerResult]) -> LayerResult:
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - one layer's crash must not hide the others
        return _crashed(layer, exc)


def _call(layer: LayerName, task: Task[..., LayerResult], args: tuple[Any, ...]) -> LayerResult:
    try:
        return task(*args)
    except Exception as exc:  # noqa: BLE001 - one layer's crash must not hide the others
        return _crashed(layer, exc)


def run_cascade(targets: CascadeTargets, *, concurrent: bool = True) -> Cascade:
    """Inside a flow: each layer a Prefect task (no retries: the timeout is the verdict),
    submitted at once when concurrent; the verdict reads in the runbook's order."""
    checks = layer_checks(targets)
    start = time.perf_counter()
    if concurrent:
        futures = {name: task.submit(*args) for name, (task, args) in checks.items()}
        results = [_collect(name, f) for name, f in futures.items()]
    else:
        results = [_call(name, task, args) for name, (task, args) in checks.items()]
    return Cascade.of(results, seconds=time.perf_counter() - start, concurrent=concurrent)
