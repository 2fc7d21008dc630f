"""The typed escalation config: the seed's table, name checks, the committed example."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks.contacts import EscalationConfig, EscalationSettings, Severity, load_config
from tasks.errors import PermanentError

EXAMPLE = Path(__file__).resolve().parents[2] / "deployments" / "escalation.example.yaml"


def test_defaults_follow_the_seed_table() -> None:
    config = EscalationConfig()
    deadlines = {s: config.severities[s].deadline_s for s in Severity}
    assert deadlines == {
        Severity.CRITICAL: 900,
        Severity.HIGH: 3600,
        Severity.MEDIUM: 14_400,
        Severity.LOW: 86_400,
    }
    assert config.first_level(Severity.CRITICAL, "database") == ["on-call", "leadership", "db-team"]
    assert config.first_level(Severity.HIGH, "nobody-owns-this") == ["team-lead", "incidents"]
    assert config.severities[Severity.CRITICAL].ack_required
    assert not config.severities[Severity.HIGH].ack_required


def test_the_committed_example_is_the_defaults() -> None:
    assert load_config(EscalationSettings(config_file=EXAMPLE)) == EscalationConfig()


def test_an_undefined_contact_is_refused() -> None:
    with pytest.raises(ValidationError, match="not defined"):
        EscalationConfig(topics={"database": "dba-oncall"})


def test_a_bad_block_ref_is_refused() -> None:
    with pytest.raises(ValidationError, match="block ref"):
        EscalationConfig.model_validate(
            {"contacts": {"x": {"channels": ["https://hooks.slack.com/services/T/B/X"]}}}
        )


def test_deadline_overrides_and_unreadable_files(tmp_path: Path) -> None:
    config = load_config(EscalationSettings(deadlines_s={Severity.CRITICAL: 5}))
    assert config.severities[Severity.CRITICAL].deadline_s == 5
    with pytest.raises(PermanentError, match="cannot read"):
        load_config(EscalationSettings(config_file=tmp_path / "missing.yaml"))
