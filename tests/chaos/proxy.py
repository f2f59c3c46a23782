"""A TCP proxy on 127.0.0.1 between the runners and their server, for network faults.

Each runner gets a listener of its own, so a fault can cut off one runner or all
of them. A listener forwards bytes both ways in one of three modes:

* ``normal``: as they come;
* ``blackhole``: connections are accepted, but nothing is forwarded either way
  until the mode changes (bytes wait, as TCP would retransmit them, and flow
  again when the fault heals; a client that gives up meanwhile closes);
* ``latency``: every chunk is held ``delay`` seconds before it goes on, in order.

The proxy runs its own event loop in a daemon thread of the test process.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
CHUNK = 65536


@dataclass(frozen=True)
class Mode:
    """How a listener forwards: ``blackhole`` wins over ``delay``."""

    blackhole: bool = False
    delay: float = 0.0


NORMAL = Mode()


@dataclass
class _Listener:
    server: asyncio.Server
    mode: Mode = NORMAL
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)


class Proxy:
    """Listeners on 127.0.0.1 forwarding to ``upstream``; ``set_mode`` injects the faults."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos-proxy", daemon=True)
        self._thread.start()
        self._listeners: dict[int, _Listener] = {}

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def listen(self) -> int:
        """Open a new listener and return its port."""
        return self._call(self._listen())

    async def _listen(self) -> int:
        holder: list[_Listener] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve(holder[0], reader, writer)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port: int = server.sockets[0].getsockname()[1]
        holder.append(_Listener(server))
        self._listeners[port] = holder[0]
        return port

    def set_mode(self, mode: Mode, port: int | None = None) -> None:
        """Switch one listener (``port``) or all of them to ``mode``."""

        async def switch() -> None:
            for listener_port, listener in self._listeners.items():
                if port is None or listener_port == port:
                    listener.mode = mode
                    listener.changed.set()
                    listener.changed = asyncio.Event()

        self._call(switch())

    async def _serve(
        self, listener: _Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        listener.writers.update((writer, up_writer))
        try:
            await asyncio.gather(
                self._pipe(listener, reader, up_writer), self._pipe(listener, up_reader, writer)
            )
        finally:
            for w in (writer, up_writer):
                listener.writers.discard(w)
                w.close()

    async def _pipe(
        self, listener: _Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Read chunks as they come; a second task writes each out when the mode lets it."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                arrived, data = await queue.get()
                if not data:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    return
                while True:
                    mode, changed = listener.mode, listener.changed
                    if mode.blackhole:
                        await changed.wait()
                        continue
                    wait = arrived + mode.delay - time.monotonic()
                    if wait <= 0:
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), wait)
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(send())
        try:
            while True:
                try:
                    data = await reader.read(CHUNK)
                except OSError:
                    data = b""
                queue.put_nowait((time.monotonic(), data))
                if not data:
                    break
            await sender
        except OSError:
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender
            writer.close()

    def close(self) -> None:
        """Close every listener and connection and stop the thread."""

        async def shut() -> None:
            for listener in self._listeners.values():
                listener.server.close()
                for writer in list(listener.writers):
                    writer.close()
                listener.changed.set()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        with contextlib.suppress(Exception):
            self._call(shut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()
