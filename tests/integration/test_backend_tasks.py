"""tasks/backend.py against the real sandbox backend."""

from __future__ import annotations

import pytest

from sandbox.server import free_port
from tasks.backend import backend_health, compression_check, latency_sample, percentile
from tasks.errors import PermanentError, TransientError
from tasks.settings import BackendSettings


def settings_for(sandbox, **kw):
    return sandbox.backend_settings(**kw)


def test_health_ok_with_summary_and_timings(sandbox_backend):
    h = backend_health.fn(settings=settings_for(sandbox_backend))
    assert h.ok and h.status_code == 200 and h.status == "ok"
    assert h.failing_checks == []
    assert h.summary == "status=ok database=ok redis=ok release=v1"
    assert h.timings.total_ms > 0
    assert h.timings.connect_ms is not None and h.timings.connect_ms <= h.timings.total_ms
    assert h.timings.first_byte_ms is not None
    assert h.url == sandbox_backend.url + "/api/health"


def test_health_503_names_the_failing_dependency(make_sandbox_backend):
    sb = make_sandbox_backend(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    h = backend_health.fn(settings=settings_for(sb))
    assert not h.ok and h.status_code == 503 and h.status == "degraded"
    assert h.failing_checks == ["redis"]
    assert "redis=FAIL" in h.summary and "database=ok" in h.summary


def test_health_of_a_down_backend_is_transient():
    with pytest.raises(TransientError, match="unreachable"):
        backend_health.fn(settings=BackendSettings(url=f"http://127.0.0.1:{free_port()}"))


def test_health_timeout_is_transient(silent_port):
    s = BackendSettings(url=f"http://127.0.0.1:{silent_port.port}", timeout_s=0.3)
    with pytest.raises(TransientError, match="timed out"):
        backend_health.fn(settings=s)


def test_latency_sample_sees_the_latency_fault(sandbox_backend):
    s = settings_for(sandbox_backend)
    sandbox_backend.faults(latency_ms=300)
    sample = latency_sample.fn("/api/products", count=5, settings=s)
    assert sample.count == 5 and sample.errors == 0 and sample.status_counts == {"200": 5}
    assert sample.p50_ms is not None and sample.p50_ms >= 300
    figures = [sample.min_ms, sample.p50_ms, sample.p95_ms, sample.p99_ms, sample.max_ms]
    assert None not in figures and figures == sorted(figures)  # type: ignore[type-var]


def test_latency_sample_counts_statuses(sandbox_backend):
    sandbox_backend.faults(error_rate_pct=100)
    sample = latency_sample.fn("/api/products", count=4, settings=settings_for(sandbox_backend))
    assert sample.status_counts == {"500": 4}


def test_latency_sample_refuses_bad_input(sandbox_backend):
    s = settings_for(sandbox_backend)
    with pytest.raises(PermanentError):
        latency_sample.fn("/api/health", count=0, settings=s)
    with pytest.raises(PermanentError):
        latency_sample.fn("http://elsewhere/", count=1, settings=s)


def test_percentile_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 99)) == (
        50.0,
        95.0,
        99.0,
    )
    assert percentile([], 50) is None and percentile([7.0], 99) == 7.0


def test_compression_check_follows_the_switch(sandbox_backend):
    s = settings_for(sandbox_backend)
    on = compression_check.fn("/api/products?limit=100", settings=s)
    assert on.compressed and on.content_encoding == "gzip"
    assert on.wire_bytes < on.body_bytes
    sandbox_backend.faults(gzip=False)
    off = compression_check.fn("/api/products?limit=100", settings=s)
    assert not off.compressed and off.content_encoding is None
    assert off.wire_bytes == off.body_bytes
