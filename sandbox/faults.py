"""Faults a test switches on through /admin, held per backend instance."""

from __future__ import annotations

import threading
from typing import Annotated

from pydantic import BaseModel, Field

#: Milliseconds added to one route's or one user's requests (a slow endpoint, a slow user).
DelayMs = Annotated[float, Field(ge=0, le=60_000)]


class FaultState(BaseModel):
    """The faults of one backend instance (all off = a healthy backend)."""

    error_rate_pct: float = Field(0.0, ge=0, le=100, description="Share of /api answered 500.")
    latency_ms: float = Field(0.0, ge=0, le=60_000, description="Added to every /api request.")
    n_plus_one: bool = Field(False, description="/api/orders reads each product separately.")
    cache_miss: bool = Field(False, description="Every cache read misses (a key per request).")
    gzip: bool = Field(True, description="GZip middleware on (off = the 'compression off' fault).")
    route_latency_ms: dict[str, DelayMs] = Field(
        default_factory=dict,
        description="Added to the requests of these route templates (`/api/orders`): a slow"
        " endpoint.",
    )
    user_latency_ms: dict[str, DelayMs] = Field(
        default_factory=dict,
        description="Added to the requests of these user ids (the path's or query's `user_id`):"
        " a slow user.",
    )


class FaultPatch(BaseModel):
    """A partial update of `FaultState` (fields left out keep their value)."""

    error_rate_pct: float | None = Field(None, ge=0, le=100)
    latency_ms: float | None = Field(None, ge=0, le=60_000)
    n_plus_one: bool | None = None
    cache_miss: bool | None = None
    gzip: bool | None = None
    route_latency_ms: dict[str, DelayMs] | None = None
    user_latency_ms: dict[str, DelayMs] | None = None


class Faults:
    """Thread-safe holder of a `FaultState` (handlers run in a thread pool)."""

    def __init__(self, gzip: bool = True) -> None:
        self._lock = threading.Lock()
        self._default = FaultState(gzip=gzip)
        self._state = self._default.model_copy()

    @property
    def state(self) -> FaultState:
        """A snapshot of the current faults."""
        with self._lock:
            return self._state.model_copy()

    def apply(self, patch: FaultPatch) -> FaultState:
        """Set the given fields; returns the new state."""
        with self._lock:
            self._state = self._state.model_copy(update=patch.model_dump(exclude_none=True))
            return self._state.model_copy()

    def reset(self) -> FaultState:
        """All faults off."""
        with self._lock:
            self._state = self._default.model_copy()
            return self._state.model_copy()
