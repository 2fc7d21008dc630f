"""The `security-breach` runbook on real components: the test Kubernetes API (the affected
Deployment, a Secret and the workloads that use it or not), the sandbox backend (forced
password reset, its PostgreSQL audit table), Redis (session keys under a prefix of this
test), Prefect (every approval pause in one run, verified votes) and sinks for the pages.
Nothing of ours is mocked.

The API server stores NetworkPolicies but enforces none (no CNI): the policy object is
what is tested.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
import redis
import yaml
from kubernetes import client as k8s
from prefect.client.orchestration import get_client

from flows.common import md_escape
from flows.security.checklist import ARTIFACT_KEY, HUMAN_ITEMS
from flows.security_breach import (
    RUNBOOK,
    SecurityBreachOutcome,
    SecurityBreachParams,
    security_breach,
)
from tasks.approvals.store import latest_request
from tasks.kubernetes import RESTARTED_AT
from tests.fixtures.approvals import vote
from tests.fixtures.kube import KubeCluster
from tests.fixtures.prefect_runs import (
    flow_run_artifacts,
    flow_run_logs,
    paused_runs,
    task_run_states,
    wait_for_paused_run,
)
from tests.fixtures.sandbox import Sandbox
from tests.fixtures.sinks import Sink, Sinks
from tests.integration.kube_helpers import deployment_body, rolled_out, wait_until

pytestmark = [pytest.mark.kube, pytest.mark.usefixtures("prefect_api")]

TARGET = {"app": "akig", "component": "akig-backend"}
SECRET = "db-creds"
OLD_VALUE = "old-" + uuid.uuid4().hex  # the value a leak would show (and the scan looks for)
SESSIONS = 5


def _with_secret(body: dict[str, Any], how: str) -> dict[str, Any]:
    """The Deployment's container uses the Secret by volume, secretKeyRef or envFrom."""
    pod = body["spec"]["template"]["spec"]
    app = pod["containers"][0]
    if how == "volume":
        pod["volumes"] = [{"name": "creds", "secret": {"secretName": SECRET}}]
        app["volumeMounts"] = [{"name": "creds", "mountPath": "/creds"}]
    elif how == "secretKeyRef":
        app["env"].append(
            {"name": "PW", "valueFrom": {"secretKeyRef": {"name": SECRET, "key": "password"}}}
        )
    else:
        app["envFrom"] = [{"secretRef": {"name": SECRET}}]
    return body


@dataclass
class Breach:
    """The platform namespace with the affected pods, the Secret and its users, and the
    sessions and users the secure steps act on."""

    cluster: KubeCluster
    namespace: str
    sandbox: Sandbox
    world: Any
    redis: redis.Redis
    session_prefix: str
    evidence_dir: Path

    @property
    def core(self) -> Any:
        return k8s.CoreV1Api(self.cluster.api())

    @property
    def apps(self) -> Any:
        return k8s.AppsV1Api(self.cluster.api())

    @property
    def net(self) -> Any:
        return k8s.NetworkingV1Api(self.cluster.api())

    def secret_values(self, name: str = SECRET) -> dict[str, str]:
        data = self.core.read_namespaced_secret(name, self.namespace).data or {}
        return {k: base64.b64decode(v).decode() for k, v in data.items()}

    def policies(self) -> list[Any]:
        return list(self.net.list_namespaced_network_policy(self.namespace).items)

    def restarted(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for dep in self.apps.list_namespaced_deployment(self.namespace).items:
            ann = dep.spec.template.metadata.annotations or {}
            out[dep.metadata.name] = ann.get(RESTARTED_AT)
        return out

    def sessions(self) -> int:
        return len(list(self.redis.scan_iter(match=f"{self.session_prefix}*", count=500)))

    def must_reset(self) -> int:
        with psycopg.connect(self.sandbox.settings.database_dsn) as conn:
            conn.execute(
                "ALTER TABLE users ADD COLUMN IF NOT EXISTS must_reset_password boolean"
                " NOT NULL DEFAULT false"
            )
            row = conn.execute("SELECT count(*) FROM users WHERE must_reset_password").fetchone()
        return int(row[0]) if row else 0

    def pods(self, selector: str) -> set[str]:
        return {
            p.metadata.name
            for p in self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        }


@pytest.fixture
def breach(
    kube_cluster: KubeCluster,
    kube_namespace: str,
    sandbox_backend: Sandbox,
    world_env: Any,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Iterator[Callable[[], Breach]]:
    made: list[Breach] = []

    def make() -> Breach:
        ns = kube_namespace
        apps: Any = k8s.AppsV1Api(kube_cluster.api())
        core: Any = k8s.CoreV1Api(kube_cluster.api())
        core.create_namespaced_secret(
            ns,
            {
                "metadata": {"name": SECRET},
                "stringData": {"password": OLD_VALUE, "user": "akig"},
            },
        )
        bodies = [
            _with_secret(deployment_body("akig-backend", replicas=2, labels=TARGET), "volume"),
            _with_secret(
                deployment_body("worker", replicas=1, labels={"app": "worker"}), "secretKeyRef"
            ),
            _with_secret(deployment_body("cron", replicas=1, labels={"app": "cron"}), "envFrom"),
            deployment_body("bystander", replicas=1, labels={"app": "bystander"}),
        ]
        for body in bodies:
            apps.create_namespaced_deployment(ns, body)
        settings = kube_cluster.settings(ns)
        for body in bodies:
            rolled_out(settings, ns, body["metadata"]["name"])
        prefix = f"test-breach-{uuid.uuid4().hex[:8]}:session:"
        client = redis.Redis.from_url(sandbox_backend.settings.redis_url, decode_responses=True)
        for i in range(SESSIONS):
            client.set(f"{prefix}{i}", "session")
        client.set(f"test-breach-other-{uuid.uuid4().hex[:6]}", "keep")  # never matched
        evidence = tmp_path / "evidence"
        env = {
            "RUNBOOKS_K8S_KUBECONFIG": str(kube_cluster.kubeconfig),
            "RUNBOOKS_K8S_NAMESPACE": ns,
            "RUNBOOKS_SECURITY_EVIDENCE_DIR": str(evidence),
            "RUNBOOKS_SECURITY_SESSION_KEY_PATTERN": f"{prefix}*",
            "RUNBOOKS_SECURITY_PASSWORD_RESET_TOKEN": os.environ.get(
                "RUNBOOKS_TEST_ADMIN_TOKEN", _admin_token()
            ),
            "RUNBOOKS_REDIS_URL": sandbox_backend.settings.redis_url,
            "RUNBOOKS_BACKEND_URL": sandbox_backend.url,
            "RUNBOOKS_PG_DSN": sandbox_backend.settings.database_dsn,
        }
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        got = Breach(kube_cluster, ns, sandbox_backend, world_env(), client, prefix, evidence)
        made.append(got)
        return got

    yield make
    for b in made:
        for key in b.redis.scan_iter(match="test-breach-*", count=500):
            b.redis.unlink(key)
        with psycopg.connect(b.sandbox.settings.database_dsn) as conn:
            conn.execute("UPDATE users SET must_reset_password = false WHERE must_reset_password")


def _admin_token() -> str:
    from tests.fixtures.sandbox import ADMIN_TOKEN

    return ADMIN_TOKEN


def acting(**kw: Any) -> SecurityBreachParams:
    base: dict[str, Any] = {
        "selector": "app=akig,component=akig-backend",
        "secrets": [SECRET],
        "dry_run": False,
        "ask_form": False,
        "notify": False,
        "approval_timeout_s": 120,
    }
    return SecurityBreachParams(**{**base, **kw})


RUNBOOK_CONTACTS = ("security-lead", "legal", "pr", "customer-support")


@pytest.fixture
def runbook_contacts(
    breach: Callable[[], Breach], sinks: Sinks, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[[], tuple[Breach, dict[str, Sink]]]:
    """The breach, and the runbook's four contacts added to the test escalation config,
    each with a sink of its own."""

    def make() -> tuple[Breach, dict[str, Sink]]:
        b = breach()
        config = yaml.safe_load(Path(os.environ["RUNBOOKS_ESCALATION_CONFIG_FILE"]).read_text())
        own: dict[str, Sink] = {}
        for name in RUNBOOK_CONTACTS:
            own[name] = sinks.slack()
            config["contacts"][name] = {"channels": [own[name].save_block(f"test-breach-{name}")]}
        path = tmp_path / "escalation-breach.yaml"
        path.write_text(yaml.safe_dump(config))
        monkeypatch.setenv("RUNBOOKS_ESCALATION_CONFIG_FILE", str(path))
        return b, own

    return make


def start(params: SecurityBreachParams) -> tuple[Future[Any], UUID, ThreadPoolExecutor]:
    """Run the flow in a thread; its id once it first pauses (for an approval)."""
    before = set(paused_runs(RUNBOOK))
    pool = ThreadPoolExecutor(1)
    fut = pool.submit(security_breach, params, return_state=True)
    return fut, wait_for_paused_run(RUNBOOK, ignore=before, timeout=120), pool


def asked_for(run_id: UUID, kind: str, timeout: float = 90) -> None:
    """Wait until the run is paused on an approval request for `kind`."""

    def check() -> bool:
        with get_client(sync_client=True) as client:
            req = latest_request(client, run_id)
            run = client.read_flow_run(run_id)
        return bool(
            req
            and req.actions
            and req.actions[0].startswith(kind + " ")
            and run.state is not None
            and run.state.is_paused()
        )

    wait_until(check, timeout=timeout, interval=0.2, what=f"approval request for {kind}")


def outcome(state: Any) -> SecurityBreachOutcome:
    assert state.is_completed(), state.message
    out = state.result()
    assert isinstance(out, SecurityBreachOutcome)
    return out


def statuses(out: SecurityBreachOutcome) -> dict[str, str]:
    return {
        s.step: s.status for s in out.steps if s.number in {"1", "2", "3", "4", "5a", "5b", "5c"}
    }


def all_logs(run_id: UUID) -> list[str]:
    """Every log line the run (and its tasks and subflows' tasks) sent, page by page."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    flow_run_logs(run_id)  # drains the pending lines first
    lines: list[str] = []
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
                limit=200,
                offset=len(lines),
            )
            lines += [log.message for log in page]
            if len(page) < 200:
                return lines


def scan_for(run_id: UUID | None, values: list[str]) -> None:
    """No value appears in any log line, task state message or artifact of the run."""
    assert run_id is not None
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
        run = client.read_flow_run(run_id)
    texts = [
        *all_logs(run_id),
        *task_run_states(run_id),
        *[f"{a.key}: {a.description}: {a.data}" for a in arts],
        json.dumps(run.parameters),
        str(run.state.message if run.state else ""),
    ]
    assert len(texts) > 10 and any(SECRET in t for t in texts)  # the scan saw the rotation
    for value in values:
        for variant in {value, base64.b64encode(value.encode()).decode()}:
            leaked = [t for t in texts if variant in t]
            assert not leaked, f"a secret value leaked: {leaked[0][:200]}"


def test_dry_run_captures_evidence_plans_every_step_and_changes_nothing(
    breach: Callable[[], Breach],
) -> None:
    b = breach()
    restarted = b.restarted()
    params = acting(dry_run=True, notify=True)
    state = security_breach(params, return_state=True)
    out = outcome(state)
    assert statuses(out) == {
        "investigate": "done",
        "isolate": "planned",
        "assess": "done",
        "notify": "planned",
        "rotate secrets": "planned",
        "force password reset": "planned",
        "revoke sessions": "planned",
    }
    # The plan names the pods, the Secret and its users, the session and user counts.
    target_pods = b.pods("app=akig,component=akig-backend")
    assert len(target_pods) == 2
    isolate = out.step("isolate").detail
    assert all(p in isolate for p in target_pods)
    rotate = out.step("rotate secrets").detail
    for user in ("akig-backend", "worker", "cron"):
        assert f"deployment/{user}" in rotate
    assert "bystander" not in rotate
    assert f"delete {SESSIONS} session key(s)" in out.step("revoke sessions").detail
    assert "user(s)" in out.step("force password reset").detail
    assert "server dry run" in out.step("isolate").detail or "Plan:" in out.step("isolate").detail
    # Nothing changed anywhere.
    assert b.policies() == []
    assert b.secret_values()["password"] == OLD_VALUE
    assert b.restarted() == restarted
    assert b.sessions() == SESSIONS and b.must_reset() == 0
    assert b.world.counts() == {}  # a dry run pages nobody
    # The evidence bundle is there, and indexed in the checklist artifact.
    assert out.evidence is not None and set(out.evidence.pods) == target_pods
    run_id = state.state_details.flow_run_id
    (md,) = flow_run_artifacts(run_id, ARTIFACT_KEY)
    assert out.evidence.manifest_sha256 in md and "WAF rules" in md
    # ... every file of it, with its hash (the artifact is the bundle's index).
    assert out.evidence.files
    for f in out.evidence.files:
        cells = [md_escape(v) for v in (f.path, f.kind, f.bytes, f.sha256)]
        assert "| " + " | ".join(cells) + " |" in md, f.path
    assert "open" in md and "Image drift" in md
    scan_for(run_id, [OLD_VALUE])


def test_every_change_approved_evidence_first_no_value_leaks_and_a_second_run_rotates_nothing(
    runbook_contacts: Callable[[], tuple[Breach, dict[str, Sink]]],
) -> None:
    b, own = runbook_contacts()
    before = b.restarted()
    incident = f"inc-{uuid.uuid4().hex[:8]}"
    target_pods = b.pods("app=akig,component=akig-backend")
    fut, run_id, pool = start(acting(incident=incident, notify=True))
    with pool:
        asked_for(run_id, "isolate")
        assert b.policies() == []  # nothing before the approval
        vote(run_id, "security-team", reason="contain the backend")
        asked_for(run_id, "rotate-secrets")
        assert b.secret_values()["password"] == OLD_VALUE
        vote(run_id, "security-team", reason="leaked credentials")
        vote(run_id, "leadership", reason="agreed")
        asked_for(run_id, "force-password-reset")
        vote(run_id, "on-call")
        asked_for(run_id, "revoke-sessions")
        vote(run_id, "security-team")
        out = outcome(fut.result(timeout=240))
    assert statuses(out) == {
        "investigate": "done",
        "isolate": "done",
        "assess": "done",
        "notify": "done",
        "rotate secrets": "done",
        "force password reset": "done",
        "revoke sessions": "done",
    }, [(s.step, s.status, s.detail) for s in out.steps]
    # Who approved, and why, on each changing step.
    assert out.step("isolate").who == "security-team"
    assert "contain the backend" in out.step("isolate").detail
    assert set(out.step("rotate secrets").who.split(", ")) == {"security-team", "leadership"}
    assert "leaked credentials" in out.step("rotate secrets").detail
    # ... and in the checklist artifact itself, whole.
    (md,) = flow_run_artifacts(run_id, ARTIFACT_KEY)
    assert "contain the backend" in md and "leaked credentials" in md
    assert out.step("force password reset").who == "on-call"
    # Isolation: exactly the affected pods, labelled ours; no pod deleted.
    (policy,) = b.policies()
    assert policy.metadata.labels["app.kubernetes.io/managed-by"] == "incident-runbooks"
    assert policy.spec.pod_selector.match_labels == TARGET
    assert sorted(policy.spec.policy_types) == ["Egress", "Ingress"]
    # The pods it isolated are exactly those the selector picked (the policy object is what
    # the test API server stores; it enforces nothing).
    assert all(p in out.step("isolate").detail for p in target_pods)
    assert "bystander" not in out.step("isolate").detail
    # Rotation: new values, a backup with the old ones, exactly the users restarted.
    new = b.secret_values()
    assert new["password"] != OLD_VALUE
    backups = [
        s for s in b.core.list_namespaced_secret(b.namespace).items if "backup" in s.metadata.name
    ]
    assert len(backups) == 1
    assert b.secret_values(backups[0].metadata.name)["password"] == OLD_VALUE
    after = b.restarted()
    changed = {n for n in after if after[n] != before[n]}
    assert changed == {"akig-backend", "worker", "cron"}
    # Sessions and passwords.
    assert b.sessions() == 0 and b.must_reset() > 0
    # Evidence before any change: the bundle was complete before the policy and restarts.
    assert out.evidence is not None
    manifest = Path(out.evidence.directory) / "manifest.json"
    # The API server stamps whole seconds: the bundle's last write, cut to its second, is
    # no later than the policy's creation and every restart.
    written = datetime.fromtimestamp(int(manifest.stat().st_mtime), UTC)
    created = policy.metadata.creation_timestamp
    assert written <= created, (written, created)
    restart_times = [datetime.fromisoformat(after[n] or "") for n in changed]
    assert all(written <= t for t in restart_times), (written, restart_times)
    evidence_row = out.step("investigate")
    assert evidence_row.at <= out.step("isolate").at <= out.step("rotate secrets").at
    # Notified: critical, topic security (on-call, leadership, security team).
    assert {"on-call", "leadership", "security-team"} <= set(b.world.counts())
    assert {name: len(sink.delivered) for name, sink in own.items()} == dict.fromkeys(
        RUNBOOK_CONTACTS, 1
    )
    assert str(run_id) in json.dumps(own["legal"].delivered[0])  # the run's link
    # No secret value, old or new, in any log line or artifact of the run.
    scan_for(run_id, [OLD_VALUE, new["password"]])

    # A second run for the same incident: the earlier bundle verifies, nothing re-rotated.
    second = security_breach(
        acting(
            incident=incident,
            isolate=False,
            reset_passwords=False,
            revoke_sessions=False,
            notify=True,
        ),
        return_state=True,
    )
    again = outcome(second)
    assert again.step("rotate secrets").status == "skipped"
    assert "already rotated" in again.step("rotate secrets").detail
    assert b.secret_values() == new and b.restarted() == after
    assert [c.ok for c in again.earlier_bundles] == [True]
    # ... and pages nobody twice for the same incident.
    assert {name: len(sink.delivered) for name, sink in own.items()} == dict.fromkeys(
        RUNBOOK_CONTACTS, 1
    )
    scan_for(second.state_details.flow_run_id, [OLD_VALUE, new["password"]])


def test_refused_at_each_step_changes_nothing_and_offers_the_next(
    breach: Callable[[], Breach],
) -> None:
    b = breach()
    before = b.restarted()
    fut, run_id, pool = start(acting())
    with pool:
        asked_for(run_id, "isolate")
        vote(run_id, "security-team", "refuse", reason="not yet")
        asked_for(run_id, "rotate-secrets")
        vote(run_id, "leadership", "refuse", reason="wait for legal")
        asked_for(run_id, "force-password-reset")
        vote(run_id, "on-call", "refuse")
        asked_for(run_id, "revoke-sessions")
        vote(run_id, "security-team", "refuse")
        out = outcome(fut.result(timeout=240))
    refusers = {
        "isolate": "security-team",
        "rotate secrets": "leadership",
        "force password reset": "on-call",
        "revoke sessions": "security-team",
    }
    for step, who in refusers.items():
        row = out.step(step)
        assert row.status == "refused", (step, row.detail)
        assert row.who == who and "refused by an allowed approver" in row.detail
    # Why each was refused is recorded with who refused it.
    assert "not yet" in out.step("isolate").detail
    assert "wait for legal" in out.step("rotate secrets").detail
    assert b.policies() == []
    assert b.secret_values()["password"] == OLD_VALUE
    assert b.restarted() == before
    assert b.sessions() == SESSIONS and b.must_reset() == 0


def test_a_rerun_verifies_the_earlier_bundle_and_names_a_changed_byte(
    breach: Callable[[], Breach],
) -> None:
    breach()
    params = acting(dry_run=True, incident=f"inc-{uuid.uuid4().hex[:8]}")
    first = outcome(security_breach(params, return_state=True))
    assert first.evidence is not None and first.earlier_bundles == []
    root = Path(first.evidence.directory)
    pod_file = next(f.path for f in first.evidence.files if f.kind == "pod")
    data = bytearray((root / pod_file).read_bytes())
    data[len(data) // 2] ^= 0x01
    (root / pod_file).write_bytes(bytes(data))
    second = security_breach(params, return_state=True)
    # The re-run re-hashes the earlier bundle: step 1 fails and names the changed file.
    assert second.is_failed()
    (md,) = flow_run_artifacts(second.state_details.flow_run_id, ARTIFACT_KEY)
    row = next(line for line in md.splitlines() if line.startswith("| 1 | investigate |"))
    assert "| FAILED |" in row and "CHANGED" in row, row
    assert f"**CHANGED**: {md_escape(pod_file)}" in md


def test_no_rotation_restarts_a_pod_whose_logs_were_not_kept(
    breach: Callable[[], Breach],
) -> None:
    b = breach()
    # The affected pods ran, but the kubelet no longer has their logs: the bundle cannot keep
    # them, and rotating db-creds would restart akig-backend, replacing those pods.
    b.apps.patch_namespaced_deployment(
        "akig-backend",
        b.namespace,
        {"spec": {"template": {"metadata": {"annotations": {"fake-kubelet/log-gone": "true"}}}}},
    )
    rolled_out(b.cluster.settings(b.namespace), b.namespace, "akig-backend")
    before = b.restarted()
    params = acting(isolate=False, reset_passwords=False, revoke_sessions=False)
    out = outcome(security_breach(params, return_state=True))
    assert out.evidence is not None
    affected = b.pods("app=akig,component=akig-backend")
    assert set(out.evidence.unkept) == affected
    assert set(out.evidence.unkept.values()) == {"deployment/akig-backend"}
    row = out.step("rotate secrets")
    assert row.status == "skipped" and "whose logs the evidence bundle could not keep" in (
        row.detail
    ), row.detail
    # Nobody was asked, nothing changed: the Secret, its backup, every workload.
    assert b.secret_values()["password"] == OLD_VALUE
    assert b.restarted() == before
    assert b.pods("app=akig,component=akig-backend") == affected


def test_timeout_at_each_step_changes_nothing(breach: Callable[[], Breach]) -> None:
    b = breach()
    before = b.restarted()
    started = time.monotonic()
    # auto_approve too: every change of this runbook still waits for a human (`always`).
    params = acting(approval_timeout_s=10, auto_approve=True)
    out = outcome(security_breach(params, return_state=True))
    assert time.monotonic() - started >= 36  # four approvals, each waited for (~10 s)
    for step in ("isolate", "rotate secrets", "force password reset", "revoke sessions"):
        row = out.step(step)
        assert row.status == "refused" and "no answer within 10 s" in row.detail, row.detail
        assert row.who == "nobody"
    assert b.policies() == []
    assert b.secret_values()["password"] == OLD_VALUE
    assert b.restarted() == before
    assert b.sessions() == SESSIONS and b.must_reset() == 0


def test_human_items_answered_in_the_form_with_who_and_when(
    breach: Callable[[], Breach],
) -> None:
    from prefect.flow_runs import resume_flow_run

    breach()
    params = acting(
        isolate=False,
        rotate=False,
        reset_passwords=False,
        revoke_sessions=False,
        notify=False,
        ask_form=True,
    )
    fut, run_id, pool = start(params)
    with pool:
        resume_flow_run(
            run_id,
            run_input={
                "by": "Dana (security lead)",
                "support_briefed": True,
                "support_briefed_note": "macro sent to support",
                "root_cause": False,
            },
        )
        out = outcome(fut.result(timeout=60))
    rows = {r.step: r for r in out.steps if r.number == "6"}
    assert list(rows) == list(HUMAN_ITEMS.values())
    briefed = rows[HUMAN_ITEMS["support_briefed"]]
    assert briefed.status == "done" and briefed.who == "Dana (security lead)"
    assert briefed.detail == "macro sent to support"
    assert rows[HUMAN_ITEMS["root_cause"]].status == "open"
    assert out.step("WAF rules").status == "open"


def test_no_evidence_no_change(
    breach: Callable[[], Breach], monkeypatch: pytest.MonkeyPatch
) -> None:
    b = breach()
    # The evidence folder cannot be written: the capture fails, every change refuses.
    blocker = b.evidence_dir
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")
    state = security_breach(acting(), return_state=True)
    assert state.is_failed()
    run_id = state.state_details.flow_run_id
    (md,) = flow_run_artifacts(run_id, ARTIFACT_KEY)
    assert "no evidence bundle was captured" in md
    assert b.policies() == [] and b.secret_values()["password"] == OLD_VALUE
    assert b.sessions() == SESSIONS


def test_bad_parameters_are_refused_before_anything() -> None:
    with pytest.raises(ValueError, match="label selector"):
        SecurityBreachParams(selector="app=(")
    with pytest.raises(ValueError, match="DNS-1123"):
        SecurityBreachParams(selector="app=x", secrets=["Bad_Name"])
    with pytest.raises(ValueError, match="selector is required"):
        SecurityBreachParams(selector="")
