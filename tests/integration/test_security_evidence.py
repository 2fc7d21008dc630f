"""The security-breach evidence bundle and assessments on the real Kubernetes API, PostgreSQL,
the sandbox backend's login audit rows and a real Prometheus."""

from __future__ import annotations

import json
import os
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kubernetes import client as k8s
from pydantic import SecretStr

from sandbox.db import create_database, drop_database
from tasks.errors import PermanentError
from tasks.security.assess import (
    assess_logins,
    exfiltration_signals,
    image_drift,
    recent_secret_changes,
)
from tasks.security.evidence import bundles_of, capture_evidence, verify_bundle
from tasks.settings import (
    KubernetesSettings,
    PostgresSettings,
    PrometheusSettings,
    SecuritySettings,
)
from tests.fixtures.kube import KubeCluster
from tests.fixtures.prometheus import PrometheusServer
from tests.fixtures.sandbox import ADMIN_DSN, Sandbox, SandboxFactory
from tests.integration.kube_helpers import IMAGE, deployment_body, rolled_out, wait_until

LOG_LINES = "{pod} POST /api/login 401\n{pod} POST /api/login 200 user=7"


@pytest.fixture(scope="module")
def sec_db() -> Iterator[str]:
    """A small database of this module's own (its audit_logs holds only our rows)."""
    name = f"rb_sec_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    dsn = create_database(ADMIN_DSN, name, users=20, products=5, orders=10)
    yield dsn
    drop_database(ADMIN_DSN, name)


def pg_of(dsn: str) -> PostgresSettings:
    return PostgresSettings(dsn=SecretStr(dsn))


# ---------------------------------------------------------------------------------------------
# Logins (sandbox backend -> audit_logs -> assess_logins)
# ---------------------------------------------------------------------------------------------


def audit_count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM audit_logs WHERE action = 'login'").fetchone()
    return int(row[0]) if row else 0


def login(sb: Sandbox, user: int, ip: str, ok: bool) -> None:
    with sb.client() as c:
        r = c.post(
            "/api/login",
            json={"user_id": user, "password": "sandbox-password" if ok else "wrong"},
            headers={"X-Forwarded-For": ip},
        )
    assert r.status_code == (200 if ok else 401), r.text


def test_logins_find_a_burst_a_new_address_and_a_shared_account(
    make_sandbox_backend: SandboxFactory, sec_db: str
) -> None:
    with psycopg.connect(sec_db, autocommit=True) as conn:
        conn.execute("TRUNCATE audit_logs")
        # History before the window: where users 1-3 usually come from.
        for user, ip in [(1, "10.0.0.1"), (2, "10.0.0.2"), (3, "10.0.0.3")]:
            conn.execute(
                "INSERT INTO audit_logs (user_id, action, route, status, ip, response_time,"
                " release, created_at) VALUES (%s, 'login', '/api/login', 200, %s, 1, 'v1',"
                " now() - interval '3 days')",
                (user, ip),
            )
    sb = make_sandbox_backend(database_dsn=sec_db)
    for _ in range(21):  # a burst: 21 failures for user 1 from one address
        login(sb, 1, "203.0.113.66", ok=False)
    login(sb, 1, "10.0.0.1", ok=True)
    login(sb, 2, "10.0.0.2", ok=True)
    login(sb, 2, "198.51.100.7", ok=True)  # new for user 2
    for ip in ["10.0.0.3", "10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4"]:
        login(sb, 3, ip, ok=True)  # one account, five addresses
    for _ in range(3):  # a few typos: no burst
        login(sb, 4, "10.0.0.4", ok=False)
    login(sb, 4, "10.0.0.4", ok=True)  # no history: not "new address" noise
    sent = 21 + 1 + 2 + 5 + 3 + 1
    wait_until(lambda: audit_count(sec_db) >= sent + 3, what="login audit rows", timeout=15)

    settings = SecuritySettings(window_hours=1, failed_login_burst=20, many_ips=5)
    got = assess_logins.fn(settings=settings, pg=pg_of(sec_db))

    assert got.status == "ok"
    assert (got.logins, got.failed) == (sent, 24)
    assert {(b.by, b.key, b.failed) for b in got.bursts} == {
        ("user", "1", 21),
        ("ip", "203.0.113.66", 21),
    }
    assert {(n.user, n.ip) for n in got.new_ips} == {
        ("2", "198.51.100.7"),
        ("3", "10.1.0.1"),
        ("3", "10.1.0.2"),
        ("3", "10.1.0.3"),
        ("3", "10.1.0.4"),
    }
    assert [(s.user, s.ips) for s in got.shared_accounts] == [("3", 5)]

    # Below the thresholds nothing is flagged (the same rows, stricter settings).
    calm = assess_logins.fn(
        settings=SecuritySettings(window_hours=1, failed_login_burst=22, many_ips=6),
        pg=pg_of(sec_db),
    )
    assert calm.bursts == [] and calm.shared_accounts == []


def test_logins_without_the_table_say_unavailable_and_touch_nothing(sec_db: str) -> None:
    hostile = 'audit_logs"; DROP TABLE users; --'
    got = assess_logins.fn(settings=SecuritySettings(audit_table=hostile), pg=pg_of(sec_db))
    assert got.status == "unavailable" and "RUNBOOKS_SECURITY_AUDIT_TABLE" in got.detail
    with psycopg.connect(sec_db) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (20,)
    col = assess_logins.fn(settings=SecuritySettings(ip_column="nope"), pg=pg_of(sec_db))
    assert col.status == "unavailable"
    with pytest.raises(PermanentError, match=r"schema\.table"):
        assess_logins.fn(settings=SecuritySettings(audit_table="a.b.c"), pg=pg_of(sec_db))


# ---------------------------------------------------------------------------------------------
# Evidence bundle (Kubernetes API + PostgreSQL)
# ---------------------------------------------------------------------------------------------


def make_web(kube_cluster: KubeCluster, ns: str) -> tuple[Any, Any, KubernetesSettings]:
    api = kube_cluster.api()
    apps: Any = k8s.AppsV1Api(api)
    core: Any = k8s.CoreV1Api(api)
    settings = kube_cluster.settings(ns)
    annotations = {"fake-kubelet/logs": LOG_LINES, "fake-kubelet/restarts": "1"}
    apps.create_namespaced_deployment(ns, deployment_body("web", template_annotations=annotations))
    apps.create_namespaced_deployment(ns, deployment_body("other", replicas=1))
    rolled_out(settings, ns, "web")
    rolled_out(settings, ns, "other")
    wait_until(
        lambda: all(
            p.status.container_statuses
            for p in core.list_namespaced_pod(ns, label_selector="component=web").items
        ),
        what="container statuses",
    )
    return apps, core, settings


def test_the_bundle_is_complete_verifies_and_detects_a_changed_byte(
    kube_cluster: KubeCluster, kube_namespace: str, sec_db: str, tmp_path: Path
) -> None:
    ns = kube_namespace
    _, core, kube = make_web(kube_cluster, ns)
    web = sorted(
        p.metadata.name for p in core.list_namespaced_pod(ns, label_selector="component=web").items
    )
    settings = SecuritySettings(evidence_dir=tmp_path / "evidence", window_hours=1)
    # A login row of this test's own: the audit query's result must carry it.
    marker_ip = f"198.51.100.{uuid.uuid4().int % 250 + 1}"
    with psycopg.connect(sec_db) as conn:
        conn.execute(
            "INSERT INTO audit_logs (user_id, action, route, status, ip, response_time, release)"
            " VALUES (4242, 'login', '/api/login', 401, %s, 1.0, 'test')",
            (marker_ip,),
        )
    bundle = capture_evidence.fn(
        "INC-42/breach", "component=web", ns, settings=settings, kube=kube, pg=pg_of(sec_db)
    )

    assert bundle.pods == web and len(web) == 2
    assert bundle.errors == [] and bundle.audit_status == "ok"
    root = Path(bundle.directory)
    assert root.parent == tmp_path / "evidence" / bundle.slug
    paths = {f.path for f in bundle.files}
    expected = {"images.json", "events.json", "audit.json", "workloads/deployment-web.json"}
    for pod in web:
        expected |= {f"pods/{pod}.json", f"logs/{pod}/app.log", f"logs/{pod}/app.previous.log"}
    assert expected <= paths
    assert [p for p in paths if p.startswith("workloads/replicaset-web-")]
    assert not [p for p in paths if "other" in p]
    # Every file 0600 and the folders 0700; the manifest lists every file but itself.
    on_disk = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert on_disk == paths | {"manifest.json", "manifest.sha256"}
    for p in root.rglob("*"):
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o600 if p.is_file() else 0o700), (p, oct(mode))
    assert stat.S_IMODE(root.parent.stat().st_mode) == 0o700
    # The content is the pods' own.
    log = (root / f"logs/{web[0]}/app.log").read_text()
    assert log == LOG_LINES.replace("{pod}", web[0]) + "\n"
    images = json.loads((root / "images.json").read_text())
    assert {i["image_id"] for i in images} == {f"fake://{IMAGE}:1"}
    pod_obj = json.loads((root / f"pods/{web[0]}.json").read_text())
    assert pod_obj["metadata"]["name"] == web[0] and pod_obj["status"]["phase"] == "Running"
    audit = json.loads((root / "audit.json").read_text())
    assert audit["assessment"]["status"] == "ok" and audit["truncated"] is False
    assert {"user": "4242", "ip": marker_ip, "action": "login", "status": 401} in [
        {k: r[k] for k in ("user", "ip", "action", "status")} for r in audit["rows"]
    ]
    manifest = json.loads((root / "manifest.json").read_text())
    assert (root / "manifest.sha256").read_text().startswith(bundle.manifest_sha256 + "  ")
    assert manifest["pods"] == web

    check = verify_bundle.fn(bundle.directory)
    assert check.ok and check.checked == len(bundle.files)

    # A changed byte, a missing file, an edited manifest: each named.
    target = root / f"logs/{web[1]}/app.log"
    data = bytearray(target.read_bytes())
    data[0] ^= 0x01
    target.write_bytes(bytes(data))
    (root / "events.json").unlink()
    bad = verify_bundle.fn(bundle.directory)
    assert not bad.ok and bad.manifest_ok
    assert bad.mismatched == [f"logs/{web[1]}/app.log"] and bad.missing == ["events.json"]
    (root / "manifest.json").write_text((root / "manifest.json").read_text() + " ")
    assert verify_bundle.fn(bundle.directory).manifest_ok is False

    # A second capture for the incident never overwrites: a new folder, the first kept.
    again = capture_evidence.fn(
        "INC-42/breach", "component=web", ns, settings=settings, kube=kube, pg=pg_of(sec_db)
    )
    assert again.directory != bundle.directory and again.slug == bundle.slug
    assert bundles_of("INC-42/breach", settings) == sorted([bundle.directory, again.directory])
    assert verify_bundle.fn(again.directory).ok
    assert not verify_bundle.fn(bundle.directory).ok  # the tampered one stays tampered


def test_capture_refuses_bad_input_and_keeps_going_without_the_audit_table(
    kube_cluster: KubeCluster, kube_namespace: str, tmp_path: Path
) -> None:
    ns = kube_namespace
    _, _, kube = make_web(kube_cluster, ns)
    base = tmp_path / "evidence"
    settings = SecuritySettings(evidence_dir=base, audit_table="no_such_table")
    with pytest.raises(PermanentError, match="selector"):
        capture_evidence.fn("INC-1", " ", ns, settings=settings, kube=kube)
    with pytest.raises(PermanentError, match="incident"):
        capture_evidence.fn("", "component=web", ns, settings=settings, kube=kube)
    with pytest.raises(PermanentError):
        capture_evidence.fn("INC-1", "component in (", ns, settings=settings, kube=kube)
    assert not base.exists()  # nothing was created by a refused capture

    bundle = capture_evidence.fn(
        "INC-1", "component=web", ns, settings=settings, kube=kube, pg=pg_of(ADMIN_DSN)
    )
    assert bundle.audit_status.startswith("unavailable") and len(bundle.pods) == 2
    assert verify_bundle.fn(bundle.directory).ok
    with pytest.raises(PermanentError, match="not an evidence bundle"):
        verify_bundle.fn(str(tmp_path))


def token_with(kube_cluster: KubeCluster, ns: str, rules: list[dict[str, Any]]) -> Any:
    """KubernetesSettings of a fresh ServiceAccount in `ns` bound to a Role with `rules`."""
    api = kube_cluster.api()
    core: Any = k8s.CoreV1Api(api)
    rbac: Any = k8s.RbacAuthorizationV1Api(api)
    name = f"sa-{uuid.uuid4().hex[:6]}"
    core.create_namespaced_service_account(ns, {"metadata": {"name": name}})
    rbac.create_namespaced_role(ns, {"metadata": {"name": name}, "rules": rules})
    rbac.create_namespaced_role_binding(
        ns,
        {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
        },
    )
    token = core.create_namespaced_service_account_token(
        name, ns, k8s.AuthenticationV1TokenRequest(spec=k8s.V1TokenRequestSpec(audiences=[]))
    ).status.token
    return kube_cluster.settings(ns, kubeconfig=kube_cluster.kubeconfig_for(token, name))


READS = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},
    {"apiGroups": ["apps"], "resources": ["replicasets", "deployments"], "verbs": ["get"]},
]


def test_capture_with_least_privilege_and_an_rbac_gap_mid_capture(
    kube_cluster: KubeCluster, kube_namespace: str, tmp_path: Path
) -> None:
    ns = kube_namespace
    make_web(kube_cluster, ns)
    settings = SecuritySettings(evidence_dir=tmp_path / "ev", audit_table="no_such_table")
    logs = {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]}
    enough = token_with(kube_cluster, ns, [*READS, logs])
    full = capture_evidence.fn("INC-7", "component=web", ns, settings=settings, kube=enough)
    assert len(full.pods) == 2 and full.errors == [] and verify_bundle.fn(full.directory).ok

    # Without pods/log the capture fails loudly, and what it wrote is kept, hashed, marked.
    no_logs = token_with(kube_cluster, ns, READS)
    with pytest.raises(PermanentError, match="forbidden"):
        capture_evidence.fn("INC-7", "component=web", ns, settings=settings, kube=no_logs)
    dirs = bundles_of("INC-7", settings)
    assert len(dirs) == 2 and dirs[0] == full.directory
    partial = verify_bundle.fn(dirs[1])
    assert partial.ok and partial.incomplete and "pods/log" in partial.incomplete


# ---------------------------------------------------------------------------------------------
# Image drift and Secrets (Kubernetes API)
# ---------------------------------------------------------------------------------------------


def test_image_drift_names_the_pod_whose_image_was_swapped(
    kube_cluster: KubeCluster, kube_namespace: str
) -> None:
    ns = kube_namespace
    _, core, kube = make_web(kube_cluster, ns)
    clean = image_drift.fn("component=web", ns, kube=kube)
    assert len(clean.containers) == 2 and clean.drifted == []
    assert {c.deployment for c in clean.containers} == {"web"}

    victim = sorted(
        p.metadata.name for p in core.list_namespaced_pod(ns, label_selector="component=web").items
    )[0]
    # What an attacker with pod write access does: swap the image in place.
    core.patch_namespaced_pod(
        victim, ns, {"spec": {"containers": [{"name": "app", "image": "evil.example/miner:1"}]}}
    )
    drift = image_drift.fn("component=web", ns, kube=kube)
    assert [(c.pod, c.container) for c in drift.drifted] == [(victim, "app")]
    reasons = " ".join(drift.drifted[0].drift)
    assert "evil.example/miner:1" in reasons and f"{IMAGE}:1" in reasons


def test_recent_secret_changes_come_from_managed_fields_without_values(
    kube_cluster: KubeCluster, kube_namespace: str
) -> None:
    ns = kube_namespace
    core: Any = k8s.CoreV1Api(kube_cluster.api())
    kube = kube_cluster.settings(ns)
    value = f"s3cr3t-{uuid.uuid4().hex}"
    for name in ("old-creds", "db-creds"):
        core.create_namespaced_secret(
            ns,
            k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=name), string_data={"password": value}),
            field_manager="setup",
        )
    time.sleep(4)
    core.patch_namespaced_secret(
        "db-creds", ns, {"stringData": {"api-key": value}}, field_manager="attacker-tool"
    )
    patched = time.monotonic()

    def since_the_patch() -> SecuritySettings:
        # A window reaching back to the patch (stamped in whole seconds: 1 s of slack, and
        # another 1.5 s) but not to the creates 4 s before it, however slow the steps between.
        return SecuritySettings(secret_change_hours=(time.monotonic() - patched + 2.5) / 3600)

    got = recent_secret_changes.fn(ns, settings=since_the_patch(), kube=kube)
    assert [c.name for c in got.changed] == ["db-creds"]
    assert got.total >= 2
    writes = {(w.manager, w.operation): w.keys for w in got.changed[0].managers}
    assert writes[("attacker-tool", "Update")] == ["api-key"]
    assert writes[("setup", "Update")] == ["password"]
    wide = recent_secret_changes.fn(ns, settings=SecuritySettings(), kube=kube)
    assert {"db-creds", "old-creds"} <= {c.name for c in wide.changed}
    # By name (what a Role granting only `get` on the named Secrets allows); unknown skipped.
    named = recent_secret_changes.fn(
        ns, settings=since_the_patch(), kube=kube, names=["db-creds", "old-creds", "gone"]
    )
    assert [c.name for c in named.changed] == ["db-creds"] and named.total == 2
    # A Role with `get` on the named Secrets only is enough by name; listing is forbidden.
    named_only = token_with(
        kube_cluster,
        ns,
        [
            {
                "apiGroups": [""],
                "resources": ["secrets"],
                "resourceNames": ["db-creds"],
                "verbs": ["get"],
            }
        ],
    )
    by_name = recent_secret_changes.fn(
        ns, settings=since_the_patch(), kube=named_only, names=["db-creds"]
    )
    assert [c.name for c in by_name.changed] == ["db-creds"]
    with pytest.raises(PermanentError, match="forbidden"):
        recent_secret_changes.fn(ns, settings=since_the_patch(), kube=named_only)
    # Values never come back (they never even cross the wire: metadata only).
    for result in (got, wide, named, by_name):
        dumped = result.model_dump_json()
        assert value not in dumped and "c2VjcmV0" not in dumped


# ---------------------------------------------------------------------------------------------
# Exfiltration (a real Prometheus)
# ---------------------------------------------------------------------------------------------


def test_exfiltration_not_configured_without_prometheus_or_queries() -> None:
    none = exfiltration_signals.fn(
        settings=SecuritySettings(egress_bytes_query="x"), prometheus=PrometheusSettings(url=None)
    )
    assert none.status == "not configured" and "RUNBOOKS_PROMETHEUS_URL" in none.detail
    no_query = exfiltration_signals.fn(
        settings=SecuritySettings(), prometheus=PrometheusSettings(url="http://127.0.0.1:9")
    )
    assert no_query.status == "not configured" and "QUERY" in no_query.detail


def test_exfiltration_flags_the_user_above_their_own_baseline(
    prometheus: PrometheusServer,
) -> None:
    # Series-free queries the real engine evaluates differently now and a week ago: mallory
    # sends 1000x her baseline since yesterday, alice the same as always, bob is new.
    since = int(time.time()) - 86400
    egress = (
        f'label_replace(vector(10 + 10000 * (time() > bool {since})), "user", "mallory", "", "")'
        ' or label_replace(vector(500), "user", "alice", "", "")'
        f' or label_replace(vector(7 * (time() > bool {since})), "user", "bob", "", "")'
    )
    settings = SecuritySettings(egress_bytes_query=egress, exfiltration_factor=5)
    got = exfiltration_signals.fn(
        settings=settings, prometheus=PrometheusSettings(url=prometheus.url)
    )
    assert got.status == "ok" and [s.signal for s in got.signals] == ["egress bytes"]
    users = {u.user: u for u in got.signals[0].users}
    assert users["mallory"].flagged and users["mallory"].ratio == pytest.approx(1001)
    assert not users["alice"].flagged and users["alice"].ratio == pytest.approx(1)
    assert users["bob"].flagged and users["bob"].baseline == 0
    assert {u.user for _, u in got.flagged} == {"mallory", "bob"}
