"""Loops hosted by job workers (Celery, RQ): a loop is a chain of jobs that hand its lease on.

A *link* is one job of a loop's *chain*. The loop's lease passes from link to
link like a baton: a link that has run its passes hands the lease over
(``Coordinator.hand_over``) to an owner id made for the next link alone, for as
long as the pacing delay plus the keeper's patience; then it enqueues the next
link with that owner id and the fence of that grant (its *parent* fence). So the
loop stays held between links: status shows it held, and a standby runner does
not take it from a live chain.

The next link takes the baton up by handing the lease over from that owner to an
owner id of its own, with the very next fence: a step that succeeds for one copy
of a link only. A duplicate of a link (the same message delivered twice, at once or later), a
link of an older chain (re-forged by the keeper after this one looked broken)
or one whose loop another runner took meanwhile ends without running a pass and
without enqueueing. A second forge of a live chain finds its lease held and does
nothing. Safety rests on the lease alone: two passes never run at once while
both hold valid leases, whatever the queue delivers. The generation a link
reports is the fence its chain was forged at.

A link that lost its lease enqueues nothing: whoever holds the loop now runs it,
and a chain that nobody carries on is re-forged by ``ostinato.chains``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from ostinato.app import App
from ostinato.coordinators.memory import MemoryCoordinator
from ostinato.coordinators.protocol import Coordinator, Denied, LoopRecord, RunnerInfo
from ostinato.errors import ConfigurationError, CoordinatorUnavailable
from ostinato.logs import fields
from ostinato.loop import LocalLease, LoopSpec
from ostinato.operate import run_sync
from ostinato.pacing import Plan, Slot
from ostinato.turn import Turn

log = logging.getLogger("ostinato.jobs")

#: A link that arrives more than this before its start goes back to the queue with the rest
#: of its delay; a shorter wait is spent in the job (RQ gets short delays enqueued at once).
EARLY_WAIT_LIMIT = 5.0
#: How often a waiting link looks whether its worker is shutting down.
STOP_POLL = 0.05



class Tally:
    """What the jobs of one worker did, by outcome, added up across its processes.

    Made in the worker's main process when the app is attached, before Celery forks its
    pool processes or RQ its work horses: they inherit its shared memory, so the keeper's
    process (metrics, logs) sees what every link of the worker did. Where that memory
    cannot be had, or in a process not forked from the one that made it, the counts stay
    in the process that counted them.
    """

    OUTCOMES = ("ran", "early", "stale", "paused", "lost", "unreachable", "skipped")

    def __init__(self, shared: bool = True) -> None:
        self._local: Counter[str] = Counter()
        self._shared: Any = None
        if shared:
            with contextlib.suppress(OSError, ValueError):  # no /dev/shm, no fork
                self._shared = multiprocessing.get_context("fork").Array("q", len(self.OUTCOMES))

    def add(self, outcome: str) -> None:
        if self._shared is None or outcome not in self.OUTCOMES:
            self._local[outcome] += 1
            return
        with self._shared.get_lock():
            self._shared[self.OUTCOMES.index(outcome)] += 1

    def counts(self) -> dict[str, int]:
        """Every outcome's count so far (those never seen as 0)."""
        out = dict.fromkeys(self.OUTCOMES, 0)
        if self._shared is not None:
            with self._shared.get_lock():
                out.update(zip(self.OUTCOMES, self._shared[:], strict=True))
        for outcome, count in self._local.items():
            out[outcome] = out.get(outcome, 0) + count
        return out


#: The jobs of this process that no attached app counts (run without ``attach``).
COUNTS = Tally(shared=False)


@dataclasses.dataclass(frozen=True)
class Link:
    """One job of a loop's chain, as it travels through the queue (``encode``/``decode``)."""

    loop: str
    #: The owner id the lease is held under for this link, and the fence of that grant.
    owner: str
    parent: int
    #: The fence the chain was forged at, for logs.
    generation: int
    #: Wall time before which the first pass must not start.
    not_before: float = 0.0
    #: The pacing carried from link to link: the slot the first pass is due at (wall),
    #: the idle and error streaks, the calendar slot of a ``cron=`` loop.
    slot: float | None = None
    idle_streak: int = 0
    error_streak: int = 0
    due: tuple[float, float, int] | None = None

    def encode(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["due"] = None if self.due is None else list(self.due)
        return out

    @classmethod
    def decode(cls, data: Mapping[str, Any]) -> Link:
        try:
            due = data.get("due")
            return cls(
                loop=str(data["loop"]), owner=str(data["owner"]), parent=int(data["parent"]),
                generation=int(data["generation"]), not_before=float(data.get("not_before", 0.0)),
                slot=None if data.get("slot") is None else float(data["slot"]),
                idle_streak=int(data.get("idle_streak", 0)),
                error_streak=int(data.get("error_streak", 0)),
                due=None if due is None else (float(due[0]), float(due[1]), int(due[2])),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ConfigurationError(f"not an ostinato link: {data!r} ({exc})") from None

    def plan(self) -> Plan:
        """Where the pacing stands when this link starts."""
        return Plan(not_before=self.not_before, idle_until=self.not_before,
                    slot=self.not_before if self.slot is None else self.slot,
                    idle_streak=self.idle_streak, error_streak=self.error_streak,
                    due=None if self.due is None else Slot(*self.due))


#: Puts a link on the queue, to start after the delay (seconds).
Enqueue = Callable[[Link, float], None]


@dataclasses.dataclass(frozen=True)
class JobOptions:
    """How job workers host an app's loops (``attach(..., budget=, patience=)``)."""

    #: How long one link keeps running passes before it hands on to the next link.
    budget: float = 1.0
    #: How late a link may be before the keeper calls its chain broken (``None``: 2 s,
    #: or half the loop's ``stall_after`` when that is shorter).
    patience: float | None = None

    def patience_for(self, spec: LoopSpec) -> float:
        if self.patience is not None:
            return self.patience
        return min(2.0, spec.stall_after / 2) if spec.stall_after else 2.0


def check_hostable(app: App, mode: str) -> None:
    """Refuse, with what to do instead, an app whose loops jobs cannot host."""
    # App keeps what it was given; a URL is connected afresh by each app.connect().
    store = getattr(app, "_coordinator", None)
    if isinstance(store, Coordinator) and not isinstance(store, MemoryCoordinator):
        raise ConfigurationError(
            f"app {app.name!r} was given a {type(store).__name__} object, but every job and every "
            "worker's keeper opens a connection of its own: give the coordinator as a URL "
            f"(App({app.name!r}, coordinator='redis://...')) or through $OSTINATO_COORDINATOR"
        )
    for spec in app.loops.values():
        if spec.isolated:
            raise ConfigurationError(
                f"loop {app.name}:{spec.name} has isolation='process', which job workers do not "
                "host (each job already runs in a worker process): leave isolation= out, or run "
                "it with `ostinato run`"
            )
        if mode == "clock" and spec.pacing.every is None and spec.pacing.cron is None:
            raise ConfigurationError(
                f"loop {app.name}:{spec.name} has no schedule, so mode='clock' has nothing to "
                "enqueue passes on: give it every= or cron=, or use mode='chain'"
            )


async def record_of(store: Coordinator, key: str) -> LoopRecord | None:
    """What the coordinator knows of loop ``key`` (``None``: nothing yet)."""
    for record in await store.loops():
        if record.key == key:
            return record
    return None


def successor(of: RunnerInfo) -> RunnerInfo:
    """A new owner id for the next link, held by this process until that link takes it up."""
    return RunnerInfo(id=uuid.uuid4().hex, host=of.host, pid=of.pid, hosts=of.hosts)


def run_link(
    app: App, data: Mapping[str, Any], enqueue: Enqueue, *, worker: RunnerInfo,
    options: JobOptions, stopping: Callable[[], bool] = lambda: False, tally: Tally = COUNTS,
) -> str:
    """Run one link of a chain (the body of the Celery task or RQ job); return what it did:
    ``ran``, ``early`` (back to the queue), ``stale``, ``paused``, ``lost`` or
    ``unreachable``."""
    link = Link.decode(data)
    spec = app.loops.get(link.loop)
    if spec is None:
        raise ConfigurationError(
            f"app {app.name!r} has no loop named {link.loop!r} (its loops are "
            f"{app.loop_names()}); a link of it was dropped"
        )
    outcome = run_sync(_Chain(app, spec, worker, options, stopping).link(link, enqueue))
    tally.add(outcome)
    return outcome


class _Chain:
    """One link's part in its loop's chain."""

    def __init__(self, app: App, spec: LoopSpec, worker: RunnerInfo, options: JobOptions,
                 stopping: Callable[[], bool]) -> None:
        self.app, self.spec, self.worker, self.options = app, spec, worker, options
        self.key = f"{app.name}:{spec.name}"
        self.stopping = stopping

    def _fields(self, event: str, fence: int | None = None) -> dict[str, object]:
        return fields(event, loop=self.key, fence=fence, runner=self.worker.label)

    async def link(self, link: Link, enqueue: Enqueue) -> str:
        early = link.not_before - time.time()
        if early > EARLY_WAIT_LIMIT or (early > 0 and self.stopping()):
            # Not its time yet: back to the queue, still the chain's one next link.
            enqueue(link, early)
            return "early"
        while early > 0 and not self.stopping():
            await asyncio.sleep(min(early, STOP_POLL))
            early = link.not_before - time.time()
        outcome, nxt = await self._turn(link)
        if nxt is None:
            return outcome
        try:
            enqueue(nxt, max(0.0, nxt.not_before - time.time()))
        except Exception:
            log.exception("%s: could not enqueue the next link; the keeper re-forges the chain once "
                          "its lease runs out", self.key, extra=self._fields("enqueue_failed", nxt.parent))
            return "lost"
        return outcome

    async def _turn(self, link: Link) -> tuple[str, Link | None]:
        """Take the lease up if this link is the chain's next, run its passes, hand the lease
        on; return what happened and the next link to enqueue, if any."""
        store = self.app.connect()
        me = RunnerInfo.here(hosts=self.worker.hosts)
        handed = RunnerInfo(id=link.owner, host=me.host, pid=me.pid, hosts=me.hosts)
        try:
            await store.open()
            refused = await self._refusal(store, handed, link, await record_of(store, self.key))
            if refused is not None:
                return refused, None
            # Taking over what it was handed is the one step only one copy of a link can take.
            sent = time.monotonic()
            answer = await store.hand_over(self.key, handed, link.parent, me, self.spec.lease)
            if answer is None:
                self._ends("stale", link, "the lease it was handed is no longer so: a copy of this "
                           "link took it up, it was paused, or it ran out and another runner took it")
                return "stale", None
            lease = LocalLease(answer.fence, self.spec.lease, max(sent, answer.sent or sent), answer.bound)
            turn = Turn(self.app.name, self.spec, store=store, owner=me, worker=self.worker, lease=lease,
                        budget=self.options.budget, stopping=self.stopping)
            plan = await turn.run(link.plan())
            if plan is None:
                return "lost", None
            return await self._pass_on(store, me, lease, link, plan)
        except CoordinatorUnavailable as exc:
            log.error("%s: a link cannot reach the coordinator (%s): it ends; the keeper re-forges "
                      "the chain once the coordinator is back", self.key, exc,
                      extra=self._fields("coordinator_unreachable"))
            return "unreachable", None
        finally:
            with contextlib.suppress(CoordinatorUnavailable, TimeoutError):
                await asyncio.wait_for(store.close(), 1.0)

    async def _pass_on(
        self, store: Coordinator, me: RunnerInfo, lease: LocalLease, link: Link, plan: Plan
    ) -> tuple[str, Link | None]:
        delay = max(0.0, plan.start_at() - time.time())
        heir = successor(me)
        grant = await store.hand_over(self.key, me, lease.fence, heir,
                                      delay + self.options.patience_for(self.spec))
        if grant is None:
            log.warning("%s: the lease could not be handed to the next link (it ran out, was "
                        "paused, or another runner took it): the chain ends here", self.key,
                        extra=self._fields("link_lost", lease.fence))
            return "lost", None
        due = plan.due
        return "ran", Link(
            self.spec.name, owner=heir.id, parent=grant.fence, generation=link.generation,
            not_before=plan.start_at(), slot=plan.slot, idle_streak=plan.idle_streak,
            error_streak=plan.error_streak, due=None if due is None else (due.at, due.start, due.missed),
        )

    async def _refusal(
        self, store: Coordinator, me: RunnerInfo, link: Link, record: LoopRecord | None
    ) -> str | None:
        """Why this link must not even ask for the lease, if it must not."""
        if record is None:
            return None  # nothing to compare with (forgotten): the grant's fence decides
        if record.fence != link.parent:
            self._ends("stale", link, f"fence {record.fence} granted since its parent's {link.parent}")
            return "stale"
        if record.paused:
            await store.release(self.key, me, link.parent)  # the lease it was handed, if still so
            log.info("%s: paused: the chain ends here; the keeper starts it again on resume",
                     self.key, extra=self._fields("link_paused", link.parent))
            return "paused"
        return None

    def _ends(self, outcome: str, link: Link, why: str) -> None:
        log.info("%s: a link of generation %d ends without running (%s): %s", self.key,
                 link.generation, outcome, why, extra=self._fields(f"link_{outcome}"))


def run_clock_pass(
    app: App, name: str, slot: float, *, worker: RunnerInfo, options: JobOptions,
    due: tuple[float, float, int] | None = None, tally: Tally = COUNTS,
) -> str:
    """Run one pass of loop ``name`` that the clock enqueued for ``slot`` (wall), at that time;
    return ``ran``, or ``skipped`` when its previous pass still holds the lease or still ran at
    ``slot`` (it would start behind it), when it comes later than the keeper's patience, or
    when a pass of that slot already ran (a keeper that took over enqueued it again)."""
    spec = app.loops.get(name)
    if spec is None:
        raise ConfigurationError(f"app {app.name!r} has no loop named {name!r}")
    outcome = run_sync(_clock_pass(app, spec, slot, due, worker, options.patience_for(spec)))
    tally.add(outcome)
    return outcome


async def _clock_pass(
    app: App, spec: LoopSpec, slot: float, due: tuple[float, float, int] | None, worker: RunnerInfo,
    late_after: float,
) -> str:
    key = f"{app.name}:{spec.name}"
    at = datetime.fromtimestamp(slot).isoformat(timespec="milliseconds")

    def skipped(why: str) -> str:
        log.warning("%s: the pass due at %s is skipped: %s", key, at, why,
                    extra=fields("pass_skipped", loop=key, runner=worker.label))
        return "skipped"

    await asyncio.sleep(min(max(0.0, slot - time.time()), EARLY_WAIT_LIMIT))
    if (late := time.time() - slot) > late_after:
        return skipped(f"it comes {late:.1f}s late (the queue was busy)")
    store = app.connect()
    try:
        await store.open()
        owner = RunnerInfo.here(hosts=worker.hosts)
        sent = time.monotonic()
        answer = await store.acquire(key, owner, spec.lease)
        if isinstance(answer, Denied):
            return skipped("the loop is paused" if answer.paused else
                           f"its previous pass still runs ({answer.holder or 'holder unknown'})")
        record = await record_of(store, key)
        last_end = None if record is None else record.last_end
        if (answer.last_start is not None and answer.last_start >= slot) or (
            last_end is not None and last_end > slot
        ):
            await store.release(key, owner, answer.fence)
            return skipped("a pass of that slot already ran" if last_end is None or last_end <= slot
                           else "its previous pass still ran at its time (it would queue behind it)")
        lease = LocalLease(answer.fence, spec.lease, max(sent, answer.sent or sent), answer.bound)
        turn = Turn(app.name, spec, store=store, owner=owner, worker=worker, lease=lease, budget=0.0,
                    stopping=lambda: False)
        start = Link(spec.name, owner.id, lease.fence - 1, lease.fence, not_before=slot, slot=slot,
                     due=due).plan()
        await turn.run(start)
        await store.release(key, owner, lease.fence)
        return "ran"
    except CoordinatorUnavailable as exc:
        log.error("%s: a pass cannot reach the coordinator (%s): skipped", key, exc,
                  extra=fields("coordinator_unreachable", loop=key, runner=worker.label))
        return "unreachable"
    finally:
        with contextlib.suppress(CoordinatorUnavailable, TimeoutError):
            await asyncio.wait_for(store.close(), 1.0)
