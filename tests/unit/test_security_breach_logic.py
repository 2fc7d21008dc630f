"""security-breach's parts that need no system: parameter validation, the checklist text,
the assessment rows, the WAF instruction, the approver rules."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from flows.common import md_escape
from flows.security.assessment import (
    Assessment,
    drift_rows,
    exfiltration_rows,
    login_rows,
    secret_rows,
)
from flows.security.checklist import HUMAN_ITEMS, Checklist, HumanChecklist, waf_instruction
from flows.security.params import SPEC, SecurityBreachParams, valid_selector
from flows.spec import Verdict
from tasks.contacts import EscalationConfig
from tasks.security.assess import (
    ContainerImage,
    ExfiltrationAssessment,
    FieldWrite,
    ImageDrift,
    LoginAssessment,
    LoginBurst,
    NewSourceIP,
    SecretChange,
    SecretChanges,
    SharedAccount,
    SignalFigures,
    UserVolume,
)
from tasks.settings import SecuritySettings

NOW = datetime(2026, 12, 7, 2, 0, tzinfo=UTC)
EARLIER = datetime(2026, 12, 7, 1, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "selector",
    [
        "app=akig",
        "app=akig,component=akig-backend",
        "app.kubernetes.io/name==akig, tier!=db",
        "tier in (api, web),!canary",
        "environment notin (prod)",
    ],
)
def test_label_selectors_that_parse(selector: str) -> None:
    assert valid_selector(selector) == selector.strip()


@pytest.mark.parametrize(
    "selector", ["", "   ", "app=(", "app=a b", "=x", "app in api", "app=x,,y=z", "a=" + "b" * 600]
)
def test_label_selectors_refused(selector: str) -> None:
    with pytest.raises(ValueError, match="selector"):
        valid_selector(selector)


def test_params_validate_names_and_default_to_a_dry_run() -> None:
    p = SecurityBreachParams(selector="app=akig", secrets=["db-creds", "api.keys"])
    assert p.dry_run and not p.auto_approve and p.isolate and not p.cordon
    assert p.notify_contacts == ["security-lead", "legal", "pr", "customer-support"]
    for bad in (["Bad_Name"], ["-x"], ["a" * 254], ["same", "same"]):
        with pytest.raises(ValidationError):
            SecurityBreachParams(selector="app=akig", secrets=bad)
    with pytest.raises(ValidationError):
        SecurityBreachParams(selector="app=akig", incident="Not An Id")
    with pytest.raises(ValidationError):
        SecurityBreachParams.model_validate({})  # the selector is required


def test_spec_and_approver_rules() -> None:
    assert (SPEC.name, SPEC.severity, SPEC.topic) == ("security-breach", "critical", "security")
    config = EscalationConfig()
    rotate = config.rule_for("security-breach", "rotate-secrets")
    assert rotate.min_approvers == 2 and not rotate.self_declared
    assert set(rotate.approvers) == {"security-team", "leadership"}
    for kind in ("isolate", "force-password-reset", "revoke-sessions"):
        rule = config.rule_for("security-breach", kind)
        assert rule.approvers == ["security-team", "on-call"] and not rule.self_declared
    for contact in ("security-lead", "legal", "pr", "customer-support"):
        assert contact in config.contacts


def test_checklist_rows_say_who_and_when() -> None:
    c = Checklist(incident="inc-1")
    c.add("1", "investigate", "done", "runbook", "12 file(s)")
    c.add("5a", "rotate secrets", "refused", "leadership", "refused | by an allowed approver")
    md = c.markdown()
    assert "| REFUSED |" in md and "leadership" in md and "inc-1" in c.summary()
    assert "\\|" in md  # a cell's pipe cannot break the table
    assert md.count("\n") == 3  # header, rule, two rows
    # A long plan does not cut off the approval's reason at the end of the detail.
    plan = "Plan: rotate " + "; ".join(f"secret-{i}" for i in range(40))
    c.add("5b", "force password reset", "done", "on-call", f"{plan} Approval: ok (why: phished)")
    assert md_escape("(why: phished)") in c.markdown()


def test_human_form_answers_in_order() -> None:
    form = HumanChecklist(by="Dana", root_cause=True, root_cause_note="phished token")
    answers = form.answers()
    assert [a[0] for a in answers] == list(HUMAN_ITEMS.values())
    assert (HUMAN_ITEMS["root_cause"], True, "phished token") in answers
    assert sum(done for _, done, _ in answers) == 1


def test_login_rows_flag_bursts_new_addresses_and_shared_accounts() -> None:
    found = LoginAssessment(
        status="ok",
        table="audit_logs",
        window_hours=24,
        logins=100,
        failed=40,
        bursts=[LoginBurst(by="ip", key="203.0.113.9", failed=30, first=NOW)],
        new_ips=[NewSourceIP(user="u7", ip="198.51.100.4", logins=2, first=NOW)],
        shared_accounts=[SharedAccount(user="u3", ips=9, logins=20)],
    )
    rows = login_rows(found, SecuritySettings())
    assert [r.verdict for r in rows] == [Verdict.FAIL] * 3
    assert "203.0.113.9" in rows[0].detail and "u7 from 198.51.100.4" in rows[1].detail
    assessment = Assessment(logins=found, rows=rows)
    assert assessment.flagged_addresses() == ["203.0.113.9", "198.51.100.4"]
    assert "203.0.113.9" in waf_instruction("prod", assessment.flagged_addresses())
    quiet = LoginAssessment(status="ok", table="audit_logs", window_hours=24, logins=3)
    assert [r.verdict for r in login_rows(quiet, SecuritySettings())] == [Verdict.PASS] * 3
    missing = LoginAssessment(
        status="unavailable", table="audit_logs", window_hours=24, detail="no such table"
    )
    (row,) = login_rows(missing, SecuritySettings())
    assert row.verdict == Verdict.UNAVAILABLE and "no such table" in row.detail


def test_drift_secret_and_exfiltration_rows() -> None:
    drift = ImageDrift(
        namespace="ns",
        selector="app=a",
        containers=[
            ContainerImage(
                pod="p1",
                container="app",
                deployment="a",
                expected_image="img:1",
                pod_image="img:1",
                running_image="img:2",
                image_id="sha256:x",
                drift=["running image differs"],
            )
        ],
    )
    (row,) = drift_rows(drift)
    assert row.verdict == Verdict.FAIL and "p1/app" in row.detail
    changes = SecretChanges(
        namespace="ns",
        hours=72,
        total=4,
        changed=[
            SecretChange(
                name="db-creds",
                created=NOW,
                last_changed=NOW,
                managers=[
                    FieldWrite(manager="helm", operation="Update", time=EARLIER),
                    FieldWrite(manager="kubectl-edit", operation="Update", time=NOW),
                ],
                ours=False,
            ),
            SecretChange(
                name="api-keys",
                created=EARLIER,
                last_changed=EARLIER,
                managers=[FieldWrite(manager="helm", operation="Update", time=EARLIER)],
                ours=False,
            ),
            SecretChange(
                name="db-creds-backup-x", created=NOW, last_changed=NOW, managers=[], ours=True
            ),
        ],
    )
    (row,) = secret_rows(changes)
    # Each Secret with its latest write and the field manager that made it.
    assert row.verdict == Verdict.FAIL
    assert "db-creds at 2026-12-07 02:00:00 by kubectl-edit;" in row.detail
    assert "api-keys at 2026-12-07 01:00:00 by helm" in row.detail
    assert "backup" not in row.detail
    assert row.observed == "2 of 4 (+1 ours)"
    (row,) = exfiltration_rows(ExfiltrationAssessment(status="not configured", factor=5))
    assert row.verdict == Verdict.NOT_CONFIGURED
    figures = ExfiltrationAssessment(
        status="ok",
        factor=5,
        signals=[
            SignalFigures(
                signal="egress bytes",
                query="q",
                users=[UserVolume(user="u1", current=600, baseline=100, ratio=6, flagged=True)],
            )
        ],
    )
    (row,) = exfiltration_rows(figures)
    assert row.verdict == Verdict.FAIL and "u1: 600 vs 100" in row.detail
