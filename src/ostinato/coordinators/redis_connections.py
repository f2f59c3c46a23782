"""The Redis coordinator's connections, which ``redis.py`` builds its leases on.

Three clients: one for commands, whose every reply is bounded by the URL's
``timeout``, one like it for renewals alone (its connection stays open between
rounds), and one for pub/sub, which waits for events as long as it takes.
Keys are named under the coordinator's prefix (``_key``), and an error that
means "no Redis to talk to right now" becomes ``CoordinatorUnavailable``.

Events travel over pub/sub. The events connection doubles as the watch for a
server that restarted: when it drops, every lease granted here may have been
forgotten, so the runner hears ``dropped`` for each (see ``redis.py``). A
refused standby whose lease holder runs on this host hears ``released`` the
moment that holder dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AuthenticationError,
    InvalidResponse,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from ostinato.coordinators.liveness import RunnerLocks, host_folder
from ostinato.coordinators.network import EventFeed, take_options, unavailable
from ostinato.coordinators.protocol import Coordinator, Event, RunnerInfo
from ostinato.coordinators.urls import redact
from ostinato.errors import ConfigurationError, CoordinatorUnavailable

# Errors that mean "no Redis to talk to right now" (down, loading, a read-only
# replica after a failover, something else on the port), as opposed to a bug.
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, InvalidResponse, OSError)


class RedisConnections(Coordinator):
    """The clients of a Redis coordinator, its key names, its errors and its events."""

    def __init__(self, url: str) -> None:
        self.display_url = redact(url)
        self._url, options = take_options(url, {"prefix": "ostinato"})
        self.prefix, self.timeout = options["prefix"], float(options["timeout"])
        if not self.prefix:
            raise ConfigurationError(f"bad Redis URL {self.display_url!r}: empty prefix")
        self._password = urlsplit(url).password
        self._client = self._make_client(self.timeout)
        # Renewals go on a client of their own, one round at a time, so its connection stays
        # open from one round to the next: a renewal never waits for a connection to be
        # opened because other calls hold the shared ones. Opening one costs two round trips
        # before the command (CLIENT SETNAME, then CLIENT SETINFO); with 0.1 s of latency
        # each way that made a renewal take 0.65 s, and a TTL of 1 s ran out meanwhile.
        self._renewals = self._make_client(self.timeout)
        # No read timeout for pub/sub: it waits for messages for as long as it takes.
        self._events_client = self._make_client(None)
        self.channel = f"{self.prefix}:events"
        self._events = EventFeed[PubSub](
            f"ostinato-redis-events:{self.prefix}", self.display_url, self._messages,
            self._listen, self._drop, UNREACHABLE, self._unavailable, self._connection_lost,
            self._reconnected,
        )
        self._closed = False
        # The leases granted here and not yet given up or lost: loop -> fence.
        self._held: dict[str, int] = {}
        # Those of them granted while the events connection was down, so by a server
        # that may have restarted unseen since.
        self._unwatched: set[str] = set()
        self.locks = RunnerLocks(host_folder())
        # Holders on this host that refused us, by runner id: who waits, for which loops.
        self._mourners: dict[str, tuple[asyncio.Task[None], set[str]]] = {}

    def _make_client(self, read_timeout: float | None) -> aioredis.Redis:
        return aioredis.Redis.from_url(
            self._url,
            decode_responses=True,
            socket_timeout=read_timeout,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            client_name=f"ostinato:{self.prefix}",  # tells operators whose connections these are
        )

    def _key(self, kind: str, key: str = "") -> str:
        return f"{self.prefix}:{kind}:{key}" if key else f"{self.prefix}:{kind}"

    @contextlib.contextmanager
    def _reaching(self) -> Iterator[None]:
        if self._closed:
            raise CoordinatorUnavailable(f"the coordinator {self.display_url} is closed")
        try:
            yield
        except UNREACHABLE as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: BaseException) -> CoordinatorUnavailable:
        return unavailable("Redis", self.display_url, self._password, exc)

    async def open(self) -> None:
        try:
            with self._reaching():
                await self._client.ping()
        except CoordinatorUnavailable as exc:
            if isinstance(exc.__cause__, AuthenticationError):
                raise ConfigurationError(f"{exc}; check the user and password in the URL") from None
            raise
        except ResponseError as exc:  # SELECT of a database the server does not have, say
            text = str(exc).replace(self._password, "***") if self._password else str(exc)
            raise ConfigurationError(
                f"Redis at {self.display_url} refused the connection: {text}; check the URL "
                "(redis://host:port/DB, where DB is below the server's 'databases' setting)"
            ) from None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        mourners = [task for task, _ in self._mourners.values()]
        for task in mourners:
            task.cancel()
        if mourners:
            await asyncio.wait(mourners, timeout=self.timeout)
        await self._events.stop(self.timeout)
        await self._client.aclose()
        await self._renewals.aclose()
        await self._events_client.aclose()
        self.locks.release_all()

    # -- a server that restarted, a holder that died -----------------------------------

    def _connection_lost(self) -> None:
        """The events connection dropped: the server may have restarted and forgotten
        every lease, so the runner stops their passes and asks for them again."""
        held, self._held = self._held, {}
        self._unwatched.clear()
        for key in held:
            self._events.deliver(Event("dropped", key))

    def _reconnected(self) -> None:
        """The events connection is back: a lease granted while it was down may come from
        a server that restarted in the meantime, unseen, so it is asked for again."""
        unwatched, self._unwatched = self._unwatched, set()
        for key in unwatched:
            if self._held.pop(key, None) is not None:
                self._events.deliver(Event("dropped", key))

    def _mourn(self, key: str, owner: str, pid: int) -> None:
        """Announce ``released`` for ``key`` once ``owner``, a runner of this host, dies."""
        if self._closed or not self._events.callbacks:
            return
        if owner in self._mourners:
            self._mourners[owner][1].add(key)
            return
        keys = {key}
        task = asyncio.get_running_loop().create_task(self._await_death(owner, pid, keys))
        self._mourners[owner] = (task, keys)

    async def _await_death(self, owner: str, pid: int, keys: set[str]) -> None:
        try:
            await self.locks.wait_for_death(owner, pid)
        finally:
            self._mourners.pop(owner, None)
        for key in keys:
            self._events.deliver(Event("released", key))

    # -- events ------------------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        await self.publish_many([event])

    async def publish_many(self, events: Sequence[Event]) -> None:
        if not events:
            return
        with self._reaching():
            pipe = self._client.pipeline(transaction=False)
            for event in events:
                pipe.publish(self.channel, json.dumps({"kind": event.kind, "key": event.key}))
            await pipe.execute()

    async def subscribe(self, runner: RunnerInfo, callback: Callable[[Event], None]) -> None:
        if not self._events.started:
            with self._reaching():
                self._events.start(await self._listen())
        self._events.callbacks.append(callback)

    async def _listen(self) -> PubSub:
        """A pub/sub connection whose subscription the server has confirmed."""
        pubsub = self._events_client.pubsub()
        try:
            async with asyncio.timeout(self.timeout):
                await pubsub.subscribe(self.channel)
                while (await pubsub.get_message(timeout=self.timeout)) is None:
                    pass
        except BaseException:
            await self._drop(pubsub)
            raise
        return pubsub

    @staticmethod
    async def _messages(pubsub: PubSub) -> AsyncIterator[str]:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            if message is not None and message.get("type") == "message":
                yield message["data"]

    @staticmethod
    async def _drop(pubsub: PubSub) -> None:
        with contextlib.suppress(RedisError, OSError):
            await cast(Any, pubsub).aclose()  # typed in some redis-py releases, not in others

    # -- tests -------------------------------------------------------------------------

    async def drop_everything(self) -> None:
        """Delete every key under this coordinator's prefix (for tests)."""
        client = self._make_client(self.timeout)
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in self.prefix) + ":*"
        try:
            async for name in client.scan_iter(match=pattern, count=500):
                await client.delete(name)
        finally:
            await client.aclose()

    async def _each_chunk(
        self, script: AsyncScript, names: list[str], head: list[EncodableT],
        calls: list[tuple[list[str], str]], *, client: aioredis.Redis | None = None,
    ) -> list[tuple[list[str], Any]]:
        """``script`` once per call (its keys, and its lines after ``head``), every call in
        one pipeline: one round trip in all. EVALSHA straight into the pipeline (redis-py's
        script-aware pipeline would spend a SCRIPT EXISTS round trip first, every time); a
        server that lost the script is given it and asked again. On ``client``, if given."""
        client = client or self._client
        out: list[tuple[list[str], Any]] = []
        for _ in range(2):
            pipe = client.pipeline(transaction=False)
            for _chunk, lines in calls:
                pipe.evalsha(script.sha, len(names), *names, *head, lines)
            results = await pipe.execute(raise_on_error=False)
            missing = []
            for call, result in zip(calls, results, strict=True):
                if isinstance(result, NoScriptError):
                    missing.append(call)
                elif isinstance(result, BaseException):
                    raise result
                else:
                    out.append((call[0], result))
            if not missing:
                break
            script.sha = await client.script_load(script.script)
            calls = missing
        return out
