"""The sandbox payments API and simulated gateway, against real PostgreSQL, Redis and HTTP.

Every rule of the contract in docs/sandbox.md ("Payments"): key replay, reuse and in-flight,
each gateway mode, exactly one charge when the same key resumes an unknown outcome (and a
second charge when a new key is minted: the harness can see a double charge), auth, the
failed queue, metrics, seed/truncate, the bulk command.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest

from sandbox.db import database_dsn, drop_database
from sandbox.payments import idempotency
from sandbox.payments.schema import ensure_payments_schema
from sandbox.server import free_port
from sandbox.settings import SandboxSettings
from tests.fixtures.sandbox import ADMIN_DSN, ADMIN_TOKEN
from tests.integration.test_sandbox_backend import metric

UNKNOWN = {"result": "unknown", "error": "gateway_outcome_unknown", "retry_with_same_key": True}


def key() -> str:
    return "k-" + uuid.uuid4().hex


def test_retry_succeeds_once_and_the_same_key_replays_the_answer(payments_sandbox):
    pay = payments_sandbox
    [pid] = pay.seed(1)
    k = key()
    first = pay.retry(pid, k)
    assert first.status_code == 200
    body = first.json()
    assert body["result"] == "succeeded" and body["payment"]["status"] == "succeeded"
    assert body["payment"]["charges"] == [body["charge"]] and body["charge"].startswith("ch_")
    assert "idempotent-replayed" not in first.headers
    again = pay.retry(pid, k, body={})  # {} and no body are the same request
    assert again.status_code == 200 and again.content == first.content
    assert again.headers["Idempotent-Replayed"] == "true"
    assert pay.gateway_charges_per_payment([pid]) == {pid: 1}
    assert pay.backend_charges_per_payment([pid]) == {pid: 1}
    assert pay.payment(pid)["attempts"] == 2  # seeded after one failed attempt


def test_a_key_reused_for_another_request_is_422(payments_sandbox):
    pay = payments_sandbox
    a, b = pay.seed(2)
    k = key()
    assert pay.retry(a, k).status_code == 200
    other_payment = pay.retry(b, k)
    other_body = pay.retry(a, k, body={"note": "x"})
    for r in (other_payment, other_body):
        assert r.status_code == 422 and r.json() == {"error": "idempotency_key_reused"}
    assert pay.gateway_charges_per_payment([a, b]) == {a: 1, b: 0}
    assert pay.payment(b)["status"] == "failed"


def test_a_key_in_flight_is_409_and_charges_once(make_payments_sandbox):
    pay = make_payments_sandbox(gateway_timeout_s=5.0)
    pay.set_gateway("slow", delay_ms=800)
    [pid] = pay.seed(1)
    k = key()
    results: list[httpx.Response] = []
    barrier = threading.Barrier(2)

    def call() -> None:
        barrier.wait()
        results.append(pay.retry(pid, k))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 409]
    busy = next(r for r in results if r.status_code == 409)
    assert busy.json() == {"error": "idempotency_key_in_flight"}
    assert pay.gateway_charges_per_payment([pid]) == {pid: 1}
    # Once finished, the key replays the 200.
    assert pay.retry(pid, k).headers["Idempotent-Replayed"] == "true"


def test_another_key_while_a_payment_is_being_charged_waits(make_payments_sandbox):
    pay = make_payments_sandbox(gateway_timeout_s=5.0)
    pay.set_gateway("slow", delay_ms=800)
    [pid] = pay.seed(1)
    first: list[httpx.Response] = []
    t = threading.Thread(target=lambda: first.append(pay.retry(pid, key())))
    t.start()
    deadline = time.monotonic() + 5
    while pay.payment(pid)["charging_key"] is None and time.monotonic() < deadline:
        time.sleep(0.01)
    second_key = key()
    second = pay.retry(pid, second_key)
    t.join(timeout=20)
    assert second.status_code == 409 and second.json()["error"] == "idempotency_key_in_flight"
    assert first[0].status_code == 200
    # The refused key was not stored: it now gets the definite "already succeeded".
    after = pay.retry(pid, second_key)
    assert after.status_code == 409 and after.json()["result"] == "not_failed"
    assert pay.gateway_charges_per_payment([pid]) == {pid: 1}


def test_an_abandoned_lock_is_taken_over(payments_sandbox):
    pay = payments_sandbox
    [pid] = pay.seed(1)
    k = key()
    path = f"/api/payments/{pid}/retry"
    with psycopg.connect(pay.dsn) as conn:
        conn.execute(
            "INSERT INTO payment_idempotency_keys (key, request_hash, payment_id, locked_at)"
            " VALUES (%s, %s, %s, now() - interval '1 hour')",
            (k, idempotency.request_hash("POST", path, "{}"), pid),
        )
    assert pay.retry(pid, k).status_code == 200


def test_an_expired_key_counts_as_new_and_keys_are_kept_a_day(payments_sandbox):
    pay = payments_sandbox
    a, b = pay.seed(2)
    k = key()
    assert pay.retry(a, k).status_code == 200
    with psycopg.connect(pay.dsn) as conn:
        conn.execute(
            "UPDATE payment_idempotency_keys SET created_at = now() - interval '49 hours'"
            " WHERE key = %s",
            (k,),
        )
    # Past the TTL the key is forgotten: another request may use it.
    assert pay.retry(b, k).status_code == 200
    assert SandboxSettings().idempotency_key_ttl_s == 48 * 3600
    with pytest.raises(ValueError, match="greater than or equal"):
        SandboxSettings(idempotency_key_ttl_s=3600)


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({}, "idempotency_key_required"),
        ({"Idempotency-Key": ""}, "idempotency_key_required"),
        ({"Idempotency-Key": "x" * 256}, "idempotency_key_invalid"),
        ({"Idempotency-Key": "caf\u00e9".encode("latin-1")}, "idempotency_key_invalid"),
    ],
)
def test_a_missing_or_bad_key_is_400(payments_sandbox, headers, error):
    pay = payments_sandbox
    [pid] = pay.seed(1)
    with pay.api() as c:
        r = c.post(f"/api/payments/{pid}/retry", headers=headers)
    assert r.status_code == 400 and r.json() == {"error": error}
    assert pay.gateway_charges_per_payment([pid]) == {pid: 0}
    assert pay.retry(pid, "x" * 255).status_code == 200


def test_unknown_payment_is_a_stored_404(payments_sandbox):
    pay = payments_sandbox
    k = key()
    r = pay.retry("pay_00000000000000000000000000", k)
    assert r.status_code == 404 and r.json()["result"] == "not_found"
    again = pay.retry("pay_00000000000000000000000000", k)
    assert again.status_code == 404 and again.headers["Idempotent-Replayed"] == "true"


def test_a_succeeded_payment_is_not_charged_again(payments_sandbox):
    pay = payments_sandbox
    [pid] = pay.seed(1)
    assert pay.retry(pid, key()).status_code == 200
    k = key()
    r = pay.retry(pid, k)
    assert r.status_code == 409 and r.json()["result"] == "not_failed"
    assert r.json()["payment"]["status"] == "succeeded"
    assert pay.retry(pid, k).headers["Idempotent-Replayed"] == "true"
    assert pay.gateway_charges_per_payment([pid]) == {pid: 1}


def test_a_decline_is_definite_stored_and_queued(payments_sandbox):
    pay = payments_sandbox
    [pid] = pay.seed(1, declined_share=1.0)
    k = key()
    r = pay.retry(pid, k)
    assert r.status_code == 402
    body = r.json()
    assert body["result"] == "declined" and body["error"] == "card_declined"
    assert body["payment"]["status"] == "failed" and body["payment"]["attempts"] == 2
    assert body["payment"]["last_error"] == "card_declined"
    again = pay.retry(pid, k)
    assert again.content == r.content and again.headers["Idempotent-Replayed"] == "true"
    assert pay.payment(pid)["attempts"] == 2  # the replay did not try again
    assert pay.gateway_charges_per_payment([pid]) == {pid: 0}
    assert pay.stream_ids() == pay.failed_view() == [pid]


def test_slow_gateway_still_charges(payments_sandbox):
    pay = payments_sandbox
    pay.set_gateway("slow", delay_ms=250)
    [pid] = pay.seed(1)
    t0 = time.monotonic()
    r = pay.retry(pid, key())
    assert r.status_code == 200 and time.monotonic() - t0 >= 0.25
    assert pay.gateway_charges_per_payment([pid]) == {pid: 1}


@pytest.mark.parametrize(
    ("mode", "status", "charged"),
    [
        ("fails", 502, 0),
        ("timeout_before_charge", 504, 0),
        ("charge_then_timeout", 504, 1),
        ("charge_then_5xx", 502, 1),
        ("down", 502, 0),
    ],
)
def test_an_unknown_outcome_is_not_stored_and_the_same_key_ends_with_one_charge(
    payments_sandbox, mode, status, charged
):
    pay = payments_sandbox
    [pid] = pay.seed(1)
    attempts = pay.payment(pid)["attempts"]
    pay.set_gateway(mode)
    k = key()
    r = pay.retry(pid, k)
    assert r.status_code == status and r.json() == UNKNOWN
    assert "idempotent-replayed" not in r.headers
    row = pay.payment(pid)
    assert row["status"] == "failed" and row["attempts"] == attempts
    assert row["last_error"].startswith("gateway_outcome_unknown")
    assert pay.gateway_charges_per_payment([pid]) == {pid: charged}
    assert pay.backend_charges_per_payment([pid]) == {pid: 0}
    assert pay.stream_ids() == pay.failed_view() == [pid]
    # The gateway recovers; the SAME key resumes and ends with exactly one charge.
    pay.set_gateway("ok")
    done = pay.retry(pid, k)
    assert done.status_code == 200 and "idempotent-replayed" not in done.headers
    with pay.gateway_api() as g:
        at_gateway = g.get("/v1/charges", params={"payment_ref": pid}).json()["data"]
    assert [c["id"] for c in at_gateway] == [done.json()["charge"]]
    assert pay.gateway_charges_per_payment([pid]) == {pid: 1}
    assert pay.backend_charges_per_payment([pid]) == {pid: 1}
    assert pay.payment(pid)["status"] == "succeeded"
    assert pay.stream_ids() == pay.failed_view() == []


def test_a_new_key_after_charge_then_timeout_charges_twice(payments_sandbox):
    """The defect the runbook must never commit, made visible: the harness sees it."""
    pay = payments_sandbox
    [pid] = pay.seed(1)
    pay.set_gateway("charge_then_timeout")
    assert pay.retry(pid, key()).status_code == 504
    pay.set_gateway("ok")
    assert pay.retry(pid, key()).status_code == 200  # a NEW key: a new gateway key
    assert pay.gateway_charges_per_payment([pid]) == {pid: 2}
    assert pay.backend_charges_per_payment([pid]) == {pid: 1}


def test_rate_limit_is_429_with_retry_after_and_not_stored(payments_sandbox):
    pay = payments_sandbox
    [pid] = pay.seed(1)
    pay.set_gateway("rate_limit", retry_after_s=7)
    k = key()
    r = pay.retry(pid, k)
    assert r.status_code == 429 and r.headers["Retry-After"] == "7"
    assert r.json()["result"] == "rate_limited"
    assert pay.gateway_charges_per_payment([pid]) == {pid: 0}
    pay.set_gateway("ok")
    assert pay.retry(pid, k).status_code == 200


def test_share_hits_only_that_fraction(payments_sandbox):
    pay = payments_sandbox
    ids = pay.seed(40)
    pay.set_gateway("fails", share=0.5)
    statuses = [pay.retry(pid, key()).status_code for pid in ids]
    assert set(statuses) == {200, 502}
    assert 5 <= statuses.count(502) <= 35
    pay.set_gateway("fails", share=0.0)
    assert pay.retry(ids[statuses.index(502)], key()).status_code == 200


def test_gateway_status_page_and_down(payments_sandbox):
    pay = payments_sandbox
    with httpx.Client(base_url=pay.gateway_url) as g:
        assert g.get("/status").json()["status"] == "operational"
        pay.set_gateway("fails", share=0.3)
        status = g.get("/status").json()
        assert status["status"] == "degraded" and status["behaviour"]["share"] == 0.3
        pay.set_gateway("down")
        assert g.get("/status").json()["status"] == "major_outage"
        charges = g.get(
            "/v1/charges",
            params={"payment_ref": "x"},
            headers={"Authorization": f"Bearer {pay.gateway_key}"},
        )
        assert charges.status_code == 503
        read = g.get("/admin/behaviour", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert read.json()["mode"] == "down"


def test_gateway_charges_are_idempotent_and_listed_by_payment(payments_sandbox):
    pay = payments_sandbox
    body = {"amount": 500, "currency": "EUR", "customer": "cus_a", "payment_ref": "pay_ref_a"}
    with pay.gateway_api() as g:
        one = g.post("/v1/charges", json=body, headers={"Idempotency-Key": "g1"})
        two = g.post("/v1/charges", json=body, headers={"Idempotency-Key": "g1"})
        other = g.post("/v1/charges", json=body, headers={"Idempotency-Key": "g2"})
        mismatch = g.post(
            "/v1/charges", json={**body, "amount": 501}, headers={"Idempotency-Key": "g1"}
        )
        declined = g.post(
            "/v1/charges",
            json={**body, "customer": "cus_decline_1", "payment_ref": "pay_ref_b"},
            headers={"Idempotency-Key": "g3"},
        )
        listed = g.get("/v1/charges", params=[("payment_ref", "pay_ref_a"), ("payment_ref", "b")])
        too_many = g.get("/v1/charges", params=[("payment_ref", str(i)) for i in range(101)])
    assert one.status_code == two.status_code == 200 and one.json() == two.json()
    assert one.json()["status"] == "succeeded" and one.json()["id"].startswith("ch_")
    assert other.json()["id"] != one.json()["id"]
    assert mismatch.status_code == 400
    assert declined.status_code == 402
    assert declined.json() == {"error": {"type": "card_error", "code": "card_declined"}}
    assert [c["id"] for c in listed.json()["data"]] == [one.json()["id"], other.json()["id"]]
    assert too_many.status_code == 400
    assert pay.gateway_charges_per_payment() == {"pay_ref_a": 2}


def test_create_charges_once_per_key(payments_sandbox):
    pay = payments_sandbox
    k = key()
    r = pay.create("cus_new", 1234, k)
    assert r.status_code == 201
    pid = r.json()["payment"]["id"]
    assert r.json()["payment"]["status"] == "succeeded" and pid.startswith("pay_")
    assert len(pid) == 30
    again = pay.create("cus_new", 1234, k)
    assert again.content == r.content and again.headers["Idempotent-Replayed"] == "true"
    assert pay.create("cus_new", 999, k).status_code == 422
    declined = pay.create("cus_decline_x", 100, key())
    assert declined.status_code == 402
    assert pay.stream_ids() == pay.failed_view() == [declined.json()["payment"]["id"]]
    assert pay.gateway_charges_per_payment([pid]) == {pid: 1}


def test_create_with_an_unknown_outcome_is_queued_and_resumed_by_the_same_key(payments_sandbox):
    pay = payments_sandbox
    pay.set_gateway("charge_then_5xx")
    k = key()
    r = pay.create("cus_u", 700, k)
    assert r.status_code == 502 and r.json() == UNKNOWN
    [pid] = pay.failed_view()
    assert pay.stream_ids() == [pid]
    assert pay.payment(pid)["status"] == "failed"
    pay.set_gateway("ok")
    done = pay.create("cus_u", 700, k)
    assert done.status_code == 201 and done.json()["payment"]["id"] == pid
    assert pay.gateway_charges_per_payment([pid]) == {pid: 1}
    assert pay.failed_view() == pay.stream_ids() == []


def test_auth_no_token_configured_is_403(make_payments_sandbox):
    pay = make_payments_sandbox(payments_token=None)
    with pay.api() as c:
        assert c.get("/api/payments").status_code == 403
        assert c.post("/api/payments/retry", json={"status": "failed"}).status_code == 403


def test_auth_wrong_or_missing_token_is_401_and_never_echoed(payments_sandbox):
    pay = payments_sandbox
    [pid] = pay.seed(1)
    wrong = "wrong-" + uuid.uuid4().hex
    with httpx.Client(base_url=pay.url) as c:
        missing = c.get("/api/payments")
        bad = c.post(
            f"/api/payments/{pid}/retry",
            headers={"Authorization": f"Bearer {wrong}", "Idempotency-Key": "k"},
        )
    for r in (missing, bad):
        assert r.status_code == 401 and r.json() == {"detail": "bad payments token"}
        assert wrong not in r.text and pay.payments_token not in r.text
    assert pay.gateway_charges_per_payment([pid]) == {pid: 0}
    pay.retry(pid, key())
    log = "\n".join(pay.sandbox.log_lines())
    assert "status=401" in log
    assert wrong not in log and pay.payments_token not in log and pay.gateway_key not in log
    with httpx.Client(base_url=pay.gateway_url) as g:
        gw = g.get("/v1/charges", params={"payment_ref": pid}, headers={"Authorization": "x"})
    assert gw.status_code == 401


def test_listing_pages_by_id_and_reads_by_ids(payments_sandbox):
    pay = payments_sandbox
    ids = pay.seed(5)
    with pay.api() as c:
        first = c.get("/api/payments", params={"status": "failed", "limit": 2}).json()
        seen = [p["id"] for p in first["payments"]]
        after = first["next"]
        while after:
            page = c.get("/api/payments", params={"status": "failed", "limit": 2, "after": after})
            seen += [p["id"] for p in page.json()["payments"]]
            after = page.json()["next"]
        chosen = c.get("/api/payments", params={"ids": f"{ids[3]},{ids[1]},pay_nope"}).json()
        too_many = c.get("/api/payments", params={"ids": ",".join(["x"] * 501)})
        one = c.get(f"/api/payments/{ids[0]}").json()
        missing = c.get("/api/payments/pay_00000000000000000000000000")
    assert seen == sorted(ids) == ids
    assert [p["id"] for p in chosen["payments"]] == [ids[1], ids[3]] and chosen["next"] is None
    assert too_many.status_code == 400
    assert set(one) == {
        "id",
        "customer",
        "amount",
        "currency",
        "status",
        "attempts",
        "last_error",
        "failed_at",
        "updated_at",
        "charges",
    }
    assert one["status"] == "failed" and one["amount"] == 1999 and one["currency"] == "EUR"
    assert one["charges"] == [] and one["failed_at"].endswith("Z")
    assert missing.status_code == 404


def test_queue_stream_and_view_agree(payments_sandbox):
    pay = payments_sandbox
    ids = pay.seed(4)
    assert pay.stream_ids() == pay.failed_view() == ids
    pay.retry(ids[0], key())
    pay.set_gateway("fails")
    pay.retry(ids[1], key())  # still failed: stays queued, once
    assert pay.stream_ids() == pay.failed_view() == ids[1:]
    with psycopg.connect(pay.dsn) as conn:
        description = conn.execute("SELECT * FROM failed_transactions LIMIT 0").description
    assert description is not None
    cols = [d.name for d in description]
    assert cols == ["id", "customer", "amount", "currency", "attempts", "last_error", "failed_at"]


def test_metrics(payments_sandbox):
    pay = payments_sandbox
    ids = pay.seed(3)
    pay.retry(ids[0], key())
    pay.set_gateway("rate_limit")
    pay.retry(ids[1], key())
    pay.set_gateway("ok")
    pay.create("cus_decline_m", 10, key())
    with pay.sandbox.client() as c:
        text = c.get("/metrics").text
    assert metric(text, "akig_payment_attempts_total", kind="retry", result="succeeded") == 1
    assert metric(text, "akig_payment_attempts_total", kind="retry", result="rate_limited") == 1
    assert metric(text, "akig_payment_attempts_total", kind="charge", result="declined") == 1
    assert "akig_payment_attempts_total" in text and 'result="unknown"' in text
    assert metric(text, "akig_payments_failed") == 3
    assert metric(text, "akig_payments_failed_oldest_age_seconds") > 0
    pay.truncate()
    with pay.sandbox.client() as c:
        text = c.get("/metrics").text
    assert metric(text, "akig_payments_failed") == 0
    assert "akig_payments_failed_oldest_age_seconds 0.0" in text


def test_payment_requests_are_logged_and_counted_by_route_template(payments_sandbox):
    pay = payments_sandbox
    [pid] = pay.seed(1)
    pay.set_gateway("charge_then_5xx")
    assert pay.retry(pid, key()).status_code == 502
    with pay.sandbox.client() as c:
        text = c.get("/metrics").text
    route = "/api/payments/{payment_id}/retry"
    assert metric(text, "http_requests_total", route=route, status="502") == 1
    [line] = [ln for ln in pay.sandbox.log_lines() if f"path=/api/payments/{pid}/retry" in ln]
    assert f"route={route} status=502" in line and "level=error" in line
    assert 'error="gateway_outcome_unknown: gateway answered 500"' in line


def test_seed_and_truncate(payments_sandbox):
    pay = payments_sandbox
    ids = pay.seed(50, amount=250, currency="USD", declined_share=1.0)
    assert len(ids) == len(set(ids)) == 50
    row = pay.payment(ids[0])
    assert row["customer"].startswith("cus_decline") and row["amount"] == 250
    assert row["currency"] == "USD" and row["status"] == "failed"
    pay.seed(1)
    pay.retry(pay.failed_view()[-1], key())
    pay.truncate()
    assert pay.failed_view() == pay.stream_ids() == []
    assert pay.gateway_charges_per_payment() == {} == pay.backend_charges_per_payment()
    with pay.sandbox.client() as c:
        assert c.delete("/admin/payments").status_code == 401


def test_bulk_retry_retries_every_failed_payment_once(payments_sandbox):
    pay = payments_sandbox
    good = pay.seed(6)
    bad = pay.seed(2, declined_share=1.0)
    with pay.api() as c:
        counts = c.post("/api/payments/retry", json={"status": "failed"}).json()
        again = c.post("/api/payments/retry", json={"status": "failed"}).json()
        wrong = c.post("/api/payments/retry", json={"status": "succeeded"})
    assert counts == {"succeeded": 6, "declined": 2, "unknown": 0, "rate_limited": 0}
    assert again == {"succeeded": 0, "declined": 2, "unknown": 0, "rate_limited": 0}
    assert wrong.status_code == 422
    assert pay.gateway_charges_per_payment(good + bad) == {
        **dict.fromkeys(good, 1),
        **dict.fromkeys(bad, 0),
    }
    assert pay.failed_view() == pay.stream_ids() == sorted(bad)


def test_ensure_payments_schema_on_an_existing_database():
    name = f"rb_pay_schema_{os.getpid()}"
    drop_database(ADMIN_DSN, name)
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        dsn = database_dsn(ADMIN_DSN, name)
        ensure_payments_schema(dsn)
        ensure_payments_schema(dsn)  # idempotent
        with psycopg.connect(dsn) as conn:
            names = {
                r[0]
                for r in conn.execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
                )
            }
        assert names == {
            "payments",
            "payment_idempotency_keys",
            "charges",
            "gateway_charges",
            "failed_transactions",
        }
    finally:
        drop_database(ADMIN_DSN, name)


def test_gateway_runs_as_a_process(sandbox_db):
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "SANDBOX_DATABASE_DSN": sandbox_db,
        "SANDBOX_GATEWAY_KEY": "proc-key",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox.gateway", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/status", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert r.json()["status"] == "operational"
        denied = httpx.get(f"http://127.0.0.1:{port}/v1/charges?payment_ref=x")
        assert denied.status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=10)
