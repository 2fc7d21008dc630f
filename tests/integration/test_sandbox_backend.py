"""The sandbox backend against the real PostgreSQL and a real (private) Redis."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import psycopg
import pytest
from pydantic import SecretStr

from sandbox.release import FixedRelease, PolledRelease, image_tag
from sandbox.server import free_port
from tests.fixtures.sandbox import ADMIN_TOKEN, REDIS_MAXMEMORY
from tests.integration.kube_helpers import wait_until

LOG_LINE = re.compile(
    r"^\S+Z level=(info|warn|error) method=GET path=(\S+) route=(\S+) status=(\d{3})"
    r" duration=\d+\.\dms release=(\S+) ip=\S+( error=\".*\")?$"
)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_health_checks_database_and_redis(sandbox_backend):
    with sandbox_backend.client() as c:
        r = c.get("/api/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["release"] == "v1"
    assert body["checks"]["database"]["ok"] and body["checks"]["redis"]["ok"]
    assert body["checks"]["database"]["ms"] >= 0


def test_health_is_503_when_redis_is_down(make_sandbox_backend):
    dead = make_sandbox_backend(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with dead.client() as c:
        r = c.get("/api/health")
        products = c.get("/api/products")
    assert r.status_code == 503
    assert r.json()["checks"]["redis"] == {
        "ok": False,
        "error": "ConnectionError",
        "ms": pytest.approx(r.json()["checks"]["redis"]["ms"]),
    }
    assert r.json()["checks"]["database"]["ok"] is True
    # A dead cache degrades reads to the database; it does not fail them.
    assert products.status_code == 200


def test_database_down_is_a_5xx_and_health_says_so(make_sandbox_backend, sandbox_db):
    dsn = sandbox_db.replace("127.0.0.1", "127.0.0.1").replace("5432", str(free_port()))
    down = make_sandbox_backend(database_dsn=dsn)
    with down.client() as c:
        health = c.get("/api/health")
        user = c.get("/api/users/1")
    assert health.status_code == 503 and health.json()["checks"]["database"]["ok"] is False
    assert user.status_code == 500
    assert any("status=500" in line and "OperationalError" in line for line in down.log_lines())


def test_endpoints_read_postgres_through_the_cache(sandbox_backend, sandbox_redis):
    r = sandbox_redis.client()
    hits0 = int(r.info("stats")["keyspace_hits"])
    with sandbox_backend.client() as c:
        first = c.get("/api/users/7").json()
        second = c.get("/api/users/7").json()
        orders = c.get("/api/orders", params={"user_id": 7}).json()
        products = c.get("/api/products", params={"limit": 5}).json()
        missing = c.get("/api/users/999999")
    assert first == second and first["id"] == 7 and first["email"] == "user7@example.test"
    assert int(r.info("stats")["keyspace_hits"]) > hits0
    assert r.exists(f"{sandbox_backend.settings.key_prefix}user:7")
    assert orders["orders"] and all(o["product"] for o in orders["orders"])
    assert [p["id"] for p in products["products"]] == [1, 2, 3, 4, 5]
    assert missing.status_code == 404


def test_metrics_use_route_templates_and_status(sandbox_backend):
    sandbox_backend.traffic(3, "/api/users/11")
    sandbox_backend.traffic(2, "/api/users/12")
    sandbox_backend.traffic(1, "/api/users/999999")
    with sandbox_backend.client() as c:
        text = c.get("/metrics").text
    assert metric(text, "http_requests_total", route="/api/users/{user_id}", status="200") == 5
    assert metric(text, "http_requests_total", route="/api/users/{user_id}", status="404") == 1
    assert "/api/users/11" not in text
    assert metric(text, "http_request_duration_seconds_count", route="/api/users/{user_id}") == 6
    assert 'http_request_duration_seconds_bucket{le="1.0",route="/api/users/{user_id}"}' in text
    assert metric(text, "akig_release_info", release="v1") == 1


def test_log_lines_in_the_runbook_shape_go_to_the_file_not_the_terminal(sandbox_backend, capfd):
    capfd.readouterr()
    sandbox_backend.traffic(1, "/api/users/3")
    sandbox_backend.faults(error_rate_pct=100)
    sandbox_backend.traffic(1, "/api/users/3")
    sandbox_backend.faults(error_rate_pct=0)
    sandbox_backend.traffic(50, "/api/products")
    lines = [line for line in sandbox_backend.log_lines() if "path=/api/users/3" in line]
    assert len(lines) == 2
    ok, failed = (LOG_LINE.match(line) for line in lines)
    assert ok and ok.group(3) == "/api/users/{user_id}" and ok.group(4) == "200"
    assert failed and failed.group(4) == "500" and failed.group(1) == "error"
    assert 'error="injected fault' in lines[1]
    assert all(re.search("duration.*ms", line) for line in lines)
    assert sum("path=/api/products" in line for line in sandbox_backend.log_lines()) == 50
    # The file (what the test kubelet serves as pod logs) has every line; the terminal of
    # the test run or `make demo` has none of them.
    captured = capfd.readouterr()
    assert "duration=" not in captured.out + captured.err
    assert "path=/api/" not in captured.out + captured.err


_DEMO_PLATFORM = """
import time
from tests.fixtures.platform import running_platform

with running_platform(kube=False) as platform:
    log = platform.settings.log_file
    assert log is not None
    with platform.traffic():
        deadline = time.monotonic() + 60
        while len(log.read_text().splitlines()) < 200 and time.monotonic() < deadline:
            time.sleep(0.1)
    print("LOGGED", len(log.read_text().splitlines()), flush=True)
"""


def test_the_demo_platform_keeps_its_access_lines_out_of_the_terminal():
    """`make demo`'s platform (`running_platform`) under traffic: the lines go to the
    backend's log file, the demo's terminal shows none of them."""
    done = subprocess.run(
        [sys.executable, "-c", _DEMO_PLATFORM],
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True,
        text=True,
        timeout=240,
    )
    terminal = done.stdout + done.stderr
    assert done.returncode == 0, terminal[-3000:]
    logged = re.search(r"LOGGED (\d+)", done.stdout)
    assert logged and int(logged.group(1)) >= 200
    assert "duration=" not in terminal and "path=/api/" not in terminal, terminal[-3000:]


def test_audit_logs_are_written(sandbox_backend, sandbox_db):
    marker_user = 42
    sandbox_backend.traffic(2, f"/api/users/{marker_user}")
    sandbox_backend.traffic(1, "/api/orders", user_id=marker_user)

    def rows() -> list[tuple[object, ...]]:
        with psycopg.connect(sandbox_db) as conn:
            return conn.execute(
                "SELECT action, status, ip::text, response_time FROM audit_logs"
                " WHERE user_id = %s AND created_at > now() - interval '1 minute' ORDER BY id",
                (marker_user,),
            ).fetchall()

    # The row is written after the response went out: wait for it, don't sleep.
    got = wait_until(lambda: (r := rows()) and len(r) >= 3 and r, timeout=10, what="audit rows")
    rows_ = got
    actions = [r[0] for r in rows_]
    assert actions.count("GET /api/users/{user_id}") >= 2
    assert "GET /api/orders" in actions
    assert all(r[1] == 200 and r[2].startswith("127.0.0.1") and r[3] > 0 for r in rows_)


def test_admin_needs_its_token(sandbox_backend, make_sandbox_backend):
    with sandbox_backend.client() as c:
        assert c.get("/admin/faults").status_code == 401
        assert c.get("/admin/faults", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.put("/admin/faults", json={"error_rate_pct": 100}).status_code == 401
        ok = c.get("/admin/faults", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert ok.status_code == 200 and ok.json()["error_rate_pct"] == 0
    assert sandbox_backend.traffic(5) == [200] * 5
    no_token = make_sandbox_backend(admin_token=None)
    with no_token.client() as c:
        r = c.get("/admin/faults", headers={"Authorization": "Bearer x"})
    assert r.status_code == 403
    empty = make_sandbox_backend(admin_token=SecretStr(""))
    with empty.client() as c:
        assert c.get("/admin/faults", headers={"Authorization": "Bearer"}).status_code == 403


def test_error_rate_fault_and_health_stays_honest(sandbox_backend):
    sandbox_backend.faults(error_rate_pct=30)
    codes = sandbox_backend.traffic(300)
    share = codes.count(500) / len(codes)
    assert 0.18 < share < 0.42, share
    assert set(codes) == {200, 500}
    assert sandbox_backend.traffic(20, "/api/health") == [200] * 20
    sandbox_backend.admin("POST", "/admin/reset")
    assert sandbox_backend.traffic(50) == [200] * 50


def test_faults_are_per_instance(make_sandbox_backend):
    a, b = make_sandbox_backend(), make_sandbox_backend()
    a.faults(error_rate_pct=100)
    assert set(a.traffic(10)) == {500}
    assert set(b.traffic(10)) == {200}


def test_latency_fault(sandbox_backend):
    sandbox_backend.faults(latency_ms=1200)
    with sandbox_backend.client() as c:
        r = c.get("/api/products")
        text = c.get("/metrics").text
    assert r.status_code == 200 and r.elapsed.total_seconds() >= 1.2
    # The slow request lands above the 1 s bucket, where the p95 alert looks.
    le1 = metric(text, "http_request_duration_seconds_bucket", le="1.0", route="/api/products")
    total = metric(text, "http_request_duration_seconds_count", route="/api/products")
    assert (total, le1) == (1, 0)


def test_n_plus_one_mode_multiplies_queries(sandbox_backend):
    pool = sandbox_backend.backend.pool
    sandbox_backend.faults(cache_miss=True)
    before = pool.queries
    with sandbox_backend.client() as c:
        normal = c.get("/api/orders", params={"user_id": 9}).json()["orders"]
        per_request_normal = pool.queries - before
        sandbox_backend.faults(n_plus_one=True)
        before = pool.queries
        slow = c.get("/api/orders", params={"user_id": 9}).json()["orders"]
        per_request_n1 = pool.queries - before
    assert normal == slow and len(normal) >= 2
    assert per_request_normal == 1
    assert per_request_n1 == 1 + len(normal)


def test_cache_miss_fault(sandbox_backend, sandbox_redis):
    r = sandbox_redis.client()
    sandbox_backend.traffic(1, "/api/users/5")
    sandbox_backend.faults(cache_miss=True)
    hits0 = int(r.info("stats")["keyspace_hits"])
    misses0 = int(r.info("stats")["keyspace_misses"])
    sandbox_backend.traffic(10, "/api/users/5")
    assert int(r.info("stats")["keyspace_hits"]) == hits0
    assert int(r.info("stats")["keyspace_misses"]) >= misses0 + 10
    with sandbox_backend.client() as c:
        text = c.get("/metrics").text
    assert metric(text, "akig_cache_requests_total", result="miss") >= 11


def test_redis_fill_towards_maxmemory_and_cleanup(sandbox_backend, sandbox_redis):
    r = sandbox_redis.client()
    filled = sandbox_backend.admin("POST", "/admin/redis-fill", json={"fraction": 0.85}).json()
    assert filled["maxmemory"] == REDIS_MAXMEMORY
    used = int(r.info("memory")["used_memory"])
    assert used >= 0.85 * REDIS_MAXMEMORY and filled["written"] > 0
    removed = sandbox_backend.admin("DELETE", "/admin/redis-fill").json()["removed"]
    assert removed == filled["written"]
    assert int(r.info("memory")["used_memory"]) < 0.5 * REDIS_MAXMEMORY


def test_redis_fill_refuses_without_maxmemory(make_sandbox_backend):
    # The shared Redis has no maxmemory: filling it would be unbounded, so the backend refuses.
    shared = make_sandbox_backend(redis_url="redis://127.0.0.1:6379/14")
    with shared.client() as c:
        r = c.post(
            "/admin/redis-fill",
            json={"fraction": 0.5},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
    assert r.status_code == 409


def test_gzip_switch(sandbox_backend):
    with sandbox_backend.client(headers={"Accept-Encoding": "gzip"}) as c:
        on = c.get("/api/products", params={"limit": 100})
        sandbox_backend.faults(gzip=False)
        off = c.get("/api/products", params={"limit": 100})
    assert on.headers.get("content-encoding") == "gzip"
    assert "content-encoding" not in off.headers
    assert on.json() == off.json()


def test_buggy_release_v2_fails_30_percent(make_sandbox_backend):
    buggy = make_sandbox_backend(release=FixedRelease("v2"))
    codes = buggy.traffic(300)
    assert 0.18 < codes.count(500) / 300 < 0.42
    assert any('error="release v2 bug' in line for line in buggy.log_lines())


def test_release_change_ends_the_errors(make_sandbox_backend):
    current = {"tag": "v2"}
    source = PolledRelease(lambda: current["tag"], poll_s=0.05)
    sb = make_sandbox_backend(release=source)
    assert 500 in sb.traffic(60)
    current["tag"] = "v1"
    wait_until(lambda: source.current() == "v1", timeout=5, what="release v1")
    assert sb.traffic(100) == [200] * 100


def test_polled_release_keeps_last_value_on_error():
    calls = {"n": 0}

    def fetch() -> str:
        calls["n"] += 1
        if calls["n"] > 1:
            raise ConnectionError("api down")
        return "v3"

    source = PolledRelease(fetch, poll_s=0.02)
    try:
        wait_until(lambda: calls["n"] >= 3, timeout=5, what="polls")
        assert source.current() == "v3" and "api down" in (source.last_error or "")
    finally:
        source.close()


@pytest.mark.parametrize(
    ("image", "tag"),
    [
        ("registry.local/akig-backend:v2", "v2"),
        ("localhost:5000/akig-backend:v1", "v1"),
        ("localhost:5000/akig-backend", "latest"),
        ("akig-backend:v2@sha256:abc", "v2"),
    ],
)
def test_image_tag(image, tag):
    assert image_tag(image) == tag


def test_runs_as_a_module(sandbox_db, sandbox_redis, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "SANDBOX_DATABASE_DSN": sandbox_db,
        "SANDBOX_REDIS_URL": sandbox_redis.url(1),
        "SANDBOX_ADMIN_TOKEN": "module-token",
        "SANDBOX_LOG_FILE": str(tmp_path / "module.log"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox.backend", "--port", str(port)],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout or []), daemon=True)
    reader.start()
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/api/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout=30, what="module backend")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        reader.join(timeout=5)
    assert any("path=/api/health" in line and "status=200" in line for line in out)
    assert "path=/api/health" in (tmp_path / "module.log").read_text()
    assert "module-token" not in "".join(out)
    sandbox_redis.client(1).flushdb()  # our private server's db 1, never the shared Redis


def test_admin_token_is_a_secret():
    from sandbox.settings import SandboxSettings

    s = SandboxSettings(admin_token=SecretStr("hunter2"), kube_token=SecretStr("k"))
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())


def test_poisoned_cache_fails_reads_until_cleared(sandbox_backend, sandbox_redis):
    poisoned = sandbox_backend.admin("POST", "/admin/cache-poison", params={"users": 10}).json()
    assert poisoned["poisoned"] == 15
    assert sandbox_backend.traffic(3, "/api/users/4") == [500] * 3
    assert sandbox_backend.traffic(1, "/api/users/11") == [200]  # not poisoned
    line = next(x for x in sandbox_backend.log_lines() if "path=/api/users/4" in x)
    assert "status=500" in line and 'error="JSONDecodeError' in line
    # What a cache clear does (SCAN + UNLINK of the cache keys) ends the errors.
    client = sandbox_redis.client()
    client.unlink(*client.scan_iter(match=f"{sandbox_backend.settings.key_prefix}user:*"))
    assert sandbox_backend.traffic(3, "/api/users/4") == [200] * 3
