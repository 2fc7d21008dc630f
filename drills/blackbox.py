"""Debian's blackbox_exporter for a drill: TLS probes of loopback endpoints for Prometheus.

One module, `tls_connect` (TCP + TLS handshake, the chain verified against the drill's CA),
which reports `probe_ssl_earliest_cert_expiry` as the shipped `CertificateExpiringInDays`
rules read it. Prometheus scrapes it the usual way (`/probe?target=...`, the target as the
`instance` label).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from drills.procs import free_port, spawn, stop, wait_http

BLACKBOX = os.environ.get("RUNBOOKS_BLACKBOX_EXPORTER", "/usr/bin/prometheus-blackbox-exporter")
MODULE = "tls_connect"


def scrape_config(job: str, exporter: str, targets: list[str]) -> dict[str, Any]:
    """A Prometheus scrape job probing `targets` through the exporter at `exporter`."""
    return {
        "job_name": job,
        "metrics_path": "/probe",
        "params": {"module": [MODULE]},
        "static_configs": [{"targets": targets}],
        "relabel_configs": [
            {"source_labels": ["__address__"], "target_label": "__param_target"},
            {"source_labels": ["__param_target"], "target_label": "instance"},
            {"target_label": "__address__", "replacement": exporter},
        ],
    }


@contextlib.contextmanager
def running_blackbox(workdir: Path, ca_file: Path, timeout_s: float = 30.0) -> Iterator[str]:
    """Start the exporter on a free port; its `host:port`. Stopped on the way out."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "blackbox.yml"
    module = {
        "prober": "tcp",
        "timeout": "2s",
        "tcp": {"tls": True, "tls_config": {"ca_file": str(ca_file)}},
    }
    config.write_text(yaml.safe_dump({"modules": {MODULE: module}}))
    address = f"127.0.0.1:{free_port()}"
    proc = spawn(
        "blackbox_exporter",
        [
            BLACKBOX,
            f"--config.file={config}",
            f"--web.listen-address={address}",
            "--log.level=warn",
        ],
        workdir / "blackbox_exporter.log",
    )
    try:
        wait_http(proc, f"http://{address}/-/healthy", timeout_s)
        yield address
    finally:
        stop(proc, timeout_s=10)
