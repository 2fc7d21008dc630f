"""Group commit of the receiver's journal writes: one fsync for a burst of deliveries."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from deployments.journal import Added, Entry, Journal


@dataclass
class GroupCommit:
    """Adds journal entries in batches: those arriving during a write share the next one."""

    journal: Journal
    _queue: list[tuple[Entry, asyncio.Future[Added]]] = field(default_factory=list)
    _writer: asyncio.Task[None] | None = None

    async def add(self, entry: Entry) -> Added:
        """Group commit: deliveries arriving while a write is on disk share the next fsync."""
        future: asyncio.Future[Added] = asyncio.get_running_loop().create_future()
        self._queue.append((entry, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write())
        return await future

    async def _write(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                # In a thread: the fsync must not stall the event loop.
                results = await asyncio.to_thread(self.journal.add_many, [e for e, _ in batch])
            except Exception as exc:  # noqa: BLE001 - each waiting delivery gets the error
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)
