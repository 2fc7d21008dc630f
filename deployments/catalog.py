"""The one list of runbooks that can be started: by schedule, by hand in the UI, or by an alert.

A runbook written later joins by one line in `RUNBOOKS`. Everything else (the deployments
`serve.py` registers, `prefect.yaml`, the receiver's routing validation and its warm pool)
reads this list. Flows are named by entrypoint (`module:function`) and imported only when
needed, so a broken runbook module fails the start-up loudly instead of at import of this file.

The deployment of a flow is always `<flow-name>/<flow-name>`: flows start each other with
`run_deployment("<flow-name>/<flow-name>")`.

Schedules live here, not in the flow modules, and importing this module imports no flow
(tests/unit/test_catalog.py checks both). One schedule reads the environment when this
module is imported: `RUNBOOKS_POOL_CHECK_INTERVAL_S` (default 300) sets how often
`pool-threshold` runs.

`service_account` is the Kubernetes ServiceAccount a run uses under a Kubernetes work pool
(`prefect.yaml`, generated from this list by `make prefect-yaml`); the manifests are in
`deployments/k8s/`.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache, cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when a runbook is loaded: this module stays cheap to import
    from prefect import Flow
    from pydantic import BaseModel

    from flows.spec import RunbookSpec

#: The ServiceAccount of the rollout runbooks: the platform's named Deployments only
#: (deployments/k8s/). Runbooks that never call Kubernetes use `NO_KUBE_SERVICE_ACCOUNT`
#: (no Role, no mounted token); the TLS runbooks have one each, scoped to their Secrets.
DEFAULT_SERVICE_ACCOUNT = "incident-runbooks"
NO_KUBE_SERVICE_ACCOUNT = "runbooks-no-kube"

#: Every 5 minutes unless `RUNBOOKS_POOL_CHECK_INTERVAL_S` says otherwise.
POOL_THRESHOLD_INTERVAL_S = int(os.environ.get("RUNBOOKS_POOL_CHECK_INTERVAL_S", "300"))
#: Daily at 06:00 UTC, early enough to act in office hours on what it finds.
CERT_EXPIRY_CRON = "0 6 * * *"
#: Daily at 03:30 UTC, when the run list is quietest.
AUDIT_RETENTION_CRON = "30 3 * * *"
#: Daily at 06:15 UTC: the day's report waits for the morning, after cert-expiry's.
PERFORMANCE_REPORT_CRON = "15 6 * * *"


@dataclass(frozen=True)
class Runbook:
    """One runbook served as a deployment: where its flow is, and how it is deployed.

    Its identity (name, severity, topic, dry-run field, lock target) is the flow's
    `RunbookSpec` (`flows/spec.py`), read when first needed: this entry never copies it.
    """

    entrypoint: str
    description: str
    tags: tuple[str, ...] = ()
    interval_s: float | None = None
    cron: str | None = None
    #: Runs of this deployment at once; beyond it, runs wait in Prefect's queue. `None` for
    #: runbooks that lock their *target* while acting (`tasks.locks`): plan-only runs and
    #: runs for other targets then never wait for each other.
    concurrency_limit: int | None = 1
    #: Kubernetes ServiceAccount of its runs under a Kubernetes work pool (prefect.yaml).
    service_account: str = DEFAULT_SERVICE_ACCOUNT
    #: Stand-in catalogs (tests) only: spec fields replaced, e.g. `{"name": "other"}`.
    overrides: Mapping[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def spec(self) -> RunbookSpec[Any]:
        """The flow's spec (imports the flow module once)."""
        from flows.spec import spec_of_flow

        found = spec_of_flow(self.load())
        return replace(found, **self.overrides) if self.overrides else found

    @property
    def name(self) -> str:
        """The flow's name, which is also the deployment's."""
        return self.spec.name

    @property
    def severity(self) -> str | None:
        """A run that ends Failed or Crashed, or waits for approval too long, is escalated
        with this severity and `topic` (deployments/automations.py); None = never."""
        return self.spec.severity

    @property
    def topic(self) -> str:
        """The escalation topic (which contacts are paged)."""
        return self.spec.topic

    @property
    def dry_run_field(self) -> str | None:
        """The parameter field that makes a run plan-only; None = the runbook changes nothing."""
        return self.spec.dry_run_field

    @property
    def deployment(self) -> str:
        """The deployment's full name, `<flow-name>/<deployment-name>`."""
        return self.spec.deployment

    def load(self) -> Flow[..., Any]:
        """Import the flow object (cached); raises if the module or function is missing."""
        return _load_flow(self.entrypoint)

    def target_of(self, params: dict[str, Any]) -> str | None:
        """The target a run with these (route-built) params would change; None = not known.

        Alerts for one target within the route's cooldown coalesce into one run
        (deployments/journal.py)."""
        if self.spec.lock is None:
            return None
        return self.spec.target_of(self.params_model().model_validate(params))

    def params_model(self) -> type[BaseModel]:
        """The pydantic model of the flow's single `params` parameter."""
        from pydantic import BaseModel

        flow = self.load()
        annotation = inspect.signature(flow.fn, eval_str=True).parameters["params"].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise TypeError(f"{self.entrypoint}: parameter `params` is not a pydantic model")
        return annotation


@cache
def _load_attr(ref: str) -> Any:
    module_name, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module_name), attr)


@cache
def _load_flow(entrypoint: str) -> Flow[..., Any]:
    from prefect import Flow

    module_name, _, attr = entrypoint.partition(":")
    obj = getattr(importlib.import_module(module_name), attr)
    if not isinstance(obj, Flow):
        raise TypeError(f"{entrypoint} is not a Prefect flow")
    return obj


RUNBOOKS: tuple[Runbook, ...] = (
    Runbook(
        entrypoint="flows.db_pool_exhausted:db_pool_exhausted",
        description="PostgreSQL connection pool exhausted: find and (guarded) end idle sessions.",
        tags=("postgres", "destructive"),
        # Acting takes the target's lock (`pg:<server>/<database>`): databases in parallel,
        # one remediation per database; plan-only runs never wait.
        concurrency_limit=None,
        # Reads the backend Deployment for pool sizing; patches only it (approved raise).
        service_account="db-pool-exhausted",
    ),
    Runbook(
        entrypoint="flows.pool_threshold:pool_threshold",
        description="Every 5 min: PostgreSQL pool usage vs threshold; notify or start cleanup.",
        tags=("postgres", "scheduled"),
        interval_s=POOL_THRESHOLD_INTERVAL_S,
        # It reads and starts db-pool-exhausted (whose acting step locks the target).
        concurrency_limit=None,
        service_account=NO_KUBE_SERVICE_ACCOUNT,
    ),
    Runbook(
        entrypoint="flows.cert_expiry:cert_expiry",
        description="Daily: TLS certificates from files and live endpoints; warn and escalate.",
        tags=("tls", "scheduled"),
        cron=CERT_EXPIRY_CRON,
        service_account="cert-expiry",
    ),
    Runbook(
        entrypoint="flows.cert_replace:cert_replace",
        description="Replace a TLS Secret and restart the ingress (approval; dry run default).",
        tags=("tls", "destructive"),
        service_account="cert-replace",
    ),
    Runbook(
        entrypoint="flows.cert_renew:cert_renew",
        description="Emergency certificate over ACME, installed via cert-replace's path "
        "(approval; dry run default; once per name per day).",
        tags=("tls", "destructive", "acme"),
        service_account="cert-renew",
        # An emergency renewal that fails leaves an expiring certificate: page at once.
    ),
    Runbook(
        entrypoint="flows.high_latency:high_latency",
        description="High response time: the latency checklist, quick wins with evidence;"
        " a cache clear only after approval.",
        tags=("latency", "redis", "postgres", "prometheus"),
        # The cache clear takes the cache's target lock; read-only runs never wait.
        concurrency_limit=None,
        service_account="incident-runbooks",
    ),
    Runbook(
        entrypoint="flows.escalate:escalate",
        description="Notify the contacts of a severity and topic once per incident;"
        " re-page the next level without an acknowledgement.",
        tags=("escalation",),
        # Many incidents at once: no limit. It changes no system, so no dry run.
        concurrency_limit=None,
        service_account=NO_KUBE_SERVICE_ACCOUNT,
    ),
    Runbook(
        entrypoint="flows.high_error_rate:high_error_rate",
        description="High 5xx rate: evidence in parallel, scenario A-D with figures; rollout"
        " undo, restart or cache clear after approval, then verified by Prometheus.",
        tags=("errors", "kubernetes", "redis", "postgres", "prometheus", "destructive"),
        # Acting takes the backend's target lock; plan-only runs never wait for each other.
        concurrency_limit=None,
        service_account="incident-runbooks",
    ),
    Runbook(
        entrypoint="flows.payment_failure:payment_failure",
        description="Payment failures: checks at once, the payments on-call paged; failed"
        " payments retried after approval, each with one pinned idempotency key (never"
        " charged twice), capped, then reconciled against the gateway and the 5-min RTO.",
        tags=("payments", "kubernetes", "postgres", "redis", "destructive"),
        # Acting takes the payments API's target lock; plan-only runs never wait.
        concurrency_limit=None,
        service_account="payment-failure",
    ),
    Runbook(
        entrypoint="flows.system_outage:system_outage",
        description="Complete outage: the seven-layer check cascade at once, the likely cause"
        " named, events and DR readiness; a staggered backend-then-frontend restart after"
        " approval only when it can help, verified from outside.",
        tags=("outage", "kubernetes", "postgres", "redis", "dns", "destructive"),
        # Acting takes the backend+frontend target lock; plan-only runs never wait.
        concurrency_limit=None,
        service_account="system-outage",
    ),
    Runbook(
        entrypoint="flows.security_breach:security_breach",
        description="Security breach: evidence bundle first (hashed, 0600), then isolate,"
        " assess, notify, secure (Secret rotation, password reset, session revocation), each"
        " change approved on its own; a checklist with who and when. Dry run by default.",
        tags=("security", "kubernetes", "postgres", "redis", "destructive"),
        # Each changing step takes the namespace's target lock; plan-only runs never wait.
        concurrency_limit=None,
        service_account="security-breach",
    ),
    Runbook(
        entrypoint="flows.post_incident:post_incident",
        description="The incident's timeline, figures and checklist form; exported as"
        " markdown and JSON. Started as a draft when an alert whose runbook ran resolves.",
        tags=("audit",),
        # One record per incident key, several incidents at once: no limit.
        concurrency_limit=None,
        service_account=NO_KUBE_SERVICE_ACCOUNT,
    ),
    Runbook(
        entrypoint="flows.audit_retention:audit_retention",
        description="Daily: export runs older than N days (JSON lines, with artifacts), then"
        " delete them; never a run of an open incident. Dry run by default.",
        tags=("audit", "scheduled", "destructive"),
        cron=AUDIT_RETENTION_CRON,
        service_account=NO_KUBE_SERVICE_ACCOUNT,
    ),
    Runbook(
        entrypoint="flows.performance_report:performance_report",
        description="Daily: slow overall (health phases, pg_stat_statements), for some"
        " endpoints (every backend pod's duration lines, p50/p95/max, chart), for some users"
        " (audit table); what changed since the last report. Read only.",
        tags=("performance", "scheduled", "kubernetes", "postgres"),
        cron=PERFORMANCE_REPORT_CRON,
        # Reads the backend's pods and their logs; changes nothing anywhere.
        service_account="performance-report",
    ),
)


def by_deployment(runbooks: tuple[Runbook, ...]) -> dict[str, Runbook]:
    """Index runbooks by full deployment name."""
    return {rb.deployment: rb for rb in runbooks}


def by_name(runbooks: tuple[Runbook, ...]) -> dict[str, Runbook]:
    """Index runbooks by name (`SPEC.name`), as routes name them."""
    return {rb.name: rb for rb in runbooks}


def load_catalog(ref: str | None) -> tuple[Runbook, ...]:
    """The catalog named `module:attr` (tests and benches use their own), else `RUNBOOKS`."""
    if not ref:
        return RUNBOOKS
    module_name, _, attr = ref.partition(":")
    value = getattr(importlib.import_module(module_name), attr or "RUNBOOKS")
    return tuple(value)
