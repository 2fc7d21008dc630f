"""The real monitoring around a drill: postgres_exporter, Prometheus, Alertmanager (Debian's).

Prometheus scrapes every target and evaluates the rules every `interval_s` (1 s), loads the
shipped `deployments/prometheus/rules.yml` (with the drilled alerts' `for:` hold as the drill
says, printed) and sends to an Alertmanager whose one route has `group_wait: 0` and sends
firing and resolved notifications to the receiver with its bearer token.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from drills.procs import Proc, free_port, spawn, stop, wait_http

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deployments" / "prometheus" / "rules.yml"
PROMETHEUS = os.environ.get("RUNBOOKS_PROMETHEUS", "/usr/bin/prometheus")
ALERTMANAGER = os.environ.get("RUNBOOKS_ALERTMANAGER", "/usr/bin/prometheus-alertmanager")
PG_EXPORTER = os.environ.get("RUNBOOKS_PG_EXPORTER", "/usr/bin/prometheus-postgres-exporter")
BINARIES = (PROMETHEUS, ALERTMANAGER, PG_EXPORTER)


def missing_binaries() -> str | None:
    """Why the monitoring stack cannot run here, or None."""
    absent = [b for b in BINARIES if not os.access(b, os.X_OK)]
    if absent:
        return f"{', '.join(absent)} not installed (`make system-deps` installs them)"
    return None


def hold_key(rule: dict[str, Any]) -> str:
    """How `holds` names a rule: `Alert{severity=...}` (one rule of several), else `Alert`."""
    return f"{rule.get('alert')}{{severity={(rule.get('labels') or {}).get('severity')}}}"


UNITS_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def compressed_hold(alert: str, factor: int = 60, rules_text: str | None = None) -> str:
    """The shipped `for:` of `alert` divided by `factor` (whole seconds, at least 1 s)."""
    doc = yaml.safe_load(RULES.read_text() if rules_text is None else rules_text)
    shipped = next(
        (
            str(r.get("for", "0s"))
            for g in doc["groups"]
            for r in g["rules"]
            if r.get("alert") == alert
        ),
        "1m",  # the rule is not in this tree (yet): the other drills' 1 m
    )
    seconds = sum(int(n) * UNITS_S[unit] for n, unit in re.findall(r"(\d+)(ms|s|m|h|d|w)", shipped))
    return f"{max(1, round(seconds / factor))}s"


def drill_rules(out: Path, holds: dict[str, str]) -> Path:
    """The shipped rules with `for:` of the named alerts replaced; nothing else changed.

    A hold is keyed by the alert name (every rule of it), or by `Alert{severity=warning}`
    when one alert name has several rules (`CertificateExpiringInDays`).
    """
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            for key in (hold_key(rule), rule.get("alert")):
                if key in holds:
                    rule["for"] = holds[key]
                    break
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


@dataclass
class Monitoring:
    """Handles on the running Prometheus and Alertmanager."""

    prometheus_url: str
    alertmanager_url: str
    exporter_target: str
    interval_s: float

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        r = httpx.get(f"{self.prometheus_url}/api/v1/query", params={"query": expr}, timeout=5)
        r.raise_for_status()
        return list(r.json()["data"]["result"])

    def prometheus_alerts(self, name: str) -> list[dict[str, Any]]:
        """Prometheus's pending and firing alerts called `name`."""
        r = httpx.get(f"{self.prometheus_url}/api/v1/alerts", timeout=5)
        r.raise_for_status()
        return [a for a in r.json()["data"]["alerts"] if a["labels"].get("alertname") == name]

    def alertmanager_alerts(self, name: str) -> list[dict[str, Any]]:
        """Alertmanager's active alerts called `name` (with their fingerprints)."""
        r = httpx.get(
            f"{self.alertmanager_url}/api/v2/alerts",
            params={"filter": f'alertname="{name}"'},
            timeout=5,
        )
        r.raise_for_status()
        return list(r.json())


def _prometheus_config(
    workdir: Path, rules: Path, targets: list[str], am: str, every: str, more: list[dict[str, Any]]
) -> Path:
    config = {
        "global": {"scrape_interval": every, "evaluation_interval": every, "scrape_timeout": every},
        "rule_files": [str(rules)],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [am]}]}]},
        "scrape_configs": [
            {"job_name": "postgres", "static_configs": [{"targets": targets}]},
            *more,
        ],
    }
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _alertmanager_config(workdir: Path, webhook_url: str, token: str, every: str) -> Path:
    config = {
        "route": {
            "receiver": "runbooks",
            "group_by": ["..."],
            "group_wait": "0s",
            "group_interval": every,
            "repeat_interval": "1h",
        },
        "receivers": [
            {
                "name": "runbooks",
                "webhook_configs": [
                    {
                        "url": webhook_url,
                        "send_resolved": True,
                        "http_config": {"authorization": {"type": "Bearer", "credentials": token}},
                    }
                ],
            }
        ],
    }
    path = workdir / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config))
    os.chmod(path, 0o600)  # it holds the receiver's token
    return path


@contextlib.contextmanager
def running_monitoring(
    workdir: Path,
    *,
    pg_dsn: str,
    rules: Path,
    webhook_url: str,
    token: str,
    exporter_port: int,
    interval_s: float = 1.0,
    timeout_s: float = 60.0,
    scrape: list[dict[str, Any]] | None = None,
    prometheus_port: int = 0,
) -> Iterator[Monitoring]:
    """Start exporter, Alertmanager and Prometheus; wait until the exporter is scraped.

    `scrape`: more scrape jobs (the drills' own exporters, e.g. the blackbox prober).
    `prometheus_port`: Prometheus's port when chosen beforehand (the stack's runbooks query it).
    """
    every = f"{interval_s:g}s"
    workdir.mkdir(parents=True, exist_ok=True)
    procs: list[Proc] = []
    try:
        exp_port, am_port = exporter_port, free_port()
        prom_port = prometheus_port or free_port()
        exporter = spawn(
            "postgres_exporter",
            [PG_EXPORTER, f"--web.listen-address=127.0.0.1:{exp_port}", "--log.level=warn"],
            workdir / "postgres_exporter.log",
            env={**os.environ, "DATA_SOURCE_NAME": f"{pg_dsn}?sslmode=disable"},
        )
        procs.append(exporter)
        am_dir = workdir / "alertmanager"
        am_dir.mkdir()
        am = spawn(
            "alertmanager",
            [
                ALERTMANAGER,
                f"--config.file={_alertmanager_config(am_dir, webhook_url, token, every)}",
                f"--storage.path={am_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address=",
                "--log.level=warn",
            ],
            am_dir / "alertmanager.log",
        )
        procs.append(am)
        target = f"127.0.0.1:{exp_port}"
        prom_dir = workdir / "prometheus"
        prom_dir.mkdir()
        config = _prometheus_config(
            prom_dir, rules, [target], f"127.0.0.1:{am_port}", every, scrape or []
        )
        prom = spawn(
            "prometheus",
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={prom_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            prom_dir / "prometheus.log",
        )
        procs.append(prom)
        mon = Monitoring(
            f"http://127.0.0.1:{prom_port}", f"http://127.0.0.1:{am_port}", target, interval_s
        )
        wait_http(am, f"{mon.alertmanager_url}/-/ready", timeout_s)
        wait_http(prom, f"{mon.prometheus_url}/-/ready", timeout_s)
        # Ready = the exporter's database metrics are in (pg_up alone comes before them).
        wait_http(
            prom,
            f"{mon.prometheus_url}/api/v1/query?query=pg_settings_max_connections",
            timeout_s,
            lambda r: bool(r.json()["data"]["result"]),
        )
        yield mon
    finally:
        for proc in reversed(procs):
            stop(proc, timeout_s=10)
