"""Loops made of members: ``partitions=N`` (``loop#0`` .. ``loop#N-1``) and ``keys=`` (``loop[key]``).

Every member is a loop of its own, with its own lease and fence; what the members
of one loop must agree on lives in the coordinator as a ``Setting``:

* **The partition count in force** (``partitions:app:loop``). A runner runs its
  partitions only while the count in force is the one it declares, checked after
  each grant with a read that starts after the grant arrived. The count changes
  only while the runner changing it holds the lease of every partition of both
  the old and the new count, so no runner can be running a partition of the old
  count then: two passes never work on overlapping partition sets. The count of
  the most recently started runner wins: it asks for it (``partitions-wanted:``),
  the holders under the old count finish their passes and let go, and it makes
  the change. Runners still declaring the old count then run none of its
  partitions until they are restarted with the new one.
* **The key list** (``keys:app:loop``), written by whichever runner holds the
  loop's own lease (``app:loop``): re-reading the key source is itself a loop,
  so one runner at a time does it, every ``refresh``, and a source that raises
  keeps the last good list and shows as a failing loop. Every runner reads the
  list when it changes (a ``changed`` event) and at least every ``refresh``, and
  starts or retires its members to match.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import random
import time
from collections.abc import Iterable
from typing import Any

from ostinato.coordinators.protocol import Coordinator, Event, Grant
from ostinato.errors import CoordinatorUnavailable
from ostinato.host import Host, Member
from ostinato.logs import fields
from ostinato.loop import IDLE, LoopSpec, Pass, check_key
from ostinato.pacing import Pacing

log = logging.getLogger("ostinato.runner")

#: How often a runner reads the partition count in force (a ``changed`` event is sooner).
GUARD_EVERY = 1.0
#: How often a runner changing the partition count tries to take every partition's lease.
CHANGE_RETRY = 0.25


def partitions_setting(family: str) -> str:
    return f"partitions:{family}"


def wanted_setting(family: str) -> str:
    return f"partitions-wanted:{family}"


def keys_setting(family: str) -> str:
    return f"keys:{family}"


def read_keys(text: str | None) -> list[str]:
    """The keys in a stored key list (``[]`` for none)."""
    if not text:
        return []
    return list(json.loads(text)["keys"])


async def refreshed_keys(store: Coordinator, family: str, within: float) -> list[str]:
    """Wake the loop that refreshes ``family``'s keys and return the list it stores next."""
    asked = time.time()
    deadline = time.monotonic() + within
    await store.publish(Event("wake", family))
    while True:
        setting = await store.read_setting(keys_setting(family))
        if setting is not None and json.loads(setting.value).get("at", 0) >= asked:
            return read_keys(setting.value)
        if time.monotonic() > deadline:
            raise CoordinatorUnavailable(
                f"no runner refreshed the keys of {family} within {within:g}s; is a runner of "
                "its app running? (ostinato status shows the loop's holder)"
            )
        await asyncio.sleep(0.1)


def clean_keys(found: object) -> list[str]:
    """What a key source returned, checked, without repeats, sorted; ``ValueError`` naming
    the first bad key."""
    if isinstance(found, str | bytes) or not isinstance(found, Iterable):
        raise ValueError(f"a key source must return an iterable of strings, not {type(found).__name__}")
    return sorted({check_key(key) for key in found})


@dataclasses.dataclass(frozen=True)
class Count:
    """A partition count as stored: the count, and the runner that asked for it."""

    partitions: int
    started: float
    runner: str
    label: str

    @classmethod
    def parse(cls, text: str | None) -> Count | None:
        if not text:
            return None
        data = json.loads(text)
        return cls(int(data["partitions"]), float(data["started"]), str(data["runner"]),
                   str(data.get("label", "?")))

    def text(self) -> str:
        return json.dumps(dataclasses.asdict(self))


def may_run(count: int, force: Count | None, wanted: Count | None, alive: set[str]) -> bool:
    """Whether a runner declaring ``count`` partitions may run them: the count in force is
    its own, and no live runner started later asks for another."""
    if force is None or force.partitions != count:
        return False
    return not (
        wanted is not None and wanted.partitions != count and wanted.started > force.started
        and wanted.runner in alive
    )


def should_ask(me: Count, force: Count | None, wanted: Count | None, alive: set[str]) -> bool:
    """Whether runner ``me`` should ask for its count: the count of the runner started last
    wins, so ``me`` asks unless its count is in force and unchallenged, or a live runner
    asks for the same count already, or one started later asks for another."""
    if wanted is None or wanted.runner not in alive or wanted.runner == me.runner:
        # Nobody else asks: ask unless the count in force is this runner's already.
        return force is None or force.partitions != me.partitions
    # Another live runner asks: overrule it only with another count, and only if started later
    # (whether or not this runner's count is in force).
    return wanted.partitions != me.partitions and wanted.started < me.started


class PartitionGuard:
    """One runner's view of a partitioned loop's count in force; its partitions' keepers
    ask it before they take a lease and after they got one (``confirm``)."""

    def __init__(self, runner: Host, spec: LoopSpec) -> None:
        assert spec.partitions is not None
        self.runner = runner
        self.spec = spec
        self.family = f"{runner.app_name}:{spec.name}"
        self.me = Count(spec.partitions, runner.started_wall, runner.info.id, runner.info.label)
        self.keepers: list[Member] = []
        self.force: Count | None = None
        self.wanted: Count | None = None
        #: Whether this runner's partitions may run, as of the last read.
        self.open = False
        self._opened = asyncio.Event()
        self._changed = asyncio.Event()
        self._read_sent = float("-inf")
        self._reading: asyncio.Task[None] | None = None
        self._reading_sent = float("-inf")
        self._told: tuple[object, ...] | None = None

    def on_changed(self) -> None:
        self._changed.set()

    async def wait_open(self) -> None:
        """Until the partitions may run (or the runner stops)."""
        stopped = asyncio.ensure_future(self.runner.stopped.wait())
        opened = asyncio.ensure_future(self._opened.wait())
        try:
            await asyncio.wait({stopped, opened}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            opened.cancel()

    async def confirm(self, granted: float) -> bool:
        """Whether the partitions may run, by a read sent after ``granted`` (monotonic):
        a change of count made before the grant arrived is seen."""
        while self._read_sent < granted:
            if self._reading is None or self._reading_sent < granted:
                self._reading_sent = time.monotonic()
                self._reading = asyncio.ensure_future(self._read(self._reading_sent))
            await asyncio.shield(self._reading)
        return self.open

    async def _read(self, sent: float) -> None:
        store = self.runner.coordinator
        force, wanted = await asyncio.gather(
            store.read_setting(partitions_setting(self.family)),
            store.read_setting(wanted_setting(self.family)),
        )
        self.force = Count.parse(force.value if force else None)
        self.wanted = Count.parse(wanted.value if wanted else None)
        self._read_sent = max(self._read_sent, sent)
        self._set_open(may_run(self.me.partitions, self.force, self.wanted, self._alive()))

    def _alive(self) -> set[str]:
        return {*self.runner.live_ids, self.runner.info.id}

    def _set_open(self, open_: bool) -> None:
        if open_ == self.open:
            return
        self.open = open_
        self.runner.hosts_changed()
        if open_:
            self._opened.set()
            log.info("%s: %d partitions in force; running them", self.family, self.me.partitions,
                     extra=fields("partitions_agreed", loop=self.family, runner=self.me.label))
            for keeper in self.keepers:
                keeper.chance()
        else:
            self._opened.clear()
            for keeper in self.keepers:
                keeper.nudge()  # a holder finishes its pass and lets go

    async def watch(self) -> None:
        """Read the count in force every ``GUARD_EVERY`` (sooner on a ``changed`` event) and
        change it when this runner should."""
        while not self.runner.stopping:
            self._changed.clear()
            sent = time.monotonic()
            try:
                await self._read(sent)
                if not self.open:
                    await self._settle()
            except CoordinatorUnavailable as exc:
                log.warning("%s: cannot read the partition count: %s", self.family, exc,
                            extra=fields("coordinator_unreachable", loop=self.family,
                                         runner=self.me.label))
            wait = CHANGE_RETRY if self._changing() else GUARD_EVERY
            await self.runner.wait(wait, self._changed)

    def _changing(self) -> bool:
        return not self.open and self.wanted is not None and self.wanted.runner == self.me.runner

    async def _settle(self) -> None:
        """Ask for this runner's count, or make the change once asked, or say why not."""
        store, alive = self.runner.coordinator, self._alive()
        if should_ask(self.me, self.force, self.wanted, alive):
            if self.wanted != self.me:
                await store.write_setting(wanted_setting(self.family), self.me.text(), 0)
                await store.publish(Event("changed", self.family))
                self.wanted = self.me
            if self.force is None or self.force.partitions != self.me.partitions:
                await self._change()
            return
        self._tell_waiting()

    def _tell_waiting(self) -> None:
        force, wanted = self.force, self.wanted
        told = (force, wanted)
        if told == self._told:
            return
        self._told = told
        other = wanted if wanted is not None and wanted.partitions != self.me.partitions else force
        if other is not None and other.partitions != self.me.partitions:
            log.warning(
                "%s: runner %s, started later, declares %d partitions; this runner declares %d and "
                "runs none of them until it is restarted with the new count",
                self.family, other.label, other.partitions, self.me.partitions,
                extra=fields("partitions_outvoted", loop=self.family, runner=self.me.label),
            )

    async def _change(self) -> None:
        """Take the lease of every partition of the old and the new count, write the new count
        under them, and let them go: no partition of the old count can be running then."""
        if any(keeper.lease is not None for keeper in self.keepers):
            return  # this runner's own passes under the old count are still finishing
        old = self.force.partitions if self.force is not None else 0
        keys = [f"{self.family}#{i}" for i in range(max(old, self.me.partitions))]
        store, info, ttl = self.runner.coordinator, self.runner.info, self.spec.lease
        sent = time.monotonic()
        answers = await store.acquire_many(info, dict.fromkeys(keys, ttl))
        granted = {key: answer for key, answer in answers.items() if isinstance(answer, Grant)}
        changed = False
        try:
            if len(granted) == len(keys) and time.monotonic() - sent < ttl / 2:
                changed = await store.write_setting(
                    partitions_setting(self.family), self.me.text(), granted[keys[0]].fence
                )
        finally:
            await asyncio.gather(
                *(store.release(key, info, grant.fence) for key, grant in granted.items()),
                return_exceptions=True,
            )
        if not changed:
            if self._told != ("changing", old):
                self._told = ("changing", old)
                log.info("%s: changing from %d to %d partitions: waiting for the holders of the old "
                         "ones to finish their passes", self.family, old, self.me.partitions,
                         extra=fields("partitions_changing", loop=self.family, runner=self.me.label))
            return
        if old:
            log.warning("%s: partitions changed from %d to %d", self.family, old, self.me.partitions,
                        extra=fields("partitions_changed", loop=self.family, runner=self.me.label))
        else:
            log.info("%s: %d partitions", self.family, self.me.partitions,
                     extra=fields("partitions_changed", loop=self.family, runner=self.me.label))
        for i in range(self.me.partitions, old):
            await store.forget(f"{self.family}#{i}")
        await store.publish(Event("changed", self.family))
        for key in keys:
            await store.publish(Event("released", key))
        self._changed.set()


class KeySet:
    """One runner's members of a ``keys=`` loop, kept to the key list in the coordinator."""

    def __init__(self, runner: Host, spec: LoopSpec) -> None:
        self.runner = runner
        self.spec = spec
        self.family = f"{runner.app_name}:{spec.name}"
        self.members: dict[str, Member] = {}
        self._changed = asyncio.Event()
        #: Keys gone from the list whose status rows are still to be dropped (refresher only).
        self._gone: set[str] = set()

    def on_changed(self) -> None:
        self._changed.set()

    async def watch(self) -> None:
        """Read the key list when it changes, and at least every ``refresh``."""
        while not self.runner.stopping:
            self._changed.clear()
            try:
                setting = await self.runner.coordinator.read_setting(keys_setting(self.family))
            except CoordinatorUnavailable as exc:
                log.warning("%s: cannot read the key list: %s", self.family, exc,
                            extra=fields("coordinator_unreachable", loop=self.family,
                                         runner=self.runner.info.label))
            else:
                if setting is not None:
                    self.apply(read_keys(setting.value))
            await self.runner.wait(self.spec.refresh, self._changed)

    def apply(self, keys: list[str]) -> None:
        """Start a member for each new key; retire those of keys no longer listed (each
        finishes its pass and lets its lease go)."""
        wanted = set(keys)
        fresh = [key for key in dict.fromkeys(keys) if key not in self.members]
        # Started, and so asked for, in an order of this runner's own: runners starting
        # together then each find a spread of free leases, instead of all but the first
        # finding taken the leases it has just asked for, in the same order.
        random.shuffle(fresh)
        for key in fresh:
            self.members[key] = self.runner.new_member(self.spec, key)
        for key in [key for key in self.members if key not in wanted]:
            self.members.pop(key).retire()

    def refresher(self) -> LoopSpec:
        """The loop that re-reads the key source: the family's own lease, one runner at a time."""
        spec = self.spec
        every = spec.refresh
        return LoopSpec(
            name=spec.name, body=self._refresh, is_async=True,
            pacing=Pacing(idle=(every, every), error_backoff=(min(1.0, every), max(every, 1.0))),
            lease=spec.lease, timeout=None, stall_after=None, fail_after=spec.fail_after,
        )

    async def _refresh(self, ctx: Pass) -> Any:
        source = self.spec.keys
        assert source is not None
        if inspect.iscoroutinefunction(source):
            keys = clean_keys(list(await source()))
        else:
            keys = await asyncio.to_thread(lambda: clean_keys(_materialize(source())))
        store = self.runner.coordinator
        name = keys_setting(self.family)
        old = await store.read_setting(name)
        before = read_keys(old.value if old else None)
        text = json.dumps({"keys": keys, "at": time.time(), "by": self.runner.info.label})
        if not await store.write_setting(name, text, ctx.fence):
            raise RuntimeError("a newer holder of this loop refreshed the keys; this one is stale")
        if keys != before:
            await store.publish(Event("changed", self.family))
            log.info("%s: %d keys (%d new, %d gone)", self.family, len(keys),
                     len(set(keys) - set(before)), len(set(before) - set(keys)),
                     extra=fields("keys_changed", loop=self.family, fence=ctx.fence,
                                  runner=self.runner.info.label))
            self.apply(keys)
        self._gone = (self._gone | (set(before) - set(keys))) - set(keys)
        for key in sorted(self._gone):
            # Its status row goes once its holder has let it go; until then, the next refresh
            # tries again (status shows only listed keys meanwhile).
            if await store.forget(f"{self.family}[{key}]"):
                self._gone.discard(key)
        return IDLE


def _materialize(found: object) -> object:
    """A generator's keys, read in the thread that called the source."""
    if inspect.isgenerator(found):
        return list(found)
    return found
