"""One place builds Kubernetes clients: `tasks.clients.kube_api_client`.

tasks/kubernetes, tasks/tls and tasks/acme all talk to the API server; a second builder would
bring back urllib3's own retries under the task retries, or another kubeconfig order. The
check reads the source (an AST walk), so a new module cannot slip past it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILDER = "tasks/clients.py"
#: Calls that load a kubeconfig or build a configured client.
LOADERS = {"load_kube_config", "load_incluster_config", "new_client_from_config", "Configuration"}
SOURCES = sorted(
    str(p.relative_to(REPO))
    for d in ("tasks", "flows", "deployments")
    for p in (REPO / d).rglob("*.py")
)


def _builds_a_client(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
        # A bare `ApiClient()` (no configuration) only serializes models: it never connects.
        if name in LOADERS or (name == "ApiClient" and (node.args or node.keywords)):
            found.append(f"line {node.lineno}: {name}")
    return found


def test_the_builder_is_what_the_scan_finds() -> None:
    assert _builds_a_client(ast.parse((REPO / BUILDER).read_text()))


@pytest.mark.parametrize("path", [s for s in SOURCES if s != BUILDER])
def test_no_other_module_builds_a_kubernetes_client(path: str) -> None:
    assert _builds_a_client(ast.parse((REPO / path).read_text())) == []
