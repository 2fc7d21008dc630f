"""A small fixed-size psycopg connection pool (the backend's and the gateway's)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty, Queue
from typing import Any

import psycopg
from psycopg.rows import DictRow, dict_row


class PoolExhaustedError(Exception):
    """No pooled connection became free in time."""


class Pool:
    """A small fixed-size psycopg connection pool; a broken connection is replaced lazily."""

    def __init__(self, dsn: str, size: int, wait_s: float) -> None:
        self._dsn = dsn
        self._wait_s = wait_s
        self._free: Queue[psycopg.Connection[DictRow] | None] = Queue()
        for _ in range(size):
            self._free.put(None)
        self.queries = 0  # for tests: statements sent, N+1 shows as many per request
        self._count_lock = threading.Lock()

    @contextmanager
    def connection(self, wait_s: float | None = None) -> Iterator[psycopg.Connection[DictRow]]:
        """A pooled connection; raises `PoolExhaustedError` after `wait_s`."""
        try:
            conn = self._free.get(timeout=self._wait_s if wait_s is None else wait_s)
        except Empty:
            raise PoolExhaustedError("database connection pool exhausted") from None
        try:
            if conn is None or conn.closed or conn.broken:
                conn = psycopg.connect(
                    self._dsn,
                    autocommit=True,
                    connect_timeout=3,
                    application_name="akig-backend",
                    options="-c statement_timeout=10000",
                    row_factory=dict_row,
                )
            yield conn
        except BaseException:
            if conn is not None and conn.broken:
                conn.close()
                conn = None
            raise
        finally:
            self._free.put(conn)

    def fetch(self, query: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Run one read and return its rows."""
        with self._count_lock:
            self.queries += 1
        with self.connection() as conn:
            return list(conn.execute(query, params).fetchall())

    def close(self) -> None:
        """Close every idle connection."""
        while True:
            try:
                conn = self._free.get_nowait()
            except Empty:
                return
            if conn is not None:
                conn.close()
