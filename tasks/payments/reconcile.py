"""Reconcile: for every payment a run touched, the backend's view against the gateway's.

Three views per payment: its status and the charge ids the backend recorded (payments API),
and the gateway's charges for it (gateway API). An anomaly is any of: more than one gateway
charge; a gateway charge the backend does not know, or a backend charge the gateway does
not have; succeeded without a charge, or failed with one; neither succeeded nor failed with
a reason. Read only.
"""

from __future__ import annotations

from collections.abc import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from tasks.clients import gateway_http, payments_http
from tasks.payments.api import GatewayCharge, Payment, gateway_charges, get_payments
from tasks.retry import RETRY_READ
from tasks.settings import PaymentsSettings


class Anomaly(BaseModel):
    """One payment whose views disagree, and how."""

    payment_id: str
    problem: str


class StillFailed(BaseModel):
    """A touched payment still failed, with the backend's reason."""

    payment_id: str
    amount: int
    currency: str
    reason: str


class Reconciliation(BaseModel):
    """Every touched payment accounted for: recovered, still failed (why), or an anomaly."""

    touched: int
    recovered: int
    recovered_amounts: dict[str, int] = Field(description="currency -> minor units.")
    still_failed: list[StillFailed]
    still_failed_amounts: dict[str, int]
    anomalies: list[Anomaly]
    missing: list[str] = Field(default_factory=list, description="Touched, unknown to the API.")

    @property
    def clean(self) -> bool:
        """No anomaly and nothing missing."""
        return not self.anomalies and not self.missing


#: Said of an anomaly whose payment still has an open key: the charge the backend does not
#: know yet is the one a retry with that key replays (never a second one).
OPEN_KEY_NOTE = "; its key is still open: a retry with the same key settles it"


def compare(
    ids: Sequence[str],
    payments: Sequence[Payment],
    charges: dict[str, list[GatewayCharge]],
    open_keys: frozenset[str] = frozenset(),
) -> Reconciliation:
    """The three views compared (pure: unit-tested without any server). `open_keys`: the
    payments whose outcome is still unknown (their anomalies say how they settle)."""
    by_id = {p.id: p for p in payments}
    anomalies: list[Anomaly] = []
    still: list[StillFailed] = []
    recovered: dict[str, int] = {}
    failed_amounts: dict[str, int] = {}
    count = 0
    for pid in ids:
        p = by_id.get(pid)
        if p is None:
            continue
        gw = {c.id for c in charges.get(pid, [])}
        backend = set(p.charges)
        if len(charges.get(pid, [])) > 1:
            anomalies.append(Anomaly(payment_id=pid, problem=f"{len(gw)} gateway charges"))
        if gw - backend:
            anomalies.append(
                Anomaly(
                    payment_id=pid,
                    problem=f"gateway charge(s) {sorted(gw - backend)} unknown to the backend",
                )
            )
        if backend - gw:
            anomalies.append(
                Anomaly(
                    payment_id=pid,
                    problem=f"backend charge(s) {sorted(backend - gw)} not at the gateway",
                )
            )
        if p.status == "succeeded":
            if not backend:
                anomalies.append(Anomaly(payment_id=pid, problem="succeeded without a charge"))
            count += 1
            recovered[p.currency] = recovered.get(p.currency, 0) + p.amount
        elif p.status == "failed" and p.last_error:
            if backend or gw:
                anomalies.append(Anomaly(payment_id=pid, problem="failed with a charge"))
            still.append(
                StillFailed(
                    payment_id=pid, amount=p.amount, currency=p.currency, reason=p.last_error
                )
            )
            failed_amounts[p.currency] = failed_amounts.get(p.currency, 0) + p.amount
        else:
            anomalies.append(Anomaly(payment_id=pid, problem=f"ends {p.status} without a reason"))
    anomalies = [
        a.model_copy(update={"problem": a.problem + OPEN_KEY_NOTE})
        if a.payment_id in open_keys
        else a
        for a in anomalies
    ]
    return Reconciliation(
        touched=len(ids),
        recovered=count,
        recovered_amounts=recovered,
        still_failed=still,
        still_failed_amounts=failed_amounts,
        anomalies=anomalies,
        missing=[pid for pid in ids if pid not in by_id],
    )


@task(**RETRY_READ, cache_policy=NO_CACHE, task_run_name="reconcile-payments")
def reconcile(
    ids: list[str], open_keys: list[str] | None = None, settings: PaymentsSettings | None = None
) -> Reconciliation:
    """Read the backend's and the gateway's views of `ids` and compare them."""
    settings = settings or PaymentsSettings()
    with payments_http(settings) as api:
        payments = get_payments(api, ids)
    with gateway_http(settings) as gw:
        charges = gateway_charges(gw, ids)
    return compare(ids, payments, charges, frozenset(open_keys or ()))
