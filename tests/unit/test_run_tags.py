"""Run tags: the text every builder writes, and what the parser reads back from it."""

from __future__ import annotations

from uuid import UUID

from hypothesis import given
from hypothesis import strategies as st

from tasks.run_history import incident_keys
from tasks.run_tags import (
    ALERT_SOURCE,
    alert_tag,
    alert_tags,
    covered_by_tag,
    incident_tag,
    is_alert_identity,
    parse_run_tags,
    runbook_tag,
    source_tag,
)

RUN = UUID("12345678-1234-5678-1234-567812345678")


def test_the_builders_write_the_tags_prefect_filters_on() -> None:
    assert ALERT_SOURCE == "source:alert"
    assert source_tag("schedule") == "source:schedule"
    assert runbook_tag("db-pool-exhausted") == "runbook:db-pool-exhausted"
    assert alert_tag("abc123") == "alert:abc123"
    assert alert_tags("abc123", "DbPool  Exhausted\n") == [
        "alert:abc123",
        "alertname:DbPool Exhausted",
    ]
    assert alert_tags("f", "x" * 150)[1] == "alertname:" + "x" * 100
    assert covered_by_tag(RUN) == f"covered-by:{RUN}"
    assert covered_by_tag(str(RUN)) == f"covered-by:{RUN}"
    assert incident_tag(alert_tag("abc123")) == "incident:alert:abc123"


def test_the_parser_reads_each_kind_and_ignores_the_rest() -> None:
    tags = parse_run_tags(
        [
            "source:alert",
            "runbook:db-pool-exhausted",
            "alert:abc123",
            "alertname:DbPoolExhausted",
            f"covered-by:{RUN}",
            "incident:alert:def456",
            "auto",
            "INC-42",
        ]
    )
    assert tags.from_alert
    assert tags.sources == ("alert",)
    assert tags.runbooks == ("db-pool-exhausted",)
    assert (tags.alert, tags.alertname) == ("abc123", "DbPoolExhausted")
    assert tags.covered_by == (str(RUN),)
    assert tags.incidents == ("alert:def456",)
    assert tags.incident_keys() == {"alert:abc123", "alert:def456"}


def test_no_tags_and_tags_of_another_source() -> None:
    empty = parse_run_tags(None)
    assert not empty.from_alert and empty.alert is None and empty.alertname is None
    assert incident_keys(None) == set()
    ui = parse_run_tags(["source:ui", "incident:tag:INC-42", "alertname:"])
    assert not ui.from_alert and ui.alert is None and ui.alertname == ""
    # Only `incident:alert:<fp>` names an alert incident.
    assert ui.incident_keys() == set()


def test_alert_identity_is_the_alert_and_its_name_only() -> None:
    assert is_alert_identity("alert:abc") and is_alert_identity("alertname:X")
    assert not is_alert_identity("source:alert") and not is_alert_identity("incident:alert:a")


@given(
    fingerprint=st.text(alphabet="0123456789abcdef", min_size=1, max_size=16),
    alertname=st.text(max_size=120),
    runbook=st.from_regex(r"[a-z][a-z0-9-]{0,30}", fullmatch=True),
)
def test_built_tags_parse_back(fingerprint: str, alertname: str, runbook: str) -> None:
    tags = parse_run_tags([ALERT_SOURCE, runbook_tag(runbook), *alert_tags(fingerprint, alertname)])
    assert tags.from_alert
    assert tags.runbooks == (runbook,)
    assert tags.alert == fingerprint
    assert tags.alertname == " ".join(alertname.split())[:100]
    assert tags.incident_keys() == {alert_tag(fingerprint)}
