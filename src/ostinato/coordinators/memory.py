"""``memory://``: leases in this process's memory, for tests and single-process apps.

Every coordinator opened with the same URL in one process shares one store,
so several runners (and ``app.wake``) in one process see each other.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ostinato.coordinators.clocks import Silence
from ostinato.coordinators.protocol import (
    Coordinator,
    Denied,
    Event,
    Grant,
    LoopRecord,
    LoopStats,
    Renewal,
    RunnerInfo,
    RunnerRecord,
    Setting,
    stats_fields,
)


@dataclass
class _Lease:
    owner: str | None = None
    holder: str | None = None
    expires: float = 0.0
    fence: int = 0
    paused: bool = False
    held_since: float | None = None
    record: LoopRecord | None = None
    forgotten: bool = False


@dataclass
class MemoryStore:
    """The state behind every ``memory://NAME`` coordinator of one name."""

    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    lock: threading.Lock = field(default_factory=threading.Lock)
    leases: dict[str, _Lease] = field(default_factory=dict)
    runners: dict[str, tuple[str, float, frozenset[str]]] = field(default_factory=dict)
    settings: dict[str, Setting] = field(default_factory=dict)
    #: Grants and renewal calls per owner (``Coordinator.silence``).
    activity: dict[str, int] = field(default_factory=dict)
    subscribers: list[tuple[asyncio.AbstractEventLoop, Callable[[Event], None]]] = field(
        default_factory=list
    )


_STORES: dict[str, MemoryStore] = {}
_STORES_LOCK = threading.Lock()


def memory_store(name: str = "") -> MemoryStore:
    """The shared store for ``memory://NAME`` in this process."""
    with _STORES_LOCK:
        return _STORES.setdefault(name, MemoryStore())


class MemoryCoordinator(Coordinator):
    """Leases in a dict; expiry on an injectable monotonic clock."""

    def __init__(self, name: str = "", *, store: MemoryStore | None = None) -> None:
        self.store = store if store is not None else memory_store(name)
        self.display_url = f"memory://{name}"
        self._subscriptions: list[tuple[asyncio.AbstractEventLoop, Callable[[Event], None]]] = []
        self._silence = Silence()

    async def close(self) -> None:
        with self.store.lock:
            for sub in self._subscriptions:
                if sub in self.store.subscribers:
                    self.store.subscribers.remove(sub)
        self._subscriptions.clear()

    def _lease(self, key: str) -> _Lease:
        lease = self.store.leases.get(key)
        if lease is None:
            lease = self.store.leases[key] = _Lease()
        return lease

    async def acquire(self, key: str, runner: RunnerInfo, ttl: float) -> Grant | Denied:
        now = self.store.clock()
        with self.store.lock:
            lease = self._lease(key)
            if lease.paused:
                return Denied(holder=None, expires_in=None, paused=True)
            if lease.owner not in (None, runner.id) and lease.expires > now:
                return Denied(holder=lease.holder, expires_in=lease.expires - now, owner=lease.owner)
            self._bump(runner.id)
            lease.owner, lease.holder = runner.id, runner.label
            lease.expires = now + ttl
            lease.fence += 1
            lease.held_since = self.store.wall()
            last = lease.record.last_start if lease.record else None
            return Grant(fence=lease.fence, last_start=last)

    def _bump(self, owner: str) -> None:
        self.store.activity[owner] = self.store.activity.get(owner, 0) + 1

    async def silence(self, owners: Collection[str]) -> dict[str, float]:
        now = self.store.clock()
        with self.store.lock:
            counts = {owner: self.store.activity.get(owner) for owner in owners}
        return {owner: self._silence.saw(owner, count, now) for owner, count in counts.items()}

    async def renew(
        self, runner: RunnerInfo, leases: Mapping[str, tuple[int, float]]
    ) -> dict[str, Renewal]:
        now = self.store.clock()
        answers: dict[str, Renewal] = {}
        with self.store.lock:
            self._bump(runner.id)
            for key, (fence, ttl) in leases.items():
                lease = self._lease(key)
                mine = lease.owner == runner.id and lease.fence == fence and lease.expires > now
                if not mine:
                    answers[key] = Renewal.LOST
                elif lease.paused:
                    lease.owner = lease.holder = None
                    answers[key] = Renewal.PAUSED
                else:
                    lease.expires = now + ttl
                    answers[key] = Renewal.HELD
        return answers

    async def release(self, key: str, runner: RunnerInfo, fence: int) -> bool:
        with self.store.lock:
            lease = self._lease(key)
            if lease.owner != runner.id or lease.fence != fence:
                return False
            lease.owner = lease.holder = None
            lease.expires = 0.0
            return True

    async def revoke(self, key: str) -> int | None:
        now = self.store.clock()
        with self.store.lock:
            lease = self._lease(key)
            if lease.owner is None or lease.expires <= now:
                return None
            lease.owner = lease.holder = None
            lease.expires = 0.0
            return lease.fence

    async def forget(self, key: str) -> bool:
        now = self.store.clock()
        with self.store.lock:
            lease = self._lease(key)
            if lease.owner is not None and lease.expires > now:
                return False
            lease.record, lease.paused, lease.forgotten = None, False, True
            return True

    async def report(self, runner: RunnerInfo, ttl: float, stats: Sequence[LoopStats]) -> None:
        now = self.store.clock()
        with self.store.lock:
            self.store.runners[runner.id] = (runner.label, now + ttl, frozenset(runner.hosts))
            for item in stats:
                lease = self._lease(item.key)
                lease.forgotten = False
                base = lease.record or LoopRecord(item.key, 0, False, None, None)
                lease.record = replace(
                    base,
                    passes=base.passes + item.passes,
                    errors=base.errors + item.errors,
                    **stats_fields(item),  # type: ignore[arg-type]
                )

    async def runners(self) -> list[RunnerRecord]:
        now = self.store.clock()
        with self.store.lock:
            return [
                RunnerRecord(id=rid, label=label, seen=until, hosts=hosts)
                for rid, (label, until, hosts) in self.store.runners.items()
                if until > now
            ]

    async def set_paused(self, key: str, paused: bool) -> None:
        with self.store.lock:
            self._lease(key).paused = paused

    async def loops(self) -> list[LoopRecord]:
        now = self.store.clock()
        out = []
        with self.store.lock:
            for key, lease in sorted(self.store.leases.items()):
                held = lease.owner is not None and lease.expires > now
                if lease.forgotten and not held:
                    continue
                base = lease.record or LoopRecord(key, 0, False, None, None)
                out.append(
                    replace(
                        base,
                        fence=lease.fence,
                        paused=lease.paused,
                        holder=lease.holder if held else None,
                        held_since=lease.held_since if held else None,
                    )
                )
        return out

    async def publish(self, event: Event) -> None:
        with self.store.lock:
            subscribers = list(self.store.subscribers)
        for loop, callback in subscribers:
            if not loop.is_closed():
                loop.call_soon_threadsafe(callback, event)

    async def subscribe(self, runner: RunnerInfo, callback: Callable[[Event], None]) -> None:
        sub = (asyncio.get_running_loop(), callback)
        with self.store.lock:
            self.store.subscribers.append(sub)
        self._subscriptions.append(sub)

    async def read_setting(self, name: str) -> Setting | None:
        with self.store.lock:
            return self.store.settings.get(name)

    async def write_setting(self, name: str, value: str, fence: int) -> bool:
        with self.store.lock:
            stored = self.store.settings.get(name)
            if stored is not None and stored.fence > fence:
                return False
            self.store.settings[name] = Setting(value, fence)
            return True
