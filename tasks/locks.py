"""One remediation per *target* at a time: a Prefect global concurrency limit per target.

A target names what a runbook changes: `pg:<host:port>/<db>` (or `pg:<host:port>/*` for
the whole server), `k8s:<namespace>/<deployment>`, `redis:<host:port>/<db>`,
`payments:<api>`. Runs on different targets act in parallel; runs on the same target act
one after the other. Only the acting step takes the lock: planning never waits.

Why Prefect's limits and not the deployment's `concurrency_limit`: the deployment limit
queues every run of a runbook (plan-only ones too, and those for other databases) behind
each other; a storm of 100 alerts on 100 databases then drained at one run every 4-13 s.
The limit lives on the Prefect server, holds across processes and machines, and its slots
are leases (renewed while held): a run killed mid-act frees the target when the lease runs
out instead of holding it forever.

Hierarchy: a target may sit `within` a wider one (a database within its server). A narrow
run holds one of the wider limit's `SHARED_SLOTS` slots plus its own (limit 1); a run on
the wide target itself occupies every slot of it. So two databases proceed in parallel,
while a whole-server remediation waits for both and excludes them. Slots are always taken
wide first, then narrow: two runs can never wait for each other in a cycle.

Kill switch: setting a target's limit to 0 in the UI (Concurrency page) stops every
remediation of it; the runs say so and change nothing.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists

from tasks.clients import pg_target
from tasks.errors import SafetyViolation
from tasks.redis import redis_target
from tasks.settings import PostgresSettings, RedisSettings

#: Slots of a wide target (a server) that narrow runs (its databases) share.
SHARED_SLOTS = 64
#: How long an approved run waits for another run acting on the same target.
LOCK_TIMEOUT_S = 600.0
_BANNED = re.compile(r"[/%&<>\s]")  # Prefect's banned name characters, and blanks


def lock_name(target: str) -> str:
    """The limit's name: readable, Prefect-safe, and unique per target (hash suffix)."""
    if not target or len(target) > 400:
        raise ValueError("a lock target is 1-400 characters")
    digest = hashlib.sha256(target.encode()).hexdigest()[:10]
    return f"target:{_BANNED.sub('_', target)}:{digest}"


@dataclass(frozen=True)
class LockTarget:
    """A lock target's key and the wider target it sits `within` (None = none)."""

    key: str
    within: str | None = None


def pg_lock_target(settings: PostgresSettings, database: str | None) -> LockTarget:
    """`pg:<host:port>/<database>` within its server, or the server itself (no database).

    A run filtered to one database changes that database's sessions only; an unfiltered run
    may end sessions anywhere on the server, so its target is the whole server.
    """
    server = "pg:" + pg_target(settings).rsplit("/", 1)[0]
    return LockTarget(f"{server}/{database}" if database else server, within=server)


def redis_lock_target(settings: RedisSettings) -> LockTarget:
    """The cache: `redis:<host:port>/<db>`."""
    return LockTarget("redis:" + redis_target(settings))


def kube_lock_target(namespace: str, deployment: str) -> LockTarget:
    """A workload: `k8s:<namespace>/<deployment>`."""
    return LockTarget(f"k8s:{namespace}/{deployment}")


def _ensure(name: str, limit: int) -> int:
    """Create the limit if it is missing; the limit it has (an operator may have changed it)."""
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=limit)
            )
            return limit
        except ObjectAlreadyExists:
            return int(client.read_global_concurrency_limit_by_name(name).limit)


@contextmanager
def target_lock(
    target: str, *, within: str | None = None, timeout_s: float = LOCK_TIMEOUT_S
) -> Iterator[float]:
    """Hold `target` (and a shared slot of `within`); yields the seconds spent waiting.

    Raises `SafetyViolation` when the target stays busy for `timeout_s`: the run must not
    act without it.
    """
    started = time.monotonic()
    # (limit name, its size when created, slots to hold; None = all it has), wide first.
    plan: list[tuple[str, int, int | None]]
    if within is None:
        plan = [(lock_name(target), 1, None)]
    elif within == target:  # the wide target itself: every slot, so no narrow run overlaps
        plan = [(lock_name(within), SHARED_SLOTS, None)]
    else:
        plan = [(lock_name(within), SHARED_SLOTS, 1), (lock_name(target), 1, None)]
    with ExitStack() as stack:
        for name, size, occupy in plan:
            limit = _ensure(name, size)
            if limit < 1:  # an operator's kill switch: set the limit to 0 in the UI
                raise SafetyViolation(f"remediation of {target} is switched off ({name} is 0)")
            left = timeout_s - (time.monotonic() - started)
            try:
                stack.enter_context(
                    concurrency(
                        name,
                        occupy=limit if occupy is None else occupy,
                        timeout_seconds=max(left, 0.1),
                        strict=True,
                    )
                )
            except TimeoutError:
                raise SafetyViolation(
                    f"{target} is being remediated by another run (waited {timeout_s:.0f} s);"
                    " not acting"
                ) from None
        yield time.monotonic() - started
