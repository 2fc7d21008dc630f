"""`kube_configured`: an optional Kubernetes step is skipped only when no source exists."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_kubernetes_is_configured_by_any_source(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tasks.clients import kube_configured

    for name in ("RUNBOOKS_K8S_KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBECONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".kube").mkdir()  # a cache directory alone is not a configuration
    assert kube_configured() is False
    (tmp_path / ".kube" / "config").write_text("{}")
    assert kube_configured() is True
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    assert kube_configured() is False
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert kube_configured() is True
