"""The typed escalation config: the on-call runbook's table, name checks, the committed example."""

from __future__ import annotations

import importlib
import uuid
from pathlib import Path

import pytest
from prefect.events.actions import RunDeployment
from pydantic import ValidationError

from deployments.automations import RUN_KEY, escalate_failed, escalate_paused
from deployments.catalog import RUNBOOKS
from tasks.contacts import EscalationConfig, EscalationSettings, Severity, highest, load_config
from tasks.errors import PermanentError

EXAMPLE = Path(__file__).resolve().parents[2] / "deployments" / "escalation.example.yaml"


def test_defaults_follow_the_oncall_runbook_table() -> None:
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


APPROVAL_MODELS = (
    "flows.cert_renew:CertRenewParams",
    "flows.cert_replace:CertReplaceParams",
    "flows.db_pool_exhausted:DbPoolParams",
    "flows.high_error_rate:HighErrorRateParams",
    "flows.high_latency:HighLatencyParams",
)


def _approval_timeout(ref: str) -> int:
    module, name = ref.split(":")
    field = getattr(importlib.import_module(module), name).model_fields["approval_timeout_s"]
    return int(field.default)


@pytest.mark.parametrize("model", APPROVAL_MODELS)
def test_approval_timeouts_and_reminders_do_not_collide_with_the_critical_deadline(
    model: str,
) -> None:
    config = EscalationConfig()
    critical = config.severities[Severity.CRITICAL].deadline_s
    timeout = _approval_timeout(model)
    assert timeout != critical
    approval = config.approval
    assert approval.repage_after_s != critical
    # Every reminder goes out, and its receiver has one more interval, before it expires.
    last_page = approval.repage_after_s * (1 + len(approval.next_levels))
    assert last_page + approval.repage_after_s <= timeout


def test_approval_reminders_page_the_on_call_chain_not_leadership() -> None:
    approval = EscalationConfig().approval
    assert (approval.notify, approval.next_levels) == (["on-call"], ["on-call-secondary"])
    assert load_config(EscalationSettings(approval_repage_s=7)).approval.repage_after_s == 7


def test_the_incident_severity_is_the_highest_raised() -> None:
    assert highest(Severity.HIGH, Severity.CRITICAL, Severity.LOW) == Severity.CRITICAL
    assert highest(Severity.MEDIUM, Severity.LOW) == Severity.MEDIUM


def test_every_automation_of_one_run_uses_the_run_id_as_the_incident_key() -> None:
    rb = next(r for r in RUNBOOKS if r.name == "db-pool-exhausted")
    deployment = uuid.uuid4()
    failed = escalate_failed(rb, deployment).actions[0]
    paused = escalate_paused(rb, deployment, 300)
    assert isinstance(failed, RunDeployment) and failed.parameters is not None
    (action,) = paused.actions
    assert isinstance(action, RunDeployment) and action.parameters is not None
    assert failed.parameters["params"]["incident_key"] == RUN_KEY
    assert action.parameters["params"]["incident_key"] == RUN_KEY
    assert action.parameters["params"]["reason"] == "approval"
    assert paused.trigger.within.total_seconds() == 300  # type: ignore[union-attr]
