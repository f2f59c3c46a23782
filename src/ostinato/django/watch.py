"""What the mounted dashboard and the admin page read from the coordinator, from sync views.

Each request connects to the coordinator, does its work and disconnects, as
``app.pause()`` does: a Django process may serve requests from many threads, and
under ASGI from no thread of ours at all, so no connection outlives a request.
The dashboard's history (its rates and one-hour charts) is the one thing kept
between requests: ``Watch`` holds one per process, fed by the page's polls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeVar

from ostinato.coordinators import Coordinator, LoopRecord
from ostinato.dashboard import SAMPLE_EVERY, Board, History
from ostinato.errors import CoordinatorUnavailable
from ostinato.operate import run_sync

T = TypeVar("T")


def call(job: Callable[[Coordinator], Awaitable[T]], *, open_first: bool = True) -> T:
    """Run ``job`` on a connection to the project's coordinator made for the call (opened
    first, unless ``job`` opens it itself), closed after it."""
    from ostinato.django import get_app

    async def connected() -> T:
        store = get_app().connect()
        try:
            if open_first:
                await store.open()
            return await job(store)
        finally:
            await store.close()

    return run_sync(connected())


class Watch:
    """One process's samples of the coordinator, for the dashboard mounted in Django.

    A sample is taken when the page polls and the last one is older than about
    ``every``, so several open pages do not crowd the history (its ring holds an
    hour of samples ``every`` seconds apart); a lock keeps the samples in time order.
    The charts start when a page is first opened in this process, not when runners did.
    """

    def __init__(self, every: float = SAMPLE_EVERY) -> None:
        self.every = every
        self.history = History(every)
        self.records: list[LoopRecord] = []
        self.sampled_at: float | None = None
        self.error: str | None = None
        self.lock = threading.Lock()

    def snapshot(self, expand: Collection[str] = ()) -> dict[str, Any]:
        """What ``api/loops`` answers: the standalone dashboard's answer, sampled if due, with
        the members of the loops in ``expand`` listed."""
        with self.lock:
            return call(lambda store: self._on(store, None, expand), open_first=False)

    def act(self, action: str, key: str) -> dict[str, Any]:
        """Run a dashboard action (``pause``, ``resume``, ``wake``, ``release``) on loop ``key``
        and answer as the standalone dashboard does; ``OstinatoError`` if it cannot be done."""
        with self.lock:
            return call(lambda store: self._on(store, (action, key)), open_first=False)

    async def _on(self, store: Coordinator, action: tuple[str, str] | None,
                  expand: Collection[str] = ()) -> dict[str, Any]:
        """A ``Board`` on ``store`` holding this process's history and last sample: run
        ``action`` on it, or answer its snapshot (sampled first if due); keep what it sampled.
        The board opens ``store`` when it samples, so an outage is shown on the page."""
        board = Board(store.display_url, coordinator=store, every=self.every)
        board.history = self.history
        board.records, board.sampled_at, board.error = self.records, self.sampled_at, self.error
        try:
            if action is None:
                if self.sampled_at is None or time.time() - self.sampled_at >= self.every * 0.9:
                    await board.sample()
                return board.snapshot(expand)
            await board.sample()  # reads the loops; an outage is kept in board.error, not raised
            if board.error is not None:
                raise CoordinatorUnavailable(board.error)
            return await board.act(*action)  # samples again, so the page shows the change
        finally:
            self.records, self.sampled_at, self.error = board.records, board.sampled_at, board.error
