"""Alertmanager's webhook payload, version 4 (prometheus/alertmanager `notify/webhook`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter

_DATETIME = TypeAdapter(datetime)


def _timestamp(value: str) -> str:
    """Check an RFC 3339 timestamp but keep Alertmanager's exact text (nanoseconds)."""
    _DATETIME.validate_python(value)
    return value


#: Kept as text: the idempotency key must not depend on how we round nanoseconds.
Timestamp = Annotated[str, Field(max_length=64), AfterValidator(_timestamp)]


class Alert(BaseModel):
    """One alert of a notification group."""

    model_config = ConfigDict(extra="allow", frozen=True)

    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: Timestamp
    endsAt: Timestamp | None = None
    generatorURL: str = ""
    fingerprint: str = Field(min_length=1, max_length=64, pattern=r"^[0-9a-zA-Z]+$")

    @property
    def alertname(self) -> str:
        return self.labels.get("alertname", "")

    @property
    def idempotency_key(self) -> str:
        """Same firing alert (fingerprint + startsAt) = same key, however often delivered."""
        return f"{self.fingerprint}:{self.startsAt}"


class WebhookPayload(BaseModel):
    """The body Alertmanager POSTs to a webhook receiver."""

    model_config = ConfigDict(extra="allow", frozen=True)

    version: Literal["4"]
    groupKey: str
    truncatedAlerts: int = Field(0, ge=0)
    status: Literal["firing", "resolved"]
    receiver: str
    groupLabels: dict[str, str] = Field(default_factory=dict)
    commonLabels: dict[str, str] = Field(default_factory=dict)
    commonAnnotations: dict[str, str] = Field(default_factory=dict)
    externalURL: str = ""
    alerts: list[Alert] = Field(max_length=1000)
