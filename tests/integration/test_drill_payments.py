"""`make drill payments` as a test: the real harness, the failing gateway, the alert, the
runbook's page and retries, the ledgers, recovery.

Asserts the order of the timeline (every step seen, none before its cause), that every
payment failed at the alert ended charged exactly once or failed with a reason, with no
payment charged twice at the gateway (the drill reads `gateway_charges` and fails at
`verify passed` otherwise), the post-incident record's figures, that neither the receiver's
nor the payments API's tokens are printed, and that nothing is left running, on disk or in
Redis. Timings are the drill's to print (`make drill`), not asserted here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

import drills.payments_parts
from drills.payments import STEPS, PaymentFailures
from drills.payments_parts import REDIS_URL, PaymentsSandbox
from tests.fixtures.drills import left_behind, run_one

pytestmark = pytest.mark.timeout(300)


def test_payments_drill_retries_each_once_in_order_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[PaymentsSandbox] = []
    started = drills.payments_parts.running_payments

    @contextlib.contextmanager
    def remembered(admin_dsn: str, workdir: Path) -> Iterator[PaymentsSandbox]:
        with started(admin_dsn, workdir) as sandbox:
            seen.append(sandbox)
            yield sandbox

    monkeypatch.setattr("drills.payments.running_payments", remembered)
    drill = PaymentFailures()
    ran = run_one(drill, monkeypatch)
    outcome, said = ran.outcome, ran.said

    assert outcome.ok, f"failed at {outcome.failed_step}: {outcome.error}"
    tl = outcome.timeline
    assert tl.missing() == []
    assert tl.out_of_order() == []
    order = [s.name for s in sorted(STEPS, key=lambda s: tl.marks[s.name].at)]
    assert order[0] == "fault injected"
    assert order.index("alert firing") < order.index("gateway ok")
    assert order.index("webhook received") < order.index("first task") < order.index("action done")
    assert order.index("action done") < order.index("verify passed")
    assert order.index("action done") < order.index("alert resolved")
    assert "gateway mode fails" in tl.marks["fault injected"].detail
    assert tl.marks["page delivered"].detail == "payments-team (payments-team-slack)"
    assert "met 0 " not in tl.marks["gateway ok"].detail  # the run met the flaky gateway
    # The drill's own reading of the ledgers, printed once it found nothing wrong.
    [ledger] = [s for s in said if s.startswith("payments: of ")]
    assert "gateway charges per payment at most 1" in ledger
    assert len(drill.failed_at_alert) > 0
    assert outcome.record["recovered"] is True
    assert outcome.record["started_by"] == "alert startsAt"
    assert 0 < outcome.record["first_action_s"] < outcome.record["recovery_s"]

    [sandbox] = seen
    for secret in (sandbox.payments_token, sandbox.gateway_key, sandbox.admin_token):
        assert secret not in ran.printed
    workdir = ran.workdir
    assert not Path(workdir).exists()
    assert left_behind(workdir) == []
    for url in (sandbox.backend_url, sandbox.gateway_url):  # both processes gone
        with pytest.raises(httpx.ConnectError):
            httpx.get(url, timeout=2)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        for prefix in (sandbox.key_prefix, sandbox.ledger_prefix):
            assert list(client.scan_iter(match=f"{prefix}*")) == []
    finally:
        client.close()
