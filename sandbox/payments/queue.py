"""The failed-transactions queue in Redis: one stream entry per payment while it is failed.

The stream `<prefix>payments:failed` holds entries `{payment_id, error}`; the hash
`<prefix>payments:failed:index` maps each payment to its entry, so success can XDEL it.
A payment that fails again while queued keeps its first entry: the stream's length and
oldest entry then agree with the `failed_transactions` view (depth and oldest age).
"""

from __future__ import annotations

from collections.abc import Iterable

import redis

_ENQUEUE = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
local id = redis.call('XADD', KEYS[1], '*', 'payment_id', ARGV[1], 'error', ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], id)
return 1
"""

_DEQUEUE = """
local id = redis.call('HGET', KEYS[2], ARGV[1])
if not id then return 0 end
redis.call('XDEL', KEYS[1], id)
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""


class FailedQueue:
    """The stream of failed payments and its index, under one key prefix."""

    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self.client = client
        self.stream = f"{key_prefix}payments:failed"
        self.index = f"{key_prefix}payments:failed:index"
        self._enqueue = client.register_script(_ENQUEUE)
        self._dequeue = client.register_script(_DEQUEUE)

    def enqueue(self, payment_id: str, error: str) -> None:
        """Queue a failed payment (no-op when it is queued already)."""
        self._enqueue(keys=[self.stream, self.index], args=[payment_id, error[:200]])

    def enqueue_many(self, items: Iterable[tuple[str, str]]) -> None:
        """Queue many failed payments in one pipeline."""
        pipe = self.client.pipeline(transaction=False)
        for payment_id, error in items:
            self._enqueue(
                keys=[self.stream, self.index], args=[payment_id, error[:200]], client=pipe
            )
        pipe.execute()

    def dequeue(self, payment_id: str) -> None:
        """Remove a payment's entry (it succeeded)."""
        self._dequeue(keys=[self.stream, self.index], args=[payment_id])

    def clear(self) -> None:
        """Delete the stream and its index."""
        self.client.delete(self.stream, self.index)
