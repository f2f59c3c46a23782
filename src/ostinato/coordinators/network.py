"""What the networked coordinators (Redis, PostgreSQL) share.

Their own URL query options, error messages that never show a password, and an
event feed: the callbacks subscribed through one coordinator, fed by one
listener task that reconnects with backoff when the server goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Generic, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from ostinato.coordinators.protocol import Event
from ostinato.coordinators.urls import redact
from ostinato.errors import ConfigurationError, CoordinatorUnavailable

log = logging.getLogger("ostinato.events")
C = TypeVar("C")

DEFAULT_TIMEOUT = 2.0
# A lost event feed is reopened no faster than this, backing off to the maximum.
RECONNECT_MIN, RECONNECT_MAX = 0.1, 5.0


def take_options(url: str, defaults: dict[str, str]) -> tuple[str, dict[str, str]]:
    """``url`` without the query parameters named in ``defaults``, and their values.

    ``timeout`` (seconds; bounds connecting and each reply) is always one of them.
    """
    defaults = {"timeout": str(DEFAULT_TIMEOUT), **defaults}
    parts = urlsplit(url)
    options = dict(defaults)
    options.update(
        (name, value)
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
        if name in defaults
    )
    # The other parameters pass on exactly as written: re-encoding them could turn
    # a space into a "+", which libpq would not read back as a space.
    rest = [
        piece for piece in parts.query.split("&")
        if piece and unquote(piece.partition("=")[0]) not in defaults
    ]
    try:
        valid = float(options["timeout"]) > 0
    except ValueError:
        valid = False
    if not valid:
        raise ConfigurationError(
            f"bad coordinator URL {redact(url)!r}: timeout must be a positive number of seconds"
        )
    return urlunsplit(parts._replace(query="&".join(rest))), options


def unavailable(
    server: str, display_url: str, password: str | None, exc: BaseException
) -> CoordinatorUnavailable:
    """The error for a server that cannot be reached, on one line, password replaced."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if password:
        text = text.replace(password, "***")
    return CoordinatorUnavailable(f"cannot reach {server} at {display_url}: {text}")


class EventFeed(Generic[C]):
    """Callbacks fed from one server connection ``C`` that is reopened whenever it is lost.

    ``receive`` yields the JSON payloads ``{"kind", "key"}`` arriving on a connection.
    Any error reopens the connection; one of the types in ``lost`` is an expected
    outage, logged without a traceback. ``on_lost`` runs each time the connection
    is lost, ``on_reopen`` each time a new one is open; ``generation`` counts both.
    """

    def __init__(
        self,
        name: str,
        display_url: str,
        receive: Callable[[C], AsyncIterator[str]],
        reopen: Callable[[], Awaitable[C]],
        close: Callable[[C], Awaitable[None]],
        lost: tuple[type[BaseException], ...],
        explain: Callable[[BaseException], object],
        on_lost: Callable[[], None] | None = None,
        on_reopen: Callable[[], None] | None = None,
    ) -> None:
        self.name, self.display_url = name, display_url
        self._on_lost, self._on_reopen = on_lost, on_reopen
        self.generation = 0
        self.connected = False
        self._kick = asyncio.Event()
        self._receive, self._reopen, self._close = receive, reopen, close
        self._lost, self._explain = lost, explain
        self.callbacks: list[Callable[[Event], None]] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def started(self) -> bool:
        return self._task is not None

    def start(self, first: C) -> None:
        """Feed the callbacks from ``first``, an open connection, and its successors."""
        self._task = asyncio.get_running_loop().create_task(self._follow(first), name=self.name)

    def kick(self) -> None:
        """Try to reopen a lost connection now rather than after the backoff."""
        self._kick.set()

    async def stop(self, wait: float) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=wait)

    def deliver(self, event: Event) -> None:
        for callback in list(self.callbacks):
            try:
                callback(event)
            except Exception:
                log.exception("an event callback failed on %s", event)

    def deliver_payload(self, payload: str) -> None:
        try:
            message = json.loads(payload)
            event = Event(str(message["kind"]), str(message["key"]))
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed event from %s", self.display_url)
            return
        if event.kind in Event.KINDS:
            self.deliver(event)

    async def _follow(self, conn: C | None) -> None:
        delay, failing = RECONNECT_MIN, False
        try:
            while True:
                try:
                    if conn is None:
                        conn = await self._reopen()
                        log.warning("receiving events from %s again", self.display_url)
                        delay, failing = RECONNECT_MIN, False
                        self.connected = True
                        self.generation += 1
                        if self._on_reopen is not None:
                            self._on_reopen()
                        self.deliver(Event("missed", ""))
                    self.connected = True
                    async for payload in self._receive(conn):
                        self.deliver_payload(payload)
                    raise ConnectionResetError("the event stream ended")
                except Exception as exc:  # the feed must outlive any one failure
                    self.connected = False
                    if conn is not None:
                        self.generation += 1
                        if self._on_lost is not None:
                            self._on_lost()
                    if not failing:
                        log.error("lost the events of %s, reconnecting: %s", self.display_url,
                                  self._explain(exc), exc_info=not isinstance(exc, self._lost))
                        failing = True
                    if conn is not None:
                        await self._close(conn)
                        conn = None
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._kick.wait(), delay)
                    self._kick.clear()
                    delay = min(delay * 2, RECONNECT_MAX)
        finally:
            self.connected = False
            if conn is not None:
                await self._close(conn)
