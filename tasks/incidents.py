"""One incident, one chain of pages: its severity, its ack waiter and its acknowledgement.

An incident is its key (a runbook run's id, an alert fingerprint). Every `escalate` run for
that key, whoever started it (the runbook itself, the failure automation, the approval-wait
automation, a human), reads and writes the same few Prefect Variables, named after the key:

- `incident_<h>_raised_<severity>`: created once when any part of the incident raised that
  severity. The incident's severity is the highest raised so far, so a later `high` from the
  catalog never lowers a `critical` the runbook raised.
- `incident_<h>_waiter_<stage>`: the one run that waits for the acknowledgement and re-pages
  at that stage (`critical`, `approval`, ...). Created only if absent (the server's unique
  name decides between two runs); a holder that ended is replaced.
- `incident_<h>_ack`: who acknowledged. Any waiter of the key stops re-paging once it is set.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import VariableCreate, VariableUpdate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from pydantic import BaseModel, Field

from tasks.contacts import Severity, highest


class AckRecord(BaseModel):
    """The acknowledgement of an incident, whichever of its runs received it."""

    by: str
    note: str = ""
    at: datetime
    run_id: str | None = Field(None, description="The escalate run that was acknowledged.")


def _prefix(incident_key: str) -> str:
    return "incident_" + hashlib.sha256(incident_key.encode()).hexdigest()[:32]


def _read(name: str) -> Any:
    with get_client(sync_client=True) as client:
        var = client.read_variable_by_name(name)
    return None if var is None else var.value


def _create(name: str, value: dict[str, Any]) -> bool:
    """Create `name` only if absent; False when it already exists."""
    with get_client(sync_client=True) as client:
        try:
            client.create_variable(VariableCreate(name=name, value=value, tags=["incident"]))
        except ObjectAlreadyExists:
            return False
    return True


def _update(name: str, value: dict[str, Any]) -> None:
    with get_client(sync_client=True) as client:
        client.update_variable(VariableUpdate(name=name, value=value))


def raise_severity(incident_key: str, severity: Severity, run_id: str | None) -> Severity:
    """Record that `severity` was raised for the incident; the incident's severity now."""
    name = f"{_prefix(incident_key)}_raised_{severity.value}"
    _create(name, {"run_id": run_id, "at": datetime.now(UTC).isoformat()})
    return current_severity(incident_key) or severity


def current_severity(incident_key: str) -> Severity | None:
    """The highest severity any part of the incident raised (None: nothing raised yet)."""
    raised = [s for s in Severity if _read(f"{_prefix(incident_key)}_raised_{s.value}") is not None]
    return highest(*raised) if raised else None


def _run_ended(run_id: str) -> bool:
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(run_id)  # type: ignore[arg-type]
        except ObjectNotFound:
            return True
    return run.state is not None and run.state.is_final()


def claim_waiter(incident_key: str, stage: str, run_id: str) -> str | None:
    """Become the one run that waits and re-pages at `stage`; None, else the holder's id.

    A holder whose run ended (acknowledged, crashed, cancelled) no longer waits: its place
    is taken, so a later run of the same incident picks up the chain where it stopped.
    """
    name = f"{_prefix(incident_key)}_waiter_{stage}"
    value = {"run_id": run_id, "at": datetime.now(UTC).isoformat()}
    if _create(name, value):
        return None
    held = _read(name)
    holder = str(held.get("run_id")) if isinstance(held, dict) else ""
    if holder == run_id:
        return None
    if not holder or _run_ended(holder):
        _update(name, value)
        return None
    return holder


def waiter(incident_key: str, stage: str) -> str | None:
    """The run id that holds the wait at `stage`, if any."""
    held = _read(f"{_prefix(incident_key)}_waiter_{stage}")
    return str(held["run_id"]) if isinstance(held, dict) and held.get("run_id") else None


def record_ack(incident_key: str, ack: AckRecord) -> None:
    """Store the acknowledgement (the first one is kept: it stopped the chain)."""
    name = f"{_prefix(incident_key)}_ack"
    _create(name, ack.model_dump(mode="json"))


def read_ack(incident_key: str) -> AckRecord | None:
    """The incident's acknowledgement, if someone gave one."""
    value = _read(f"{_prefix(incident_key)}_ack")
    return AckRecord.model_validate(value) if isinstance(value, dict) else None
