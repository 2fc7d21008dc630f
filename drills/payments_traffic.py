"""The payments drill's checkout: payments created at a steady rate through the sandbox API.

Each payment is one `POST /api/payments` with an `Idempotency-Key` of its own, as a
checkout makes them. An unknown outcome (502/504, `retry_with_same_key`) is retried with
the SAME key a few times, as a payment SDK does; a payment still without a definite answer
is left to the failed queue (the runbook's work). The workers hold a lock per payment, so
the drill can read the queue at a moment no checkout request is in flight (`quiet`).
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx

#: Every key the checkout sends starts so (the runbook's keys never do).
KEY_PREFIX = "drill-checkout-"


@dataclass
class Checkout:
    """`workers` threads, each creating a payment every `every_s` seconds."""

    client: Callable[[], httpx.Client]
    workers: int = 2
    every_s: float = 0.2
    same_key_retries: int = 2
    answers: Counter[str] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _hold: threading.Event = field(default_factory=threading.Event)
    _locks: list[threading.Lock] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _seq: int = 0
    _seq_lock: threading.Lock = field(default_factory=threading.Lock)

    def _next(self) -> int:
        with self._seq_lock:
            self._seq += 1
            return self._seq

    def pay(self, api: httpx.Client, customer: str, amount: int, retries: int | None = None) -> str:
        """One payment, its unknown outcomes retried with the same key; its last answer."""
        key = f"{KEY_PREFIX}{uuid.uuid4().hex}"
        body = {"customer": customer, "amount": amount, "currency": "EUR"}
        answer = "?"
        for attempt in range(1 + (self.same_key_retries if retries is None else retries)):
            if attempt:
                if self._hold.is_set():
                    break  # held: no more tries, the payment is left to the failed queue
                time.sleep(0.1 * attempt)
            try:
                r = api.post("/api/payments", json=body, headers={"Idempotency-Key": key})
            except httpx.HTTPError as exc:
                answer = type(exc).__name__
                continue
            answer = str(r.status_code)
            if r.status_code not in (409, 429, 502, 503, 504):
                break  # a definite answer (201 charged, 402 declined) or a client error
        self.answers[answer] += 1
        return answer

    def _work(self, lock: threading.Lock, seed: int) -> None:
        rng = random.Random(seed)
        with self.client() as api:
            next_at = time.monotonic()
            while not self._stop.is_set():
                with lock:
                    n = self._next()
                    with contextlib.suppress(Exception):  # a checkout never dies mid-drill
                        self.pay(api, f"cus_drill_{n:05d}", rng.randrange(500, 20_000))
                next_at += self.every_s
                self._stop.wait(max(0.0, next_at - time.monotonic()))

    def start(self) -> None:
        """Start the workers."""
        for i in range(self.workers):
            lock = threading.Lock()
            self._locks.append(lock)
            thread = threading.Thread(
                target=self._work, args=(lock, i), name=f"drill-checkout-{i}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """No checkout request in flight while the block runs: each worker ends its current
        request (no further same-key try) and waits between payments."""
        self._hold.set()
        try:
            with contextlib.ExitStack() as held:
                for lock in self._locks:
                    held.enter_context(lock)
                yield
        finally:
            self._hold.clear()

    def stop(self) -> None:
        """Stop the workers (each ends its current payment)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)
        self._threads.clear()

    @property
    def rate(self) -> float:
        """Payments per second the checkout aims at."""
        return self.workers / self.every_s
