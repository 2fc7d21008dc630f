"""The security-breach runbook's four assessments (all read-only).

- `assess_logins`: from the audit table (names from `SecuritySettings`, quoted as SQL
  identifiers): failed-login bursts (by user and by source address, in any 5 minutes),
  new source addresses per user (never seen for that user before the window), accounts
  used from many addresses. A missing table or column answers "unavailable", not an error.
- `image_drift`: the running containers' images and digests (pod status `imageID`) against
  the owning Deployment's spec image.
- `recent_secret_changes`: Secrets whose `managedFields` say they were written recently, and
  by which field manager. Read as metadata only (`PartialObjectMetadataList`): Secret values
  never reach this process.
- `exfiltration_signals`: egress bytes and requests per user against the same figures a
  week earlier (their own baseline), when Prometheus and the queries are configured.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import psycopg
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from prefect import task
from prefect.cache_policies import NO_CACHE
from psycopg import sql
from pydantic import BaseModel, Field

from tasks.clients import pg_connect, pg_target
from tasks.errors import PermanentError, TransientError
from tasks.kubernetes.api import Kube, call, kube_session, run_logger
from tasks.kubernetes.pods import list_pod_objects
from tasks.kubernetes.semantics import meta
from tasks.performance import audit_table_identifier
from tasks.prometheus import run_instant
from tasks.retry import RETRY_READ
from tasks.settings import (
    KubernetesSettings,
    PostgresSettings,
    PrometheusSettings,
    SecuritySettings,
)

#: The burst window of the on-call runbook ("many failed logins in a few minutes").
BURST_MINUTES = 5
#: Rows listed per finding kind (the counts stay exact).
FINDINGS_LIMIT = 100
MANAGED_BY = "app.kubernetes.io/managed-by"

# -------------------------------------------------------------------------------------------
# Logins
# -------------------------------------------------------------------------------------------


class LoginBurst(BaseModel):
    """Failed logins by one user or one source address within BURST_MINUTES."""

    by: Literal["user", "ip"]
    key: str
    failed: int
    first: datetime


class NewSourceIP(BaseModel):
    """A successful login of a user from an address never seen for them before the window."""

    user: str
    ip: str
    logins: int
    first: datetime


class SharedAccount(BaseModel):
    """An account that logged in from many distinct addresses in the window."""

    user: str
    ips: int
    logins: int


class LoginAssessment(BaseModel):
    """What the audit table says about logins in the window, or why it says nothing."""

    status: Literal["ok", "unavailable"]
    detail: str = ""
    target: str = ""
    table: str
    window_hours: float
    logins: int = 0
    failed: int = 0
    bursts: list[LoginBurst] = Field(default_factory=list)
    new_ips: list[NewSourceIP] = Field(default_factory=list)
    shared_accounts: list[SharedAccount] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def suspicious(self) -> bool:
        return bool(self.bursts or self.new_ips or self.shared_accounts)


def _names(settings: SecuritySettings) -> dict[str, sql.Composable]:
    for field in ("user_column", "ip_column", "action_column", "status_column"):
        if not getattr(settings, field).strip():
            raise PermanentError(f"RUNBOOKS_SECURITY_{field.upper()} must not be empty")
    if not settings.created_at_column.strip():
        raise PermanentError("RUNBOOKS_SECURITY_CREATED_AT_COLUMN must not be empty")
    if not settings.login_actions:
        raise PermanentError("RUNBOOKS_SECURITY_LOGIN_ACTIONS must name at least one action")
    return {
        "table": audit_table_identifier(settings.audit_table, "RUNBOOKS_SECURITY_AUDIT_TABLE"),
        "user": sql.Identifier(settings.user_column),
        "ip": sql.Identifier(settings.ip_column),
        "action": sql.Identifier(settings.action_column),
        "status": sql.Identifier(settings.status_column),
        "created": sql.Identifier(settings.created_at_column),
    }


# `ip::text` of an inet is "10.0.0.1/32": keep the address. Failed = HTTP status >= 400.
_LOGINS = """
WITH logins AS (
    SELECT {user}::text AS u, split_part({ip}::text, '/', 1) AS ip, {created} AS at,
           ({status} >= 400) AS failed
      FROM {table}
     WHERE {action} = ANY(%(actions)s)
       AND {created} > now() - make_interval(secs => %(window_s)s)
)
"""

BURSTS_SQL = """
, f AS (SELECT u, ip, at FROM logins WHERE failed)
, by_user AS (
    SELECT 'user' AS by, u AS key, at,
           count(*) OVER (PARTITION BY u ORDER BY at
                          RANGE BETWEEN CURRENT ROW AND %(burst)s::interval FOLLOWING) AS n
      FROM f WHERE u IS NOT NULL
)
, by_ip AS (
    SELECT 'ip' AS by, ip AS key, at,
           count(*) OVER (PARTITION BY ip ORDER BY at
                          RANGE BETWEEN CURRENT ROW AND %(burst)s::interval FOLLOWING) AS n
      FROM f WHERE ip <> ''
)
SELECT by, key, max(n) AS failed, min(at) AS first
  FROM (SELECT * FROM by_user UNION ALL SELECT * FROM by_ip) w
 WHERE n >= %(threshold)s
 GROUP BY by, key
 ORDER BY failed DESC, by, key
 LIMIT %(limit)s
"""

NEW_IPS_SQL = """
, seen_before AS (
    SELECT DISTINCT {user}::text AS u, split_part({ip}::text, '/', 1) AS ip
      FROM {table}
     WHERE {created} <= now() - make_interval(secs => %(window_s)s) AND {user} IS NOT NULL
)
SELECT l.u AS user, l.ip, count(*) AS logins, min(l.at) AS first
  FROM logins l
 WHERE NOT l.failed AND l.u IS NOT NULL AND l.ip <> ''
   AND l.u IN (SELECT u FROM seen_before)
   AND NOT EXISTS (SELECT 1 FROM seen_before s WHERE s.u = l.u AND s.ip = l.ip)
 GROUP BY l.u, l.ip
 ORDER BY first, l.u, l.ip
 LIMIT %(limit)s
"""

SHARED_SQL = """
SELECT u AS user, count(DISTINCT ip) AS ips, count(*) AS logins
  FROM logins
 WHERE NOT failed AND u IS NOT NULL AND ip <> ''
 GROUP BY u
HAVING count(DISTINCT ip) >= %(many)s
 ORDER BY ips DESC, u
 LIMIT %(limit)s
"""

TOTALS_SQL = "SELECT count(*) AS logins, count(*) FILTER (WHERE failed) AS failed FROM logins"

ROWS_SQL = """
SELECT {user}::text AS user, split_part({ip}::text, '/', 1) AS ip, {action}::text AS action,
       {status} AS status, {created} AS at
  FROM {table}
 WHERE {action} = ANY(%(actions)s)
   AND {created} > now() - make_interval(secs => %(window_s)s)
 ORDER BY {created} DESC
 LIMIT %(limit)s
"""


def _query(names: dict[str, sql.Composable], body: str) -> sql.Composed:
    """The window's login rows (`logins` CTE) followed by `body`, names as identifiers."""
    return sql.SQL(_LOGINS).format(**names) + sql.SQL(body).format(**names)


def _params(settings: SecuritySettings, limit: int = FINDINGS_LIMIT) -> dict[str, Any]:
    return {
        "actions": list(settings.login_actions),
        "window_s": settings.window_hours * 3600,
        "burst": f"{BURST_MINUTES} minutes",
        "threshold": settings.failed_login_burst,
        "many": settings.many_ips,
        "limit": limit,
    }


def _unavailable(settings: SecuritySettings, target: str, detail: str) -> LoginAssessment:
    return LoginAssessment(
        status="unavailable",
        detail=detail,
        target=target,
        table=settings.audit_table,
        window_hours=settings.window_hours,
    )


def logins_of(
    settings: SecuritySettings | None = None, pg: PostgresSettings | None = None
) -> LoginAssessment:
    """The login assessment as a plain function (the task and the evidence capture call it)."""
    settings = settings or SecuritySettings()
    names = _names(settings)
    pg = pg or PostgresSettings()
    target = pg_target(pg)
    params = _params(settings)
    try:
        with pg_connect(pg) as conn:
            # Caught inside the connection: pg_connect maps what escapes it to our errors.
            try:
                totals = conn.execute(_query(names, TOTALS_SQL), params).fetchone() or {}
                bursts = conn.execute(_query(names, BURSTS_SQL), params).fetchall()
                new_ips = conn.execute(_query(names, NEW_IPS_SQL), params).fetchall()
                shared = conn.execute(_query(names, SHARED_SQL), params).fetchall()
            except psycopg.errors.UndefinedTable:
                return _unavailable(
                    settings,
                    target,
                    f"no table {settings.audit_table!r} (RUNBOOKS_SECURITY_AUDIT_TABLE)",
                )
            except psycopg.errors.UndefinedColumn:
                return _unavailable(
                    settings,
                    target,
                    f"{settings.audit_table!r} lacks a configured column"
                    " (RUNBOOKS_SECURITY_*_COLUMN)",
                )
            except psycopg.errors.InsufficientPrivilege:
                return _unavailable(
                    settings, target, f"the runbook's role may not read {settings.audit_table!r}"
                )
            except (psycopg.errors.UndefinedFunction, psycopg.errors.DatatypeMismatch) as exc:
                return _unavailable(
                    settings, target, f"column types do not fit: {type(exc).__name__}"
                )
    except (TransientError, PermanentError) as exc:
        # The database down must not stop the evidence capture: it says so instead.
        return _unavailable(settings, target, str(exc))
    result = LoginAssessment(
        status="ok",
        target=target,
        table=settings.audit_table,
        window_hours=settings.window_hours,
        logins=int(totals.get("logins") or 0),
        failed=int(totals.get("failed") or 0),
        bursts=[
            LoginBurst(
                by=r["by"], key=str(r["key"])[:100], failed=int(r["failed"]), first=r["first"]
            )
            for r in bursts
        ],
        new_ips=[
            NewSourceIP(
                user=str(r["user"])[:100], ip=r["ip"], logins=int(r["logins"]), first=r["first"]
            )
            for r in new_ips
        ],
        shared_accounts=[
            SharedAccount(user=str(r["user"])[:100], ips=int(r["ips"]), logins=int(r["logins"]))
            for r in shared
        ],
    )
    run_logger().info(
        "%s %s: %d login(s), %d failed, %d burst(s), %d new address(es), %d shared account(s)",
        target,
        settings.audit_table,
        result.logins,
        result.failed,
        len(result.bursts),
        len(result.new_ips),
        len(result.shared_accounts),
    )
    return result


def audit_login_rows(
    settings: SecuritySettings, pg: PostgresSettings | None, limit: int
) -> tuple[list[dict[str, Any]], bool]:
    """The window's login rows, newest first, at most `limit` (and whether more exist)."""
    query = sql.SQL(ROWS_SQL).format(**_names(settings))
    with pg_connect(pg or PostgresSettings()) as conn:
        rows = conn.execute(query, {**_params(settings), "limit": limit + 1}).fetchall()
    out = [
        {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in r.items()} for r in rows
    ]
    return out[:limit], len(out) > limit


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="assess-logins")
def assess_logins(
    settings: SecuritySettings | None = None, pg: PostgresSettings | None = None
) -> LoginAssessment:
    """Failed-login bursts, new source addresses per user, accounts used from many addresses."""
    return logins_of(settings, pg)


# -------------------------------------------------------------------------------------------
# Image drift
# -------------------------------------------------------------------------------------------


class ContainerImage(BaseModel):
    """One running container: what its Deployment says, what the pod runs, and the drift."""

    pod: str
    container: str
    deployment: str | None
    expected_image: str | None = Field(description="The Deployment's current spec image.")
    pod_image: str
    running_image: str | None = Field(description="status.image (what the runtime reports).")
    image_id: str | None = Field(description="status.imageID: the digest actually running.")
    drift: list[str] = Field(default_factory=list, description="Why it differs; empty = none.")


class ImageDrift(BaseModel):
    """Image drift of the selected pods."""

    namespace: str
    selector: str
    containers: list[ContainerImage] = Field(default_factory=list)

    @property
    def drifted(self) -> list[ContainerImage]:
        return [c for c in self.containers if c.drift]


def _digest(ref: str | None) -> str | None:
    if not ref or "@" not in ref:
        return None
    return ref.rsplit("@", 1)[1]


def _deployment_of(kube: Kube, namespace: str, pod: k8s.V1Pod, cache: dict[str, Any]) -> Any:
    """The Deployment controlling the pod's ReplicaSet, or None (a bare pod, a StatefulSet)."""
    rs_ref = next(
        (o for o in meta(pod).owner_references or [] if o.controller and o.kind == "ReplicaSet"),
        None,
    )
    if rs_ref is None:
        return None
    key = f"rs/{rs_ref.name}"
    if key not in cache:
        rs = call(
            kube,
            kube.apps.read_namespaced_replica_set,
            rs_ref.name,
            namespace,
            verb="get",
            resource="replicasets",
            name=rs_ref.name,
            namespace=namespace,
        )
        dep_ref = next(
            (o for o in meta(rs).owner_references or [] if o.controller and o.kind == "Deployment"),
            None,
        )
        dep = None
        if dep_ref is not None:
            dep = call(
                kube,
                kube.apps.read_namespaced_deployment,
                dep_ref.name,
                namespace,
                verb="get",
                resource="deployments",
                name=dep_ref.name,
                namespace=namespace,
            )
        cache[key] = dep
    return cache[key]


def drift_reasons(
    expected: str | None, pod_image: str, running: str | None, image_id: str | None
) -> list[str]:
    """Why a container's image differs from its Deployment's (pure, unit-tested)."""
    reasons = []
    if expected is not None and pod_image != expected:
        reasons.append(f"pod runs {pod_image}, the Deployment says {expected}")
    if running and running != pod_image and _digest(running) is None:
        reasons.append(f"the runtime reports {running}, the pod spec says {pod_image}")
    want = _digest(expected) or _digest(pod_image)
    got = _digest(image_id)
    if want and got and want != got:
        reasons.append(f"running digest {got} is not the pinned {want}")
    return reasons


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="image-drift-{selector}")
def image_drift(
    selector: str, namespace: str | None = None, kube: KubernetesSettings | None = None
) -> ImageDrift:
    """The selected pods' running images and digests against their Deployment's spec image."""
    kube = kube or KubernetesSettings()
    namespace = namespace or kube.namespace
    if not selector or not selector.strip():
        raise PermanentError("a label selector is required (e.g. app=akig)")
    out: list[ContainerImage] = []
    cache: dict[str, Any] = {}
    with kube_session(kube) as session:
        for pod in list_pod_objects(session, namespace, selector.strip()):
            dep = _deployment_of(session, namespace, pod, cache)
            template = (
                {c.name: c.image for c in dep.spec.template.spec.containers}
                if dep is not None
                else {}
            )
            statuses = {
                s.name: s for s in (pod.status.container_statuses if pod.status else None) or []
            }
            for c in pod.spec.containers if pod.spec else []:
                s = statuses.get(c.name)
                expected = template.get(c.name)
                running = s.image if s else None
                image_id = s.image_id if s else None
                out.append(
                    ContainerImage(
                        pod=meta(pod).name,
                        container=c.name,
                        deployment=meta(dep).name if dep is not None else None,
                        expected_image=expected,
                        pod_image=c.image or "",
                        running_image=running,
                        image_id=image_id,
                        drift=drift_reasons(expected, c.image or "", running, image_id),
                    )
                )
    # The same container of one Deployment running different digests is drift too.
    by_container: dict[tuple[str | None, str], set[str]] = {}
    for ci in out:
        if ci.deployment and ci.image_id:
            by_container.setdefault((ci.deployment, ci.container), set()).add(ci.image_id)
    for ci in out:
        ids = by_container.get((ci.deployment, ci.container), set())
        if len(ids) > 1:
            ci.drift.append(
                f"{len(ids)} different image IDs run for {ci.deployment}/{ci.container}"
            )
    result = ImageDrift(namespace=namespace, selector=selector, containers=out)
    run_logger().info(
        "image drift in %s (%s): %d of %d container(s)",
        namespace,
        selector,
        len(result.drifted),
        len(out),
    )
    return result


# -------------------------------------------------------------------------------------------
# Secrets changed recently (metadata only)
# -------------------------------------------------------------------------------------------

#: Ask the API server for metadata only: Secret values never cross the wire.
METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
ONE_METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


class FieldWrite(BaseModel):
    """One managedFields entry: who (the field manager), how, when, which data keys."""

    manager: str
    operation: str | None
    time: datetime | None
    keys: list[str] = Field(
        default_factory=list, description="Data key NAMES that manager owns (never values)."
    )


class SecretChange(BaseModel):
    """A Secret and its latest write."""

    name: str
    created: datetime | None
    last_changed: datetime | None
    managers: list[FieldWrite]
    ours: bool = Field(description="Labelled managed-by incident-runbooks (our backups).")


class SecretChanges(BaseModel):
    """Secrets of one namespace changed within `hours` (by managedFields time), newest first.

    The API records the field manager (the client's name), not the user: who it was needs
    the API server's audit log."""

    namespace: str
    hours: float
    total: int = Field(description="Secrets in the namespace.")
    changed: list[SecretChange] = Field(default_factory=list)


def _parse_time(raw: str | None) -> datetime | None:
    if not raw:
        return None
    return datetime.fromisoformat(raw.replace("Z", "+00:00"))


def _data_keys(fields: dict[str, Any] | None) -> list[str]:
    out = []
    for section in ("f:data", "f:stringData"):
        for key in (fields or {}).get(section, {}):
            if key.startswith("f:"):
                out.append(key[2:])
    return sorted(set(out))


def secret_change_of(item: dict[str, Any]) -> SecretChange:
    """One PartialObjectMetadata item as a SecretChange (pure)."""
    md = item.get("metadata") or {}
    writes = [
        FieldWrite(
            manager=str(m.get("manager") or "(unknown)"),
            operation=m.get("operation"),
            time=_parse_time(m.get("time")),
            keys=_data_keys(m.get("fieldsV1")),
        )
        for m in md.get("managedFields") or []
    ]
    created = _parse_time(md.get("creationTimestamp"))
    times = [w.time for w in writes if w.time is not None] + ([created] if created else [])
    return SecretChange(
        name=str(md.get("name")),
        created=created,
        last_changed=max(times) if times else None,
        managers=sorted(writes, key=lambda w: w.time or datetime.min.replace(tzinfo=UTC)),
        ours=(md.get("labels") or {}).get(MANAGED_BY) == "incident-runbooks",
    )


def _get_metadata(kube: Kube, path: str, path_params: dict[str, str], accept: str) -> Any:
    """GET `path` asking for metadata only; a non-2xx answer raised as the API's."""
    params = kube.client.param_serialize(
        method="GET",
        resource_path=path,
        path_params=path_params,
        header_params={"Accept": accept},
        auth_settings=["BearerToken"],
    )
    response = kube.client.call_api(*params, _request_timeout=kube.timeout)
    response.read()
    if not 200 <= response.status < 300:
        raise ApiException(http_resp=response)
    return json.loads(response.data or b"{}")


def list_secret_metadata(kube: Kube, namespace: str) -> list[dict[str, Any]]:
    """The namespace's Secrets as PartialObjectMetadata (names, labels, managedFields)."""
    body = call(
        kube,
        lambda _request_timeout: _get_metadata(
            kube, "/api/v1/namespaces/{namespace}/secrets", {"namespace": namespace}, METADATA_ONLY
        ),
        verb="list",
        resource="secrets",
        namespace=namespace,
    )
    if not isinstance(body, dict) or body.get("kind") != "PartialObjectMetadataList":
        # Never fall back to a full list: that would carry the values.
        raise PermanentError("the API server did not answer Secret metadata only; not listing")
    return list(body.get("items") or [])


def named_secret_metadata(kube: Kube, namespace: str, names: list[str]) -> list[dict[str, Any]]:
    """The named Secrets as PartialObjectMetadata (a missing one is skipped)."""
    out = []
    for name in names:
        try:
            body = call(
                kube,
                lambda _request_timeout, name=name: _get_metadata(
                    kube,
                    "/api/v1/namespaces/{namespace}/secrets/{name}",
                    {"namespace": namespace, "name": name},
                    ONE_METADATA_ONLY,
                ),
                verb="get",
                resource="secrets",
                name=name,
                namespace=namespace,
            )
        except PermanentError as exc:
            if "not found" in str(exc):
                continue
            raise
        if not isinstance(body, dict) or body.get("kind") != "PartialObjectMetadata":
            raise PermanentError("the API server did not answer Secret metadata only; not reading")
        out.append(body)
    return out


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="recent-secret-changes")
def recent_secret_changes(
    namespace: str | None = None,
    settings: SecuritySettings | None = None,
    kube: KubernetesSettings | None = None,
    names: list[str] | None = None,
) -> SecretChanges:
    """Secrets written within `secret_change_hours` by managedFields time (metadata only);
    `names` limits it to those Secrets (GET each: no `list secrets` permission needed)."""
    settings = settings or SecuritySettings()
    kube = kube or KubernetesSettings()
    namespace = namespace or kube.namespace
    since = datetime.now(UTC) - timedelta(hours=settings.secret_change_hours)
    with kube_session(kube) as session:
        items = (
            named_secret_metadata(session, namespace, names)
            if names is not None
            else list_secret_metadata(session, namespace)
        )
    changes = [secret_change_of(i) for i in items]
    recent = sorted(
        (c for c in changes if c.last_changed is not None and c.last_changed >= since),
        key=lambda c: (c.last_changed or since, c.name),
        reverse=True,
    )
    run_logger().info(
        "%s: %d of %d Secret(s) written in the last %gh",
        namespace,
        len(recent),
        len(changes),
        settings.secret_change_hours,
    )
    return SecretChanges(
        namespace=namespace, hours=settings.secret_change_hours, total=len(changes), changed=recent
    )


# -------------------------------------------------------------------------------------------
# Exfiltration signals
# -------------------------------------------------------------------------------------------

#: The baseline: the same query evaluated this long ago.
BASELINE = timedelta(weeks=1)


class UserVolume(BaseModel):
    """One user's figure now and a week ago, and whether it is flagged."""

    user: str
    current: float
    baseline: float | None
    ratio: float | None
    flagged: bool


class SignalFigures(BaseModel):
    """One configured query's answer per user."""

    signal: Literal["egress bytes", "requests"]
    query: str
    users: list[UserVolume] = Field(default_factory=list)

    @property
    def flagged(self) -> list[UserVolume]:
        return [u for u in self.users if u.flagged]


class ExfiltrationAssessment(BaseModel):
    """Per-user egress and request volume against their own baseline, or "not configured"."""

    status: Literal["ok", "not configured"]
    detail: str = ""
    factor: float
    signals: list[SignalFigures] = Field(default_factory=list)

    @property
    def flagged(self) -> list[tuple[str, UserVolume]]:
        return [(s.signal, u) for s in self.signals for u in s.flagged]


def compare_volumes(
    now: dict[str, float], before: dict[str, float], factor: float
) -> list[UserVolume]:
    """Per user: flagged above `factor` x their baseline, or with volume and no baseline."""
    out = []
    for user, current in now.items():
        base = before.get(user)
        ratio = current / base if base else None
        flagged = (ratio is not None and ratio > factor) or (not base and current > 0)
        out.append(
            UserVolume(user=user, current=current, baseline=base, ratio=ratio, flagged=flagged)
        )
    return sorted(out, key=lambda u: (not u.flagged, -(u.ratio or float("inf")), u.user))


def _per_user(expr: str, settings: PrometheusSettings, at: datetime) -> dict[str, float]:
    result = run_instant(expr, settings, at)
    return {
        s.labels.get("user", "(none)"): s.value
        for s in result.samples
        if s.value is not None and "user" in s.labels
    }


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="exfiltration-signals")
def exfiltration_signals(
    settings: SecuritySettings | None = None, prometheus: PrometheusSettings | None = None
) -> ExfiltrationAssessment:
    """Egress bytes and requests per user (label `user`) now against a week ago."""
    settings = settings or SecuritySettings()
    prometheus = prometheus or PrometheusSettings()
    queries = [
        ("egress bytes", settings.egress_bytes_query),
        ("requests", settings.requests_query),
    ]
    configured = [(name, q) for name, q in queries if q and q.strip()]
    if not prometheus.url or not configured:
        missing = (
            "RUNBOOKS_PROMETHEUS_URL"
            if not prometheus.url
            else ("RUNBOOKS_SECURITY_EGRESS_BYTES_QUERY / RUNBOOKS_SECURITY_REQUESTS_QUERY")
        )
        return ExfiltrationAssessment(
            status="not configured",
            detail=f"{missing} unset",
            factor=settings.exfiltration_factor,
        )
    now = datetime.now(UTC)
    signals = []
    for name, expr in configured:
        assert expr is not None
        users = compare_volumes(
            _per_user(expr, prometheus, now),
            _per_user(expr, prometheus, now - BASELINE),
            settings.exfiltration_factor,
        )
        signals.append(SignalFigures(signal=name, query=expr, users=users))
    result = ExfiltrationAssessment(
        status="ok", factor=settings.exfiltration_factor, signals=signals
    )
    run_logger().info(
        "exfiltration signals: %d user figure(s) above %gx their baseline",
        len(result.flagged),
        settings.exfiltration_factor,
    )
    return result
