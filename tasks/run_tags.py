"""Run tags: how a run says where it came from and what it belongs to; built and read here.

Tags are Prefect's filters, so their text is an interface: the receiver writes them, runs
add their own, and post-incident records, retention and the CLI find runs by them.

- `source:<how>`: `alert`, `schedule`, `ui`, `local` (flows.common.run_source);
- `runbook:<name>`: the runbook the run is;
- `alert:<fingerprint>`, `alertname:<name>`: the alert that started it (also the incident
  key `alert:<fingerprint>`);
- `covered-by:<run id>`: an alert coalesced in a storm, handled by that run;
- `incident:<key>`: a run about an incident (a post-incident record, an escalation).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from uuid import UUID

SOURCE = "source:"
RUNBOOK = "runbook:"
ALERT = "alert:"
ALERTNAME = "alertname:"
COVERED_BY = "covered-by:"
INCIDENT = "incident:"


def tag_value(value: str) -> str:
    """A label value in a tag: one line, bounded (tags are filters, not text to render)."""
    return " ".join(value.split())[:100]


def source_tag(source: str) -> str:
    """`source:<how>`."""
    return f"{SOURCE}{source}"


#: The tag of every run the receiver starts for an alert.
ALERT_SOURCE = source_tag("alert")


def runbook_tag(name: str) -> str:
    """`runbook:<name>`."""
    return f"{RUNBOOK}{name}"


def alert_tag(fingerprint: str) -> str:
    """`alert:<fingerprint>`: the alert's tag, and the incident key of its runs."""
    return f"{ALERT}{fingerprint}"


def alert_tags(fingerprint: str, alertname: str) -> list[str]:
    """`alert:<fingerprint>` and `alertname:<name>` (the name made one bounded line)."""
    return [alert_tag(fingerprint), f"{ALERTNAME}{tag_value(alertname)}"]


def covered_by_tag(run_id: str | UUID) -> str:
    """`covered-by:<run id>`: the tag of an alert's run that another run covers."""
    return f"{COVERED_BY}{run_id}"


def incident_tag(key: str) -> str:
    """`incident:<key>`."""
    return f"{INCIDENT}{key}"


def is_alert_identity(tag: str) -> bool:
    """An `alert:` or `alertname:` tag: what a run started for an alert passes on."""
    return tag.startswith((ALERT, ALERTNAME))


@dataclass(frozen=True)
class RunTags:
    """The values of a run's tags, each kind in the order the tags came."""

    sources: tuple[str, ...] = ()
    runbooks: tuple[str, ...] = ()
    alerts: tuple[str, ...] = ()
    alertnames: tuple[str, ...] = ()
    covered_by: tuple[str, ...] = ()
    incidents: tuple[str, ...] = ()

    @property
    def from_alert(self) -> bool:
        """Started by the receiver for an alert (`source:alert`)."""
        return "alert" in self.sources

    @property
    def alert(self) -> str | None:
        """The alert's fingerprint (the last `alert:` tag), or None."""
        return self.alerts[-1] if self.alerts else None

    @property
    def alertname(self) -> str | None:
        """The alert's name (the last `alertname:` tag), or None."""
        return self.alertnames[-1] if self.alertnames else None

    def incident_keys(self) -> set[str]:
        """The incident keys (`alert:<fp>`) the run belongs to: its own alert's, and the
        one an `incident:alert:<fp>` tag names."""
        keys = {alert_tag(fp) for fp in self.alerts}
        keys |= {k for k in self.incidents if k.startswith(ALERT)}
        return keys


_KINDS = (
    ("sources", SOURCE),
    ("runbooks", RUNBOOK),
    ("alerts", ALERT),
    ("alertnames", ALERTNAME),
    ("covered_by", COVERED_BY),
    ("incidents", INCIDENT),
)


def parse_run_tags(tags: Iterable[str] | None) -> RunTags:
    """Every known tag's value, by kind; other tags (`auto`, `plan-only`, ...) are ignored."""
    found: dict[str, list[str]] = {kind: [] for kind, _ in _KINDS}
    for tag in tags or ():
        for kind, prefix in _KINDS:
            if tag.startswith(prefix):
                found[kind].append(tag.removeprefix(prefix))
                break
    return RunTags(**{kind: tuple(values) for kind, values in found.items()})
