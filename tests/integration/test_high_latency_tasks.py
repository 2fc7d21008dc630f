"""The two small read tasks the high-latency runbook added: TCP connect times, pod metrics."""

from __future__ import annotations

import socket

import pytest

from sandbox.server import free_port
from tasks.errors import PermanentError
from tasks.kubernetes.metrics import cpu_cores, memory_bytes, pod_metrics
from tasks.network import connect_time, tcp_connect_times
from tests.fixtures.kube import KubeCluster


def test_connect_times_to_a_listener_and_a_closed_port() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        closed = free_port()
        got = {
            t.name: t
            for t in tcp_connect_times.fn(
                {"up": ("127.0.0.1", port), "down": ("127.0.0.1", closed)}, attempts=3
            )
        }
    assert got["up"].failures == 0 and got["up"].median_ms is not None
    assert got["down"].failures == 3 and got["down"].median_ms is None
    assert got["down"].error == "ConnectionRefusedError"


def test_connect_time_refuses_bad_input() -> None:
    with pytest.raises(PermanentError):
        connect_time("x", "127.0.0.1", 0, 1, 1.0)
    with pytest.raises(PermanentError):
        connect_time("x", "127.0.0.1", 80, 0, 1.0)


def test_quantities() -> None:
    assert cpu_cores("250m") == pytest.approx(0.25)
    assert cpu_cores("12345678n") == pytest.approx(0.012345678)
    assert cpu_cores("2") == 2.0
    assert memory_bytes("128Mi") == 128 * 2**20
    assert memory_bytes("1G") == 10**9
    with pytest.raises(ValueError, match="not a CPU quantity"):
        cpu_cores("lots")


def test_pod_metrics_not_available_without_metrics_server(
    kube_cluster: KubeCluster, kube_namespace: str
) -> None:
    # Our control plane has no metrics-server: the API group is absent, which is a result.
    out = pod_metrics.fn(settings=kube_cluster.settings(kube_namespace))
    assert out.available is False
    assert "metrics.k8s.io not served" in out.detail
    assert out.pods == []
