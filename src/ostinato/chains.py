"""The keeper: inside job workers, one elected watcher per app that keeps its loops going.

Every worker that hosts an app's loops (``ostinato.celery``, ``ostinato.rq``) runs
a keeper in a thread of its own; the one holding the keeper's lease (the key
``APP.keeper:SYSTEM``, so ``ostinato status`` shows which worker keeps) acts, and
the others stand by and take over within that lease's TTL. The keeper also sends
the worker's heartbeat, so the worker shows as a runner.

In chain mode the keeper forges a chain where none runs: at the workers' start
(nothing is seeded by hand) and whenever a chain looks broken (``overdue``): a
lost link, a purged queue, a worker killed between a pass and its enqueue. To
forge, it takes the loop's lease and gives it straight back: the fence that
grant moved is the new generation, so every link of an older chain is stale
from then on (see ``ostinato.links``). It then enqueues the first link.

In clock mode it enqueues one pass per slot of the loop's ``every=`` or
``cron=`` schedule, delayed to the slot; a pass whose previous one still ran at
its slot (so it would start behind it), or that comes later than the keeper's
patience, is skipped (logged and counted by the job), never queued behind it. A
keeper that takes over plans the slots from the loop's last recorded start, and
a pass whose slot already ran is skipped too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from ostinato.app import App
from ostinato.coordinators.protocol import Coordinator, Denied, Event, LoopRecord, Renewal, RunnerInfo
from ostinato.errors import CoordinatorUnavailable
from ostinato.forge import EARLY_WATCH, forge, keeper_key, overdue, watches_early, woken_start
from ostinato.links import Enqueue, JobOptions, Link, Tally
from ostinato.logs import fields
from ostinato.loop import LoopSpec
from ostinato.pacing import Outcome, Slot, plan_next
from ostinato.runner import RUNNER_TTL

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = logging.getLogger("ostinato.jobs")

#: The keeper's lease: a dead keeper's place is taken within it (at once on its host).
KEEPER_LEASE = 5.0
#: How often the elected keeper looks at its loops.
TICK = 0.25
#: How often every keeper sends its worker's heartbeat.
HEARTBEAT_EVERY = 1.0
#: A re-forged chain that still shows no link is given this many times more patience
#: each time, up to ``2 ** BACKOFF_LIMIT``: a queue that loses every link is not flooded.
BACKOFF_LIMIT = 5
#: Coordinators that hand over an unreleased claim only to an asker that has seen it
#: unchanged for its whole TTL: there the keeper starts looking when the claim is made.
SIGHTING_SCHEMES = ("redis", "rediss")

#: Enqueues one clock pass of a loop: (name, slot as wall time, delay, cron slot or None).
EnqueuePass = Callable[[str, float, float, "tuple[float, float, int] | None"], None]


@dataclasses.dataclass
class _Watch:
    """What the keeper remembers of one loop."""

    #: The fence of the keeper's last forge, and how many forges in a row showed no link since.
    forged: int | None = None
    #: The fence of the last lease handed on that the keeper asked for early (``watches_early``).
    watched: int | None = None
    attempts: int = 0
    #: Not looked at again before this wall time.
    quiet_until: float = 0.0
    #: Clock mode: the next slot to enqueue (wall), with its calendar slot.
    next_slot: float | None = None
    due: Slot | None = None


class Keeper:
    """One worker's keeper of ``app``'s loops; acts while it holds the keeper's lease."""

    def __init__(
        self, app: App, system: str, *, worker: RunnerInfo, options: JobOptions, mode: str = "chain",
        enqueue_link: Enqueue | None = None, enqueue_pass: EnqueuePass | None = None,
        on_tick: Callable[[], object] | None = None, counts: Counter[str] | None = None,
    ) -> None:
        self.app, self.system, self.worker, self.options, self.mode = app, system, worker, options, mode
        self.enqueue_link, self.enqueue_pass = enqueue_link, enqueue_pass
        #: Called (in a thread) on every turn of the elected keeper, before it looks at the
        #: loops: a job system without delays of its own moves the links that are due here.
        self.on_tick = on_tick
        self.key = keeper_key(app.name, system)
        self.watch = {name: _Watch() for name in app.loops}
        self.elected = False
        #: Chains forged (``forged``, ``reforged``, ``woken``) since start.
        self.counts: Counter[str] = Counter() if counts is None else counts
        #: Loops woken (``app.wake``, ``ostinato wake``) since the keeper last looked.
        self.woken: set[str] = set()
        self._fence = 0
        self._renew_at = 0.0
        self._deadline = 0.0
        self._outage = False
        self._tick_failing = False
        self._sightings = app.coordinator_url().partition(":")[0] in SIGHTING_SCHEMES
        self._keys = {f"{app.name}:{name}" for name in app.loops}

    def _fields(self, event: str, loop: str | None = None, fence: int | None = None) -> dict[str, object]:
        return fields(event, loop=loop, fence=fence, runner=self.worker.label)

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the loops until ``stop`` is set, then give the keeper's lease back."""
        store = self.app.connect()
        # Wake-ups come on a connection of their own over a network: one that listens to
        # events may take a refusal by a live holder on this host (a link) for a death to wait
        # for. SQLite sends events to the runner whose heartbeat the keeper's store sends.
        listener: Coordinator | None = None
        own_listener = self.app.coordinator_url().partition(":")[0] not in ("sqlite", "memory")
        beat = 0.0
        opened = False
        try:
            while not stop.is_set():
                try:
                    if not opened:
                        await store.open()
                        opened = True
                    if listener is None and self.mode == "chain":
                        if own_listener:
                            listener = await self._listen()
                        else:
                            await store.subscribe(self.worker, self._heard)
                            listener = store
                    now = time.monotonic()
                    if now >= beat:
                        await store.report(self.worker, RUNNER_TTL, [])
                        beat = now + HEARTBEAT_EVERY
                    if await self._elect(store):
                        await self._tick_hook()
                        await self._look(store)
                    else:
                        self.woken.clear()  # the elected keeper heard them too
                    if self._outage:
                        log.warning("keeper of %s: coordinator reachable again", self.app.name,
                                    extra=self._fields("coordinator_reachable"))
                        self._outage = False
                except CoordinatorUnavailable as exc:
                    if not self._outage:
                        log.error("keeper of %s: cannot reach the coordinator, retrying: %s",
                                  self.app.name, exc, extra=self._fields("coordinator_unreachable"))
                    self._outage = True
                    self.elected = self.elected and time.monotonic() < self._deadline
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), TICK)
        finally:
            await self._resign(store)
            if listener is not None and listener is not store:
                with contextlib.suppress(CoordinatorUnavailable, TimeoutError):
                    await asyncio.wait_for(listener.close(), 1.0)

    async def _listen(self) -> Coordinator:
        """A connection that hears wake-ups (``app.wake``, ``ostinato wake``)."""
        listener = self.app.connect()
        try:
            await listener.open()
            await listener.subscribe(self.worker, self._heard)
        except BaseException:
            with contextlib.suppress(CoordinatorUnavailable, TimeoutError):
                await asyncio.wait_for(listener.close(), 1.0)
            raise
        return listener

    def _heard(self, event: Event) -> None:
        if event.kind == "wake" and event.key in self._keys:
            self.woken.add(event.key)

    async def _tick_hook(self) -> None:
        if self.on_tick is None:
            return
        try:
            await asyncio.to_thread(self.on_tick)
        except Exception:
            if not self._tick_failing:
                log.exception("keeper of %s: moving due links to the queue failed; retrying",
                              self.app.name, extra=self._fields("keeper_tick_failed"))
            self._tick_failing = True
        else:
            self._tick_failing = False

    async def _elect(self, store: Coordinator) -> bool:
        """Take or keep the keeper's lease; whether this keeper acts now."""
        now = time.monotonic()
        if self.elected and now >= self._renew_at:
            answers = await store.renew(self.worker, {self.key: (self._fence, KEEPER_LEASE)})
            if answers.get(self.key) is Renewal.HELD:
                self._renew_at, self._deadline = now + KEEPER_LEASE / 3, now + KEEPER_LEASE * 0.9
            else:
                self.elected = False
                log.warning("keeper of %s: lost the keeper's lease", self.app.name,
                            extra=self._fields("keeper_lost", self.key))
        if not self.elected:
            answer = await store.acquire(self.key, self.worker, KEEPER_LEASE)
            if isinstance(answer, Denied):
                return False
            self.elected, self._fence = True, answer.fence
            self._renew_at, self._deadline = now + KEEPER_LEASE / 3, now + KEEPER_LEASE * 0.9
            for watch in self.watch.values():
                watch.next_slot = None  # a keeper taking over plans the clock from the records
            log.info("keeper of %s elected (fence %d): it keeps %s", self.app.name, answer.fence,
                     self.app.loop_names(), extra=self._fields("keeper_elected", self.key, answer.fence))
        return time.monotonic() < self._deadline

    async def _resign(self, store: Coordinator) -> None:
        with contextlib.suppress(CoordinatorUnavailable, TimeoutError):
            if self.elected:
                await asyncio.wait_for(store.release(self.key, self.worker, self._fence), 1.0)
                log.info("keeper of %s: gave the keeper's lease back", self.app.name,
                         extra=self._fields("keeper_released", self.key))
        self.elected = False
        with contextlib.suppress(CoordinatorUnavailable, TimeoutError):
            await asyncio.wait_for(store.close(), 1.0)

    async def _look(self, store: Coordinator) -> None:
        records = {record.key: record for record in await store.loops()}
        now = time.time()
        woken, self.woken = self.woken, set()
        for name, spec in self.app.loops.items():
            key = f"{self.app.name}:{name}"
            if self.mode == "clock":
                await self._tick(spec, key, records.get(key), now)
            elif key in woken and await self._wake_chain(store, spec, key, records.get(key), now):
                continue
            else:
                await self._keep_chain(store, spec, key, records.get(key), now)

    async def _wake_chain(
        self, store: Coordinator, spec: LoopSpec, key: str, record: LoopRecord | None, now: float
    ) -> bool:
        """End the idle wait of a chain woken while its next link waits in the queue: revoke the
        lease held for that link (which makes it stale) and forge a link due at the loop's pacing.
        Whether it did. A link that is running, or about due, waits at most for its budget; an
        error backoff is not ended (as in a runner)."""
        if record is None or record.last_outcome == "failed" or not watches_early(record, now):
            return False
        start, due = woken_start(spec, record, now, key)
        assert record.next_start is not None  # watches_early
        if start >= record.next_start - EARLY_WATCH:
            return False  # it waits for its pacing, not for an idle backoff
        await store.revoke(key)
        assert self.enqueue_link is not None
        try:
            link = await forge(store, self.worker, self.app, spec, self.enqueue_link,
                               self.options.patience_for(spec), start=(start, due))
        except CoordinatorUnavailable:
            raise
        except Exception:  # the broker: the chain is re-forged once the lease held for it runs out
            log.exception("%s: woken, but the link could not be enqueued", key,
                          extra=self._fields("enqueue_failed", key))
            return True
        if link is None:
            return False  # a runner took the loop in between: it runs it now
        self.counts["woken"] += 1
        log.info("%s: woken: the link due at %s is dropped for generation %d, due at %s", key,
                 _clock(record.next_start), link.generation, _clock(link.not_before),
                 extra=self._fields("chain_woken", key, link.generation))
        return True

    # -- chain mode ------------------------------------------------------------------

    async def _keep_chain(
        self, store: Coordinator, spec: LoopSpec, key: str, record: LoopRecord | None, now: float
    ) -> None:
        watch = self.watch[spec.name]
        if watch.forged is not None and record is not None and record.fence > watch.forged:
            watch.forged, watch.attempts, watch.quiet_until = None, 0, 0.0  # a link ran since
        patience = self.options.patience_for(spec)
        if now < watch.quiet_until:
            return
        if not overdue(record, now, patience=patience, budget=self.options.budget):
            if not (self._sightings and record is not None and watch.watched != record.fence
                    and watches_early(record, now)):
                return
            watch.watched = record.fence  # asked once: a refusal (the rule) starts the sighting
        assert self.enqueue_link is not None
        try:
            link = await forge(store, self.worker, self.app, spec, self.enqueue_link, patience)
        except CoordinatorUnavailable:
            raise
        except Exception:  # the broker, most likely: the keeper goes on, and tries again
            watch.quiet_until = now + patience
            log.exception("%s: could not enqueue the first link of a new chain; trying again once "
                          "the lease held for it runs out", key, extra=self._fields("enqueue_failed", key))
            return
        if link is None:
            return
        first = record is None or (record.last_end is None and record.last_start is None)
        kind = "forged" if first else "reforged"
        self.counts[kind] += 1
        watch.forged, watch.attempts = link.parent, watch.attempts + 1
        watch.quiet_until = link.not_before + patience * 2 ** min(watch.attempts - 1, BACKOFF_LIMIT)
        if first:
            log.info("%s: chain started (generation %d)", key, link.generation,
                     extra=self._fields("chain_forged", key, link.generation))
        else:
            last = max(t for t in (record.last_end, record.last_start, record.next_start, 0.0)
                       if t is not None) if record is not None else 0.0
            log.warning("%s: chain re-forged (generation %d): no link since %s (%.1fs ago); "
                        "%d re-forged by this keeper", key, link.generation, _clock(last), now - last,
                        self.counts["reforged"],
                        extra=self._fields("chain_reforged", key, link.generation))

    # -- clock mode ------------------------------------------------------------------

    async def _tick(self, spec: LoopSpec, key: str, record: LoopRecord | None, now: float) -> None:
        """Enqueue the pass of the loop's next slot a turn ahead, delayed to the slot: the job
        itself skips it if the previous pass still holds the lease (see ``run_clock_pass``)."""
        watch = self.watch[spec.name]
        if record is not None and record.paused:
            watch.next_slot = None  # planned again from the records once resumed
            return
        if watch.next_slot is None:
            last = None if record is None else record.last_start
            watch.next_slot, watch.due = spec.pacing.first(now=now, wall_now=now, last_start_wall=last,
                                                           seed=key)
        if now < watch.next_slot - TICK:
            return
        slot, due = watch.next_slot, watch.due
        at = max(now, slot)
        plan = plan_next(spec.pacing, slot=slot, end=at, wall_end=at, outcome=Outcome.WORKED,
                         idle_streak=0, error_streak=0, due=due, seed=key)
        watch.next_slot, watch.due = plan.start_at(), plan.due
        assert self.enqueue_pass is not None
        try:
            self.enqueue_pass(spec.name, slot, max(0.0, slot - now),
                              None if due is None else (due.at, due.start, due.missed))
        except Exception:  # the broker, most likely: this slot is missed, the clock goes on
            log.exception("%s: could not enqueue the pass due at %s; it is skipped", key, _clock(slot),
                          extra=self._fields("enqueue_failed", key))


def _clock(wall: float) -> str:
    return datetime.fromtimestamp(wall).isoformat(timespec="milliseconds") if wall else "ever"


class KeeperThread:
    """Runs a ``Keeper`` on an event loop of its own, in a daemon thread of the worker's main
    process, from the worker's start to its shutdown; with ``metrics_port``, also serves what
    the keeper and the worker's links (``tally``) did on ``/metrics`` there."""

    def __init__(
        self, keeper: Keeper, *, tally: Tally | None = None, metrics_port: int | None = None
    ) -> None:
        self.keeper, self.tally, self.metrics_port = keeper, tally, metrics_port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()

    def start(self) -> None:
        if self._thread is not None:
            return
        if self.metrics_port is not None:
            from ostinato.metrics import JobsCollector, serve_jobs

            tally = self.tally or Tally(shared=False)
            collector = JobsCollector(self.keeper.app.name, tally.counts, lambda: self.keeper.counts)
            self._server = serve_jobs(collector, "0.0.0.0", self.metrics_port)  # noqa: S104 - a scrape target
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True,
                                        name=f"ostinato-keeper:{self.keeper.app.name}")
        self._thread.start()
        self._ready.wait(5.0)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        while not self._stop.is_set():
            try:
                await self.keeper.run(self._stop)
            except Exception:
                log.exception("keeper of %s failed; starting it again", self.keeper.app.name,
                              extra=self.keeper._fields("keeper_failed"))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1.0)

    def stop(self, timeout: float = 3.0) -> None:
        """Stop the keeper and give its lease back (within ``timeout``)."""
        if self._thread is None or self._loop is None or self._stop is None:
            return
        with contextlib.suppress(RuntimeError):  # its loop already closed
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        self._thread = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


async def seed(
    app: App, name: str, enqueue: Enqueue, owner: RunnerInfo, *, options: JobOptions, wait: float
) -> Link | None:
    """Forge a chain of loop ``name`` by hand if none holds the loop, waiting up to ``wait``
    seconds for its lease; ``None`` if it stayed held (a live chain holds it all along)."""
    spec = app.loops[name]
    store = app.connect()
    try:
        await store.open()
        until = time.monotonic() + wait
        while True:
            link = await forge(store, owner, app, spec, enqueue, options.patience_for(spec))
            if link is not None or time.monotonic() >= until:
                return link
            await asyncio.sleep(0.02)
    finally:
        with contextlib.suppress(CoordinatorUnavailable, TimeoutError):
            await asyncio.wait_for(store.close(), 1.0)
