"""The drills' rule holds: one rule of an alert name held by severity, the others as shipped."""

from __future__ import annotations

from pathlib import Path

import yaml

from drills.blackbox import scrape_config
from drills.cert import CertExpiring
from drills.monitoring import RULES, drill_rules, hold_key


def _fors(path: Path) -> dict[str, str]:
    doc = yaml.safe_load(path.read_text())
    return {hold_key(r): r.get("for", "0s") for g in doc["groups"] for r in g["rules"]}


def test_cert_drill_compresses_each_certificate_rule_60x_and_nothing_else(tmp_path: Path) -> None:
    shipped = _fors(RULES)
    drilled = _fors(drill_rules(tmp_path / "rules.yml", CertExpiring.holds))
    assert shipped["CertificateExpiringInDays{severity=warning}"] == "10m"
    assert drilled["CertificateExpiringInDays{severity=warning}"] == "10s"
    assert shipped["CertificateExpiringInDays{severity=critical}"] == "5m"
    assert drilled["CertificateExpiringInDays{severity=critical}"] == "5s"
    others = {k for k in shipped if not k.startswith("CertificateExpiringInDays")}
    assert others and all(drilled[k] == shipped[k] for k in others)


def test_a_hold_by_alert_name_holds_every_rule_of_it(tmp_path: Path) -> None:
    drilled = _fors(drill_rules(tmp_path / "rules.yml", {"CertificateExpiringInDays": "1s"}))
    assert {v for k, v in drilled.items() if k.startswith("CertificateExpiringInDays")} == {"1s"}


def test_blackbox_job_probes_the_target_and_labels_it_as_the_instance() -> None:
    job = scrape_config("blackbox-tls", "127.0.0.1:9115", ["127.0.0.1:8443"])
    assert job["metrics_path"] == "/probe"
    relabel = job["relabel_configs"]
    assert {"source_labels": ["__param_target"], "target_label": "instance"} in relabel
    assert relabel[-1] == {"target_label": "__address__", "replacement": "127.0.0.1:9115"}
