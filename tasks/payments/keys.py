"""The idempotency-key ledger: one key per (payment, failed attempt), pinned BEFORE the call.

Rules (why no customer is charged twice):

- `pin` writes the key with SET NX before the API is called: the first writer wins, and any
  later task retry, concurrent worker or re-run reads the pinned key back. An open key is
  re-used whatever the payment's `attempts` says now (the backend's bulk retry or traffic
  may have moved it on while the outcome of our call was unknown).
- `close` ends a key only on a definite answer (charged, declined, already succeeded, not
  found), and only if it is still the open one. A timeout, a 5xx, a 409 in flight or a 429
  leaves it open: the next call sends the same key, and the gateway replays its charge.
- Only after a key was closed may a later failure of the same payment get a new key; the
  new one is derived from the payment's attempts and differs from the last closed one.

Keys live in the runbooks' Redis under `PaymentsSettings.ledger_prefix`; a ledger that
cannot be reached is a `TransientError` (the batch retries; nothing is called without a key).
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from tasks.errors import TransientError

#: How long a pinned or closed key is kept; longer than the API keeps its keys (48 h), so
#: an open key is never forgotten while the API could still replay it.
LEDGER_TTL_S = 7 * 24 * 3600

# Close only the key that is open (a key closed and re-pinned by another run stays open).
_CLOSE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], ARGV[1] .. ' ' .. ARGV[2], 'EX', ARGV[3])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class PinnedKey:
    """The key to send for a payment, and whether an earlier call pinned it (re-used)."""

    payment_id: str
    key: str
    reused: bool


class KeyLedger:
    """Pin, read and close idempotency keys in Redis (one open key per payment)."""

    def __init__(self, client: redis.Redis, prefix: str, ttl_s: int = LEDGER_TTL_S) -> None:
        self.client, self.prefix, self.ttl_s = client, prefix, ttl_s
        self._close = client.register_script(_CLOSE)

    def _open(self, payment_id: str) -> str:
        return f"{self.prefix}open:{payment_id}"

    def _closed(self, payment_id: str) -> str:
        return f"{self.prefix}closed:{payment_id}"

    def open_key(self, payment_id: str) -> str | None:
        """The payment's open key, if a call was pinned and not answered definitely."""
        try:
            value = self.client.get(self._open(payment_id))
        except redis.RedisError as exc:
            raise TransientError(f"key ledger unreachable ({type(exc).__name__})") from None
        return str(value) if value is not None else None

    def last_closed(self, payment_id: str) -> tuple[str, str] | None:
        """The last closed key of the payment and the answer that closed it."""
        try:
            value = self.client.get(self._closed(payment_id))
        except redis.RedisError as exc:
            raise TransientError(f"key ledger unreachable ({type(exc).__name__})") from None
        if value is None:
            return None
        key, _, answer = str(value).partition(" ")
        return key, answer

    def pin(self, payment_id: str, attempts: int) -> PinnedKey:
        """The key to send: the open one if any, else a new one pinned first (SET NX)."""
        fresh = f"runbook:{payment_id}:{attempts}"
        try:
            closed = self.last_closed(payment_id)
            if closed is not None and closed[0].split("#")[0] == fresh:
                # The same attempt count after a definite answer: a later failure, a new key.
                counter = self._closed(payment_id) + ":n"
                pipe = self.client.pipeline()
                pipe.incr(counter)
                pipe.expire(counter, self.ttl_s)
                number, _ = pipe.execute()
                fresh = f"{fresh}#{number}"
            won = self.client.set(self._open(payment_id), fresh, nx=True, ex=self.ttl_s)
            if won:
                return PinnedKey(payment_id, fresh, reused=False)
            current = self.client.get(self._open(payment_id))
        except redis.RedisError as exc:
            raise TransientError(f"key ledger unreachable ({type(exc).__name__})") from None
        if current is None:  # closed between our SET and GET: pin again
            return self.pin(payment_id, attempts)
        return PinnedKey(payment_id, str(current), reused=True)

    def close(self, payment_id: str, key: str, answer: str) -> bool:
        """End `key` after a definite answer; False when it was not the open key."""
        try:
            done = self._close(
                keys=[self._open(payment_id), self._closed(payment_id)],
                args=[key, answer, self.ttl_s],
            )
        except redis.RedisError as exc:
            raise TransientError(f"key ledger unreachable ({type(exc).__name__})") from None
        return bool(done)
