"""The ingest tier: take POSTed bundles fast, store them durably, answer 202; serve reads and the page.

A request's bundle is checked in the event loop, then handed to the ``Writer``:
a thread that stores whatever has queued up in one transaction (group commit:
one fsync for many requests); the request is answered once that transaction
has committed. On PostgreSQL and Redis two such threads take turns, so a batch
does not wait for the one before it to commit; on SQLite, one write lock, there
is one, and the WAL is checkpointed by a thread of its own, never by a commit.
After each commit the ``Waker`` is told which aggregator partitions got work; it
sends them a wake-up through the coordinator at most once per ``WAKE_EVERY``
seconds, from its own task, so the requests never wait for it.

Reads (``/v1/totals``, ``/v1/apps/{app}/windows``, ``/v1/stats``) come from
committed aggregates only, never from the inbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from examples.pipeline.model import MAX_BODY, ROLLUP, WINDOW, BadBundle, Bundle, parse_bundle
from examples.pipeline.store import Store, display
from examples.pipeline.store_redis import RedisStore
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ostinato.coordinators import Coordinator, Event, from_url

log = logging.getLogger("pipeline.ingest")

#: The most bundles one transaction of the writer stores.
MAX_BATCH = 2000
#: At most one wake-up per partition this often (seconds).
WAKE_EVERY = 0.05
#: The ingest process's ``sys.setswitchinterval`` (seconds; Python's default is 0.005). The
#: writer thread gives up the GIL in every call into the database and, while the event loop
#: runs Python code, waits up to this long to get it back; at 5 ms a commit can cost 10 to 15
#: ms of waiting for the GIL alone when the loop is busy.
SWITCH_INTERVAL = 0.001
#: How many threads commit batches at once, by store. PostgreSQL and Redis take concurrent
#: transactions, so while one batch waits for its commit (a WAL flush, or a slow moment of the
#: server) the requests that came meanwhile are committed by the other thread instead of
#: queueing behind it. SQLite has one write lock: a second writer would only wait for it.
WRITERS = {"sqlite": 1, "postgresql": 2, "redis": 2}
#: How often the SQLite store's WAL is checkpointed by the ingest tier's checkpoint thread
#: (seconds). The writer's connection never checkpoints: SQLite's automatic checkpoint runs
#: inside the commit that takes the WAL past 1,000 pages (about every 0.5 s at 1,000
#: bundles/s), copying the pages and flushing the database file while every request of
#: that batch, and every one queued behind it, waits.
CHECKPOINT_EVERY = 0.25
PAGE = Path(__file__).with_name("page.html")


class Writer:
    """Threads storing queued bundles in batches; ``put`` returns once its batch committed."""

    def __init__(self, store: Store | RedisStore, stored: Callable[[list[Bundle]], None]) -> None:
        self.store = store
        self._stored = stored
        self._queue: list[tuple[Bundle, float, asyncio.Future[None]]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads = [threading.Thread(target=self._run, name=f"pipeline-writer-{i}", daemon=True)
                         for i in range(WRITERS.get(store.dialect, 1))]
        if store.dialect == "sqlite":
            self._threads.append(threading.Thread(target=self._checkpoints, name="pipeline-checkpoint",
                                                  daemon=True))
        #: Batches and bundles stored so far, for the stats.
        self.batches = 0
        self.bundles = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    async def put(self, bundle: Bundle) -> None:
        assert self._loop is not None
        done: asyncio.Future[None] = self._loop.create_future()
        with self._cond:
            self._queue.append((bundle, time.time(), done))
            self._cond.notify()
        await done

    def _run(self) -> None:
        assert self._loop is not None
        conn = None
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    break
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            error: BaseException | None = None
            try:
                if conn is None:
                    conn = self.store.connect(poll_lock=True, checkpoint=False)
                self.store.add(conn, [(bundle, received) for bundle, received, _ in batch])
            except Exception as exc:
                log.exception("storing %d bundles failed; they are answered 503", len(batch))
                error = exc
                with contextlib.suppress(Exception):
                    conn.close()  # type: ignore[union-attr]
                conn = None
            self._loop.call_soon_threadsafe(self._settle, batch, error)
        if conn is not None:
            conn.close()

    def _checkpoints(self) -> None:
        conn = None
        while not self._stop.wait(CHECKPOINT_EVERY):
            try:
                if conn is None:
                    conn = self.store.connect()
                self.store.checkpoint(conn)
            except Exception:
                log.exception("checkpointing the WAL failed; trying again")
                with contextlib.suppress(Exception):
                    conn.close()  # type: ignore[union-attr]
                conn = None
        if conn is not None:
            conn.close()

    def _settle(self, batch: list[tuple[Bundle, float, asyncio.Future[None]]],
                error: BaseException | None) -> None:
        for _, _, done in batch:
            if done.done():
                continue
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)
        if error is None:
            self.batches += 1
            self.bundles += len(batch)
            self._stored([bundle for bundle, _, _ in batch])


class Waker:
    """Tells the aggregator partitions that got bundles to end their idle wait, at most once
    per ``WAKE_EVERY`` each, over one coordinator connection kept open."""

    def __init__(self, url: str, app: str, partitions: int) -> None:
        self.url, self.app, self.partitions = url, app, partitions
        self._dirty: set[int] = set()
        self._event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._coordinator: Coordinator | None = None
        #: Wake-ups sent, and the time spent sending them (seconds).
        self.sent = 0
        self.seconds = 0.0

    def touch(self, bundles: list[Bundle]) -> None:
        for bundle in bundles:
            self._dirty.add(bundle.slot % self.partitions)
        self._event.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pipeline-waker")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._coordinator is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._coordinator.close(), 1.0)

    async def _run(self) -> None:
        while True:
            await self._event.wait()
            self._event.clear()
            parts, self._dirty = sorted(self._dirty), set()
            began = time.perf_counter()
            try:
                if self._coordinator is None:
                    self._coordinator = from_url(self.url)
                    await self._coordinator.open()
                for part in parts:
                    await self._coordinator.publish(Event("wake", f"{self.app}:aggregate#{part}"))
                self.sent += len(parts)
            except Exception as exc:  # the aggregator still finds the work after its idle backoff
                log.warning("could not wake the aggregator (%s); retrying in 1 s", exc)
                self._coordinator = None
                await asyncio.sleep(1.0)
            self.seconds += time.perf_counter() - began
            await asyncio.sleep(WAKE_EVERY)


class Reader:
    """One connection for the read endpoints, used by one thread at a time."""

    def __init__(self, store: Store | RedisStore) -> None:
        self.store = store
        self._conn: Any = None
        self._lock = threading.Lock()

    def __call__(self, job: Callable[[Any], Any]) -> Any:
        with self._lock:
            if self._conn is None:
                self._conn = self.store.connect()
            try:
                return job(self._conn)
            except Exception:
                self._conn.close()
                self._conn = None
                raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class Ingest:
    """The ingest tier's state: the store, its writer, the waker and the counters."""

    def __init__(self, store: Store | RedisStore, coordinator: str | None, app: str = "pipeline",
                 partitions: int = 4) -> None:
        self.store = store
        self.writer = Writer(store, self._stored)
        self.reader = Reader(store)
        self.waker = Waker(coordinator, app, partitions) if coordinator else None
        self.per_second: deque[list[int]] = deque(maxlen=600)  # [second, bundles, samples]
        self.rejected = 0

    def _stored(self, bundles: list[Bundle]) -> None:
        second = int(time.time())
        if not self.per_second or self.per_second[-1][0] != second:
            self.per_second.append([second, 0, 0])
        self.per_second[-1][1] += len(bundles)
        self.per_second[-1][2] += sum(len(b.samples) for b in bundles)
        if self.waker is not None:
            self.waker.touch(bundles)

    @contextlib.asynccontextmanager
    async def lifespan(self, _: Starlette) -> AsyncIterator[None]:
        await run_in_threadpool(self.reader, lambda conn: None)  # the tables exist before the first POST
        self.writer.start()
        if self.waker is not None:
            self.waker.start()
        # The modules and objects made at start-up live as long as the process: moved out of
        # the collector's sight, a full collection no longer pauses the requests for tens of ms.
        gc.freeze()
        try:
            yield
        finally:
            if self.waker is not None:
                await self.waker.stop()
            await run_in_threadpool(self.writer.stop)
            self.reader.close()

    async def post(self, scope: Scope, receive: Receive, send: Send) -> None:
        """POST /v1/metrics as a bare ASGI handler: the hot path skips the router and middleware."""
        status, body = await self._take(scope, receive)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 503:
            headers.append((b"retry-after", b"1"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _take(self, scope: Scope, receive: Receive) -> tuple[int, bytes]:
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > MAX_BODY:
                self.rejected += 1
                return 413, _error("body", f"is {int(value)} bytes; at most {MAX_BODY} are taken")
        raw = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return 400, b""
            raw += message.get("body", b"")
            if len(raw) > MAX_BODY:
                self.rejected += 1
                return 413, _error("body", f"is over {MAX_BODY} bytes")
            if not message.get("more_body"):
                break
        try:
            bundle = parse_bundle(raw, time.time())
        except BadBundle as bad:
            self.rejected += 1
            return bad.status, json.dumps(bad.body()).encode()
        try:
            await self.writer.put(bundle)
        except Exception:
            return 503, _error(None, "the store is unavailable; retry")
        return 202, b'{"samples":%d}' % len(bundle.samples)

    async def totals(self, request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(self.reader, self.store.totals))

    async def windows(self, request: Request) -> Response:
        app = request.path_params["app"]
        try:
            width = int(request.query_params.get("width", WINDOW))
            since = float(request.query_params.get("since", time.time() - 3600))
        except ValueError:
            return JSONResponse({"error": "width and since must be numbers", "field": "query"}, 400)
        if width not in (WINDOW, ROLLUP):
            return JSONResponse({"error": f"must be {WINDOW} or {ROLLUP}", "field": "width"}, 400)
        rows = await run_in_threadpool(self.reader, lambda c: self.store.windows(c, app, width, since))
        return JSONResponse({"app": app, "width": width, "windows": rows})

    def _stats(self, conn: Any) -> dict[str, Any]:
        now = time.time()
        return {
            "totals": self.store.totals(conn),
            "apps": self.store.apps(conn),
            "queue_depth": self.store.depth(conn),
            "lag": self.store.lags(conn, now - 300),
            "windows": self.store.recent(conn, now - 300),
        }

    async def stats(self, request: Request) -> Response:
        body = await run_in_threadpool(self.reader, self._stats)
        now = int(time.time())
        # Whole seconds only: the current one is still filling.
        body["ingest"] = [row for row in self.per_second if now - 300 <= row[0] < now]
        body["rejected"] = self.rejected
        body["now"] = time.time()
        body["store"] = display(self.store.url)
        if self.waker is not None:
            body["wakes"] = {"sent": self.waker.sent,
                             "mean_ms": 1000 * self.waker.seconds / max(self.waker.sent, 1)}
        body["batches"] = {"count": self.writer.batches, "bundles": self.writer.bundles}
        return JSONResponse(body)

    async def page(self, request: Request) -> Response:
        return HTMLResponse(PAGE.read_text())


def _error(field: str | None, message: str) -> bytes:
    return json.dumps({"error": message, "field": field}).encode()


class IngestApp:
    """The ingest tier as an ASGI app: POST /v1/metrics handled bare, the rest by Starlette."""

    def __init__(self, ingest: Ingest, web: Starlette) -> None:
        self.ingest, self.web = ingest, web

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/metrics" and scope["method"] == "POST":
            await self.ingest.post(scope, receive, send)
        else:
            await self.web(scope, receive, send)


def create_app(store: Store | RedisStore, coordinator: str | None, app: str = "pipeline",
               partitions: int = 4) -> IngestApp:
    """The ingest tier as an ASGI app; ``coordinator`` None sends no wake-ups."""
    ingest = Ingest(store, coordinator, app, partitions)
    web = Starlette(
        routes=[
            Route("/", ingest.page),
            Route("/v1/totals", ingest.totals),
            Route("/v1/apps/{app}/windows", ingest.windows),
            Route("/v1/stats", ingest.stats),
        ],
        lifespan=ingest.lifespan,
    )
    return IngestApp(ingest, web)
