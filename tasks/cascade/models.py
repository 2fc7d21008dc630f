"""The system-outage cascade's results: one per layer, in the on-call runbook's order."""

from __future__ import annotations

import typing
from typing import Literal

from pydantic import BaseModel, Field

#: The on-call runbook's "Check Cascade", in its order: the first broken one is the likely
#: cause, every later one is "downstream of" it.
LayerName = Literal[
    "dns", "endpoint", "ingress", "kubernetes", "backend", "database", "dependencies"
]
LAYERS: tuple[LayerName, ...] = typing.get_args(LayerName)

LAYER_TITLES: dict[LayerName, str] = {
    "dns": "DNS resolution",
    "endpoint": "Load balancer / ingress endpoint",
    "ingress": "Ingress controller",
    "kubernetes": "Kubernetes cluster",
    "backend": "Backend pods",
    "database": "Database",
    "dependencies": "External dependencies",
}

#: `broken`: the layer answered wrong or not at all within its timeout; `unavailable`: the
#: check itself could not tell (forbidden, misconfigured); `not configured`: nothing to check.
LayerStatus = Literal["ok", "broken", "unavailable", "not configured"]


class Probe(BaseModel):
    """One figure inside a layer (one hostname, one phase, one node, one URL)."""

    item: str
    ok: bool | None = Field(description="None: could not tell.")
    observed: str
    threshold: str = ""
    detail: str = ""
    ms: float | None = None


class LayerResult(BaseModel):
    """One layer's verdict, the figures behind it, and how long the check took."""

    layer: LayerName
    status: LayerStatus
    summary: str
    probes: list[Probe] = Field(default_factory=list)
    seconds: float
