"""The one thread that uses a SQLite coordinator's connection (``sqlite.py``).

A ``sqlite3`` connection belongs to one thread, and a runner's renewals must never
queue behind its own standbys' lease requests, so waiting calls are taken by
priority rather than in arrival order.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# The order in which the connection's thread takes waiting statements: renewals first
# (a lease must not run out behind this runner's own requests), a standby's lease
# requests last.
RENEWAL, URGENT, REQUEST = 0, 1, 2


class Worker:
    """The one thread that uses the connection, taking waiting calls by priority."""

    def __init__(self) -> None:
        self._queue: queue.PriorityQueue[tuple[int, int, Callable[[], Any] | None,
                                               concurrent.futures.Future[Any] | None]]
        self._queue = queue.PriorityQueue()
        self._order = itertools.count()
        threading.Thread(target=self._work, name="ostinato-sqlite", daemon=True).start()

    def submit(self, priority: int, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((priority, next(self._order), fn, future))
        return future

    def stop(self) -> None:
        """End the thread once every call already submitted has run."""
        self._queue.put((REQUEST + 1, next(self._order), None, None))

    def _work(self) -> None:
        while True:
            _, _, fn, future = self._queue.get()
            if fn is None or future is None:
                return
            if not future.set_running_or_notify_cancel():
                continue  # the caller gave up waiting
            try:
                result = fn()
            except BaseException as exc:  # handed to the caller, as an executor would
                future.set_exception(exc)
            else:
                future.set_result(result)
