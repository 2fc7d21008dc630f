"""The `payment-failure` runbook against the real sandbox payments API and gateway,
PostgreSQL, Redis and a Prefect test server: each payment charged at most once under every
gateway fault, every payment accounted for; the token, the lock, the caps, the dry run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.flow_runs import resume_flow_run
from prefect.settings import PREFECT_API_URL

from flows.payment_failure import (
    RUNBOOK,
    PaymentFailureOutcome,
    PaymentFailureParams,
    payment_failure,
    target_of,
)
from tasks.clients import redis_client
from tasks.locks import lock_name, target_lock
from tasks.payments.keys import KeyLedger
from tasks.settings import PaymentsSettings
from tests.fixtures.prefect_runs import (
    flow_run_artifacts,
    flow_run_logs,
    runs_in_state,
    task_runs,
    wait_for_paused_run,
)

pytestmark = pytest.mark.usefixtures("prefect_api")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def pay(
    make_payments_sandbox: Any,
    world_env: Any,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> Any:
    """A payments sandbox, every RUNBOOKS_* setting pointed at it; pages go to test sinks.
    `@pytest.mark.gateway_timeout(s)` sets how long the backend waits for the gateway."""
    marker = request.node.get_closest_marker("gateway_timeout")
    # a tests.fixtures.sandbox.PaymentsSandbox
    sb = make_payments_sandbox(gateway_timeout_s=marker.args[0] if marker else 2.0)
    world = world_env()
    monkeypatch.setenv("RUNBOOKS_PAYMENTS_URL", sb.url)
    monkeypatch.setenv("RUNBOOKS_PAYMENTS_TOKEN", sb.payments_token)
    monkeypatch.setenv("RUNBOOKS_PAYMENTS_GATEWAY_URL", sb.gateway_url)
    monkeypatch.setenv("RUNBOOKS_PAYMENTS_GATEWAY_TOKEN", sb.gateway_key)
    monkeypatch.setenv("RUNBOOKS_PAYMENTS_TIMEOUT_S", "10")
    monkeypatch.setenv("RUNBOOKS_PAYMENTS_LEDGER_PREFIX", f"test:ledger:{uuid.uuid4().hex[:8]}:")
    monkeypatch.setenv(
        "RUNBOOKS_PAYMENTS_FAILED_STREAM_KEY", f"{sb.settings.key_prefix}payments:failed"
    )
    monkeypatch.setenv("RUNBOOKS_REDIS_URL", sb.settings.redis_url)
    monkeypatch.setenv("RUNBOOKS_PG_DSN", sb.dsn)
    monkeypatch.setenv("RUNBOOKS_K8S_KUBECONFIG", "/nonexistent/kubeconfig")
    sb.world = world
    return sb


def act(**kw: Any) -> PaymentFailureParams:
    """Params of a run that acts without an approval (`unless-auto`)."""
    base: dict[str, Any] = {"dry_run": False, "auto_approve": True, "failure_rate_max": 1.0}
    return PaymentFailureParams(**{**base, **kw})


def run(params: PaymentFailureParams) -> tuple[Any, Any]:
    """(the final state, the flow run id)."""
    state = payment_failure(params, return_state=True)
    return state, state.state_details.flow_run_id


def outcome(state: Any) -> PaymentFailureOutcome:
    assert state.is_completed(), state.message
    out = state.result()
    assert isinstance(out, PaymentFailureOutcome)
    return out


def row(out: PaymentFailureOutcome, prefix: str) -> Any:
    return next(r for r in out.checks if r.item.startswith(prefix))


def assert_once_and_accounted(sb: Any, ids: list[str]) -> None:
    """At most one gateway charge each, the backend agrees, every payment succeeded."""
    gateway = sb.gateway_charges_per_payment(ids)
    backend = sb.backend_charges_per_payment(ids)
    assert gateway == dict.fromkeys(ids, 1), gateway
    assert backend == gateway
    assert not set(ids) & set(sb.failed_view())
    assert not set(ids) & set(sb.stream_ids())


def test_dry_run_changes_nothing_then_a_run_recovers_each_payment_once(pay: Any) -> None:
    ids = pay.seed(6)
    state, run_id = run(PaymentFailureParams())  # dry run by default
    out = outcome(state)
    assert out.outcome == "planned" and out.failed_found == 6
    (action,) = out.plan
    assert action.kind == "retry-payments" and action.target == target_of(PaymentFailureParams())
    assert sorted(action.payment_ids) == sorted(ids)
    assert "EUR 11,994 (minor)" in action.summary and ids[0] in action.summary
    assert row(out, "payment gateway").verdict == "pass"
    assert row(out, "failed-transactions queue (SQL").observed.startswith("6 queued")
    assert row(out, "failed-transactions queue (Redis").observed.startswith("6 queued")
    assert row(out, "recent rollouts").verdict == "unavailable"  # no Kubernetes here
    assert sum(pay.gateway_charges_per_payment(ids).values()) == 0
    assert sorted(pay.failed_view()) == sorted(ids)
    assert pay.world.counts().get("on-call") == 1  # paged critical at the start
    (md,) = flow_run_artifacts(run_id, RUNBOOK)
    assert "Paged" in md and pay.payments_token not in md

    state, run_id = run(act())
    out = outcome(state)
    assert out.outcome == "acted", out.note
    assert out.retry is not None and out.retry.counts == {"succeeded": 6}
    assert out.verify is not None and out.verify.healthy and out.verify.rto_met
    rec = out.verify.reconciliation
    assert rec is not None
    assert (rec.recovered, rec.anomalies, rec.recovered_amounts) == (6, [], {"EUR": 11_994})
    assert_once_and_accounted(pay, ids)
    assert any(name.startswith("retry-batch-") for name in task_runs(run_id))
    (md,) = flow_run_artifacts(run_id, RUNBOOK)
    assert "Verify (reconciliation)" in md and "**met**" in md
    # The progress artifact, updated per batch, ends at 100 %.
    assert [float(p) for p in flow_run_artifacts(run_id, "payment-failure-retry")] == [100.0]


def test_gateway_fails_transiently_then_succeeds(pay: Any) -> None:
    ids = pay.seed(10)
    pay.set_gateway("fails", share=0.5)
    first = outcome(run(act())[0])
    pay.set_gateway("ok")
    second = outcome(run(act())[0])
    assert second.outcome in ("acted", "nothing to do"), second.note
    assert_once_and_accounted(pay, ids)
    assert first.retry is not None
    assert sum(first.retry.counts.values()) == 10  # every payment accounted for in run 1


@pytest.mark.parametrize("mode", ["charge_then_timeout", "charge_then_5xx"])
def test_an_unknown_outcome_is_resolved_with_the_same_key_never_a_second_charge(
    pay: Any, mode: str
) -> None:
    ids = pay.seed(5)
    pay.set_gateway(mode, share=1.0)
    first, first_id = run(act(concurrency=5, failure_min_sample=10))
    # Every call charged, then no answer: the gateway stop fires, the run fails and pages.
    assert first.is_failed() and "gateway failure rate" in (first.message or "")
    (md,) = flow_run_artifacts(first_id, RUNBOOK)
    assert "Follow-up page (gateway-down)" in md and "its key is still open" in md
    assert pay.gateway_charges_per_payment(ids) == dict.fromkeys(ids, 1)
    ledger = KeyLedger(redis_client(), PaymentsSettings().ledger_prefix)
    pinned = {pid: ledger.open_key(pid) for pid in ids}
    assert all(pinned.values()), pinned
    pay.set_gateway("ok")
    second = outcome(run(act())[0])
    assert second.outcome == "acted" and second.retry is not None
    assert second.retry.counts == {"succeeded": 5}
    # Asked again with the key pinned for the unknown outcome: the gateway replayed its charge.
    assert {o.payment_id: o.key for o in second.retry.outcomes} == pinned
    assert all(o.reused_key for o in second.retry.outcomes)
    assert_once_and_accounted(pay, ids)


def test_a_wrong_or_missing_token_is_a_clear_error_nothing_retried_nothing_leaked(
    pay: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = pay.seed(3)
    for token in ("wrong-token-" + uuid.uuid4().hex, ""):
        monkeypatch.setenv("RUNBOOKS_PAYMENTS_TOKEN", token)
        state, run_id = run(act())
        assert state.is_failed()
        assert "refused the token (HTTP 401)" in (state.message or "") or "401" in str(
            state.result(raise_on_failure=False)
        )
        text = "\n".join(flow_run_logs(run_id) + flow_run_artifacts(run_id))
        assert "PaymentsAuthError" in text
        assert pay.payments_token not in text and (not token or token not in text)
        assert not any(name.startswith("retry-batch") for name in task_runs(run_id))
    assert sum(pay.gateway_charges_per_payment(ids).values()) == 0
    assert sorted(pay.failed_view()) == sorted(ids)


def test_the_amount_cap_stops_the_run_mid_batch_and_says_so(pay: Any) -> None:
    ids = pay.seed(10, amount=1000)
    state, run_id = run(act(max_amount=4500, batch_size=10))
    out = outcome(state)
    assert out.retry is not None and out.retry.counts == {"succeeded": 4, "not_attempted": 6}
    assert out.retry.stopped is not None and out.retry.stopped.startswith("amount cap reached")
    charged = {pid for pid, n in pay.gateway_charges_per_payment(ids).items() if n}
    assert len(charged) == 4 and all(n <= 1 for n in pay.gateway_charges_per_payment(ids).values())
    assert len(pay.failed_view()) == 6  # left for the next run, not forgotten
    (md,) = flow_run_artifacts(run_id, RUNBOOK)
    assert "amount cap reached" in md


def test_two_runs_at_once_one_acts_the_other_waits_and_retries_nothing(pay: Any) -> None:
    ids = pay.seed(8)
    params = act()
    with ThreadPoolExecutor(2) as pool:
        with target_lock(target_of(params)):
            others = set(runs_in_state(RUNBOOK, StateType.RUNNING))
            futures = [pool.submit(payment_failure, params, return_state=True) for _ in range(2)]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                running = set(runs_in_state(RUNBOOK, StateType.RUNNING)) - others
                if sum(1 for r in running if "failed-payments" in task_runs(r)) == 2:
                    break
                assert not any(f.done() for f in futures), [f.result() for f in futures]
                time.sleep(0.5)
            else:
                raise AssertionError("the two runs never both planned")
        outs = [outcome(f.result(timeout=300)) for f in futures]
    acted = [o for o in outs if o.outcome == "acted"]
    skipped = [o for o in outs if o.outcome == "skipped"]
    assert len(acted) == 1 and len(skipped) == 1, [(o.outcome, o.note) for o in outs]
    assert "none of the approved payments is still failed" in skipped[0].note
    assert_once_and_accounted(pay, ids)


KILLED_FLOW = """
from flows.payment_failure import PaymentFailureParams, payment_failure

payment_failure(PaymentFailureParams(
    dry_run=False, auto_approve=True, failure_rate_max=1.0, concurrency=2, batch_size=4
))
"""


@pytest.mark.gateway_timeout(5.0)
def test_the_flow_process_sigkilled_mid_batch_then_rerun_no_double_charge_nothing_forgotten(
    pay: Any,
) -> None:
    ids = pay.seed(20)
    # Calls of 2 s: the kill lands while one is in flight, not in a gap between batches.
    pay.set_gateway("slow", delay_ms=2000)
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_FLOW], cwd=REPO, env=env)
    ledger = KeyLedger(redis_client(), PaymentsSettings().ledger_prefix)

    seen: set[str] = set(ids)  # the first look finds nothing fresh

    def in_flight() -> bool:
        """Some charged, and a call pinned since the last look: it has most of its 2 s still
        to run, so it is unanswered when the kill lands. (A key merely open could be
        answered in the moment between this look and the kill on a loaded machine.)"""
        nonlocal seen
        charged = sum(pay.gateway_charges_per_payment(ids).values())
        open_now = {pid for pid in ids if ledger.open_key(pid)}
        fresh, seen = open_now - seen, open_now
        return charged >= 3 and bool(fresh)

    try:
        deadline = time.monotonic() + 120
        while not in_flight():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no charge within 120 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    left = set(pay.failed_view())
    assert 0 < len(left) < 20  # killed mid-batch: some recovered, some not
    pinned = {pid: key for pid in ids if (key := ledger.open_key(pid))}
    assert pinned  # the calls in flight when it died: pinned, never answered to it
    # The killed run still holds the target's slot until its lease runs out (5 min); the
    # test frees it at once, as an operator does from the Concurrency page.
    with get_client(sync_client=True) as client:
        client.delete_global_concurrency_limit_by_name(lock_name(target_of(act())))
    pay.set_gateway("ok")
    out = outcome(run(act())[0])
    assert out.outcome == "acted" and out.retry is not None, out.note
    # A key the killed run pinned (its call in flight, or unanswered) is the one sent again.
    for o in out.retry.outcomes:
        if o.payment_id in pinned:
            assert o.key == pinned[o.payment_id] and o.reused_key
    assert_once_and_accounted(pay, ids)


def test_rto_at_risk_then_missed_pages_one_follow_up_each_and_fails_the_run(pay: Any) -> None:
    ids = pay.seed(4)
    started = datetime.now(UTC) - timedelta(seconds=400)
    state, run_id = run(act(batch_size=2, rto_s=300, incident_started_at=started))
    assert state.is_failed() and "RTO missed" in (state.message or "")
    assert_once_and_accounted(pay, ids)  # recovered, just too late
    (md,) = flow_run_artifacts(run_id, RUNBOOK)
    assert "Follow-up page (rto-at-risk)" in md and "Follow-up page (rto-missed)" in md
    assert "**MISSED**" in md
    # The first page, then one per reason: never the same page twice.
    assert pay.world.counts()["on-call"] == 3


def test_without_an_approval_nothing_is_retried(pay: Any) -> None:
    """Dry run off, no auto approve: the run pauses for an approval (policy unless-auto); a
    refusal (or no verified approval in time) retries nothing."""
    ids = pay.seed(3)
    params = PaymentFailureParams(dry_run=False, approval_timeout_s=10)
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(payment_failure, params)
        run_id = wait_for_paused_run(RUNBOOK)
        assert sum(pay.gateway_charges_per_payment(ids).values()) == 0  # waits for a human
        resume_flow_run(run_id, run_input={"approved": False, "approver": "bob", "reason": "no"})
        out = fut.result(timeout=180)
    assert out.outcome == "refused" and out.actions == [] and out.retry is None
    assert sum(pay.gateway_charges_per_payment(ids).values()) == 0
    assert sorted(pay.failed_view()) == sorted(ids)
