"""Whether the 5xx ended: while a run waited (`errors_ended`), and after it acted
(`verify_recovery`, the one place an escalation hooks in)."""

from __future__ import annotations

import time
from collections.abc import Callable

from pydantic import Field, computed_field

from flows.common import failure_text
from flows.driver import Verification
from flows.error_rate.params import HighErrorRateParams, pct
from tasks.errors import RunbookError
from tasks.prometheus import error_rate_by_route
from tasks.settings import PrometheusSettings


class VerifyResult(Verification):
    """`verify_recovery`'s answer (`healthy`: recovered); not recovered escalates (critical)."""

    threshold: float
    window: str
    before: float | None = Field(description="The overall 5xx ratio when the run began.")
    after: float | None = Field(description="The last ratio read while verifying.")
    waited_s: float
    samples: list[float | None] = Field(default_factory=list)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def recovered(self) -> bool:
        """The 5xx ratio fell below the threshold in time."""
        return self.healthy

    @property
    def reason(self) -> str:
        """Why it is (not) recovered, in figures."""
        return self.summary


def errors_ended(params: HighErrorRateParams, before: float | None) -> float | None:
    """The recent 5xx ratio (`verify_window`) when the errors the plan was made for ended.

    None unless the ratio was above the threshold when planned and is measured below it now:
    what another run's remediation (or the incident's own end) looks like to a run that
    waited. Not measurable (no Prometheus, no traffic) is not "ended": the evidence decides.
    """
    if before is None or before <= params.error_rate_max:
        return None
    try:
        figures = error_rate_by_route(params.verify_window)
    except RunbookError:
        return None
    now = figures.overall if figures.configured else None
    return now if now is not None and now < params.error_rate_max else None


def verify_recovery(
    params: HighErrorRateParams,
    before: float | None,
    settings: PrometheusSettings | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> VerifyResult:
    """Poll Prometheus' 5xx ratio until it is below the threshold, or the timeout passes.

    `recovered` False means the remediation did not end the errors (or they could not be
    measured) and a human must take over.
    """
    settings = settings or PrometheusSettings()
    start = time.monotonic()
    samples: list[float | None] = []
    reason = ""

    def result(healthy: bool, after: float | None, why: str) -> VerifyResult:
        return VerifyResult(
            healthy=healthy,
            summary=why,
            threshold=params.error_rate_max,
            window=params.verify_window,
            before=before,
            after=after,
            waited_s=round(time.monotonic() - start, 1),
            samples=samples[-20:],
        )

    while True:
        try:
            figures = error_rate_by_route(params.verify_window, settings=settings)
        except RunbookError as exc:
            figures, reason = None, f"Prometheus unavailable: {failure_text(exc)}"
        waited = time.monotonic() - start
        if figures is not None and not figures.configured:
            reason = "Prometheus not configured: the recovery cannot be measured"
            break
        value = figures.overall if figures is not None else None
        if figures is not None:
            samples.append(value)
            reason = ""
        if value is not None and value < params.error_rate_max:
            why = f"5xx ratio {value:.1%} < {params.error_rate_max:.0%} after {waited:.0f} s"
            return result(True, value, why)
        if waited >= params.verify_timeout_s:
            break
        sleep(min(2.0, max(0.1, params.verify_timeout_s - waited)))
    last = next((s for s in reversed(samples) if s is not None), None)
    return result(
        False,
        last,
        reason
        or f"5xx ratio still {pct(last)} (>= {params.error_rate_max:.0%}) after "
        f"{params.verify_timeout_s:g} s",
    )
