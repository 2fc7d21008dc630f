"""The payment gateway's way back in the payments drill: flaky first, then healthy.

When the alert fires the gateway comes back half-way: `charge_then_timeout` for a share of
charges (it charges, then answers after the backend stopped waiting: the outcome is
unknown to the backend, the money moved). It stays so until the run's retries have met
such an answer (the backend's `akig_payment_attempts_total{kind="retry",result="unknown"}`
rises), then it is `ok`. The run must resume each of those with the SAME key (the gateway
then replays its one charge); a new key would charge the customer a second time, which the
drill's ledger check would find.

The checkout holds its new payments while the gateway is flaky: a checkout payment whose
create charged and timed out, then left failed, would be retried by the run under a new key
and charged twice (the backend derives the gateway's key from the caller's, and the run
cannot know the checkout's key). That gap is the payments API's (docs/drills.md); until it
is closed the drill keeps its own traffic out of that window.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from drills.payments_ledger import failed_now
from drills.payments_parts import PaymentsSandbox
from drills.payments_traffic import Checkout


@dataclass
class Recovery:
    """Snapshot the failed queue, make the gateway flaky, then healthy once the run met it."""

    sandbox: PaymentsSandbox
    checkout: Checkout
    share: float = 0.5
    #: The longest the gateway stays flaky waiting for the run's retries.
    wait_s: float = 60.0
    failed_at_alert: list[str] = field(default_factory=list)
    flaky_at: datetime | None = None
    ok_at: datetime | None = None
    error: str | None = None
    unknown_before: float = 0.0
    _flaky: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def begin(self) -> None:
        """Start the way back; returns once the gateway is flaky (or the attempt failed)."""
        self._thread = threading.Thread(target=self._run, name="drill-gateway", daemon=True)
        self._thread.start()
        self._flaky.wait(30)

    def _run(self) -> None:
        sandbox = self.sandbox
        try:
            # No checkout request in flight: the queue now is the run's work, all of it
            # failed without a charge (the gateway failed every call), and none is added
            # while the gateway is flaky.
            with self.checkout.quiet():
                self.failed_at_alert = failed_now(sandbox.dsn)
                self.unknown_before = sandbox.attempts("retry", "unknown")
                sandbox.behaviour("charge_then_timeout", self.share)
                self.flaky_at = datetime.now(UTC)
                self._flaky.set()
                deadline = time.monotonic() + self.wait_s
                while not self._stop.is_set() and time.monotonic() < deadline:
                    if sandbox.attempts("retry", "unknown") > self.unknown_before:
                        break
                    time.sleep(0.05)
                sandbox.behaviour("ok")
                self.ok_at = datetime.now(UTC)
        except Exception as exc:  # noqa: BLE001 (said by the drill, which then fails)
            self.error = f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(Exception):
                sandbox.behaviour("ok")
        finally:
            self._flaky.set()

    def unknown_met(self) -> int:
        """Retry answers "outcome unknown" the run met (charged then timed out) so far."""
        return int(self.sandbox.attempts("retry", "unknown") - self.unknown_before)

    def finish(self) -> None:
        """The gateway healthy, the thread ended (on every path)."""
        self._stop.set()
        self._flaky.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
