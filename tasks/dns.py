"""DNS resolution as users get it: each name asked of one resolver, within its own timeout.

Read-only. The resolver is the configured server (`RUNBOOKS_OUTAGE_RESOLVER`, ip[:port]) or
the system's resolv.conf (`tasks.clients.dns_resolver`). NXDOMAIN, an empty answer, a
refusal and a timeout are all findings, returned per name, never raised: a name that does
not resolve is what the outage cascade is looking for.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor, wait

import dns.exception
import dns.rdatatype
import dns.resolver
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from tasks.clients import dns_resolver
from tasks.settings import OutageSettings

#: Names looked up at once (each thread waits on the network, not the CPU).
MAX_PARALLEL = 16


class NameResolution(BaseModel):
    """One name's answer (A, else AAAA) from one resolver, or why there is none."""

    name: str
    ok: bool
    addresses: list[str] = Field(default_factory=list)
    error: str | None = Field(None, description="NXDOMAIN, no A/AAAA, timed out, refused...")
    ms: float
    resolver: str = Field(description="The server asked (ip:port), or 'system'.")


def _resolver_label(resolver: dns.resolver.Resolver, settings: OutageSettings) -> str:
    if not settings.resolver:
        return "system"
    return f"{resolver.nameservers[0]}:{resolver.port}"


def resolve_name(
    name: str, resolver: dns.resolver.Resolver, timeout_s: float, label: str = "system"
) -> NameResolution:
    """A, then AAAA when there is no A, both within `timeout_s` in all."""
    start = time.perf_counter()

    def done(ok: bool, addresses: list[str], error: str | None) -> NameResolution:
        ms = round((time.perf_counter() - start) * 1000, 2)
        return NameResolution(
            name=name, ok=ok, addresses=addresses, error=error, ms=ms, resolver=label
        )

    for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        left = timeout_s - (time.perf_counter() - start)
        if left <= 0:
            return done(False, [], f"timed out after {timeout_s:g} s")
        try:
            answer = resolver.resolve(name, rdtype, search=False, lifetime=left)
        except dns.resolver.NXDOMAIN:
            return done(False, [], "NXDOMAIN (no such name)")
        except dns.resolver.NoAnswer:
            continue  # no A record: an IPv6-only name still resolves
        except dns.resolver.LifetimeTimeout:
            return done(False, [], f"timed out after {timeout_s:g} s")
        except dns.resolver.NoNameservers as exc:
            # SERVFAIL / REFUSED from every server: the resolver answered "cannot".
            return done(False, [], f"no server could answer ({_first_line(exc)})")
        except dns.exception.DNSException as exc:
            return done(False, [], f"{type(exc).__name__}: {_first_line(exc)}")
        return done(True, sorted(str(r) for r in answer), None)
    return done(False, [], "no A or AAAA record")


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200]


def resolve_all(names: list[str], settings: OutageSettings) -> list[NameResolution]:
    """Every name at once (a dead resolver costs one timeout, not one per name), in order.

    The wait is capped here too: a lookup still running at `dns_timeout_s` (dnspython's own
    deadline overrun by a retry's sleep or a busy CPU) is reported timed out and abandoned."""
    if not names:
        return []
    resolver = dns_resolver(settings)
    label = _resolver_label(resolver, settings)
    timeout_s = settings.dns_timeout_s
    start = time.perf_counter()
    pool = ThreadPoolExecutor(min(MAX_PARALLEL, len(names)), thread_name_prefix="dns")
    futures = [pool.submit(resolve_name, n, resolver, timeout_s, label) for n in names]
    done, _ = wait(futures, timeout=timeout_s)
    pool.shutdown(wait=False, cancel_futures=True)
    results = []
    for name, future in zip(names, futures, strict=True):
        if future in done and future.exception() is None:
            results.append(future.result())
            continue
        error = future.exception() if future in done else None
        results.append(
            NameResolution(
                name=name,
                ok=False,
                error=f"{type(error).__name__}: {_first_line(error)}"
                if error
                else f"timed out after {timeout_s:g} s",
                ms=round((time.perf_counter() - start) * 1000, 2),
                resolver=label,
            )
        )
    return results


@task(cache_policy=NO_CACHE, task_run_name="resolve-hostnames")
def resolve_hostnames(settings: OutageSettings | None = None) -> list[NameResolution]:
    """Resolve every configured hostname at the configured resolver, each within its timeout."""
    settings = settings or OutageSettings()
    return resolve_all(settings.hostnames, settings)
