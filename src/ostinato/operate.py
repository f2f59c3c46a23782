"""What an operator does to an app's loops from code, as ``App`` methods: wake, pause,
resume and release a loop (or one partition or key of it), read and refresh a loop's
keys, read status and a loop's next starts. Each has an ``_async`` twin; the sync one
runs it with ``run_sync``. Inside the process that hosts the app, the runner's open
connection is used; elsewhere, one made for the call.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from ostinato import control
from ostinato.coordinators import Coordinator, Event
from ostinato.durations import Duration, parse_duration
from ostinato.errors import ConfigurationError, UnknownLoopError
from ostinato.families import keys_setting, read_keys, refreshed_keys
from ostinato.loop import LoopSpec, family_of
from ostinato.pacing import upcoming
from ostinato.schedule import zone_named

if TYPE_CHECKING:
    from ostinato.runner import Runner

T = TypeVar("T")


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion from sync code, even when called inside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name="ostinato-sync-call")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


class Operations:
    """The operations half of ``ostinato.App``; the state it reads is the app's, declared here."""

    name: str
    loops: dict[str, LoopSpec]
    _coordinator: str | Coordinator | None
    _runner: Runner | None

    def loop_names(self) -> str:
        raise NotImplementedError

    def connect(self, override: str | None = None) -> Coordinator:
        raise NotImplementedError

    def wake(self, name: str) -> None:
        """End the idle wait of loop ``name`` now, in whichever process runs it."""
        run_sync(self.wake_async(name))

    async def wake_async(self, name: str) -> None:
        """``wake`` for async code."""
        key = self._key(name)
        runner = self._runner
        if runner is not None and runner.loop is asyncio.get_running_loop() and not self._whole(key):
            # Hosted here: wake it directly, and tell the others over the open connection.
            keeper = runner.keepers.get(key)
            if keeper is not None:
                keeper.wake()
            await runner.coordinator.publish(Event("wake", key))
            return
        if self._whole(key):
            await self._control(lambda store: control.wake(store, key))
            return
        await self._control(lambda store: store.publish(Event("wake", key)))

    def pause(self, name: str) -> None:
        """Pause loop ``name``: its holder finishes the current pass and no runner takes it."""
        run_sync(self.pause_async(name))

    async def pause_async(self, name: str) -> None:
        """``pause`` for async code."""
        key = self._key(name)
        await self._control(lambda store: control.pause(store, key, resolved=not self._whole(key)))

    def resume(self, name: str) -> None:
        """Resume loop ``name`` after ``pause``."""
        run_sync(self.resume_async(name))

    async def resume_async(self, name: str) -> None:
        """``resume`` for async code."""
        key = self._key(name)
        await self._control(lambda store: control.resume(store, key, resolved=not self._whole(key)))

    def release(self, name: str) -> int | None:
        """Revoke loop ``name``'s lease so another runner takes it at once, with a new fence;
        return the revoked fence (``None``: nobody held it)."""
        return run_sync(self.release_async(name))

    async def release_async(self, name: str) -> int | None:
        """``release`` for async code."""
        key = self._key(name)
        _, fence = await self._control(
            lambda store: control.release(store, key, resolved=not self._whole(key))
        )
        return fence

    def keys(self, name: str) -> list[str]:
        """The keys of the ``keys=`` loop ``name``, as the coordinator holds them (``[]``
        until a runner has read the key source once)."""
        return run_sync(self.keys_async(name))

    async def keys_async(self, name: str) -> list[str]:
        """``keys`` for async code."""
        family = self._keyed(name)
        setting = await self._control(lambda store: store.read_setting(keys_setting(family)))
        return read_keys(setting.value if setting else None)

    def refresh_keys(self, name: str, within: Duration = "30s") -> list[str]:
        """Have the runner that refreshes the keys of loop ``name`` read its key source now;
        return the new list once it is stored. ``CoordinatorUnavailable`` if no runner
        did so within ``within`` (is one running?)."""
        return run_sync(self.refresh_keys_async(name, within))

    async def refresh_keys_async(self, name: str, within: Duration = "30s") -> list[str]:
        """``refresh_keys`` for async code."""
        family = self._keyed(name)
        limit = parse_duration(within, what="within")
        return await self._control(lambda store: refreshed_keys(store, family, limit))

    def status(self) -> list[dict[str, Any]]:
        """This app's loops as the coordinator knows them: one dict per loop, as
        ``ostinato status --json`` prints them (``state``, ``holder``, ``fence``, ...)."""
        return run_sync(self.status_async())

    async def status_async(self) -> list[dict[str, Any]]:
        """``status`` for async code."""
        rows = await self._control(control.status)
        return [row for row in rows if row["app"] == self.name]

    def next_starts(self, name: str, count: int = 5, after: datetime | None = None) -> list[datetime]:
        """The next ``count`` scheduled starts of loop ``name``, strictly after ``after`` (default:
        now), as aware datetimes in the loop's zone: the ``cron=`` slots (each start is then
        delayed by its jitter, if any), or ``after`` plus multiples of ``every=``.

        A naive ``after`` is read in the loop's zone (UTC for ``every=``); a loop without
        a schedule (``pause=`` or back to back) is a ``ConfigurationError``.
        """
        key = self._key(name)
        spec = self.loops[family_of(key.partition(":")[2])]
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigurationError(f"count must be a whole number >= 1, not {count!r}")
        zone = zone_named(spec.pacing.timezone)
        if after is None:
            after = datetime.now(zone)
        elif after.tzinfo is None:
            after = after.replace(tzinfo=zone)
        try:
            return upcoming(spec.pacing, after, count)
        except ValueError as exc:
            raise ConfigurationError(f"loop {key!r} {exc}") from None

    def _key(self, name: str) -> str:
        """``app:loop`` for a loop of this app, named bare or in full, or one partition or key
        of it (``loop#3``, ``loop[acme]``)."""
        bare = name.removeprefix(f"{self.name}:")
        loop = family_of(bare)
        spec = self.loops.get(loop)
        if spec is None:
            raise UnknownLoopError(
                f"app {self.name!r} has no loop named {name!r}; its loops are {self.loop_names()}"
            )
        member = bare[len(loop):]
        if member:
            if member.startswith("#") and spec.partitions is not None:
                index = member[1:]
                if not (index.isdigit() and int(index) < spec.partitions):
                    raise UnknownLoopError(
                        f"loop {self.name}:{loop} has partitions #0 to #{spec.partitions - 1}, "
                        f"not {member!r}"
                    )
            elif not (member.startswith("[") and member.endswith("]") and spec.keys is not None):
                raise UnknownLoopError(
                    f"{name!r}: loop {self.name}:{loop} has no member {member!r} "
                    "(write loop#N for a partition, loop[key] for a key)"
                )
        return f"{self.name}:{bare}"

    def _whole(self, key: str) -> bool:
        """Whether ``key`` names a whole loop made of partitions or keys."""
        spec = self.loops.get(key.partition(":")[2])
        return spec is not None and spec.family

    def _keyed(self, name: str) -> str:
        key = self._key(name)
        spec = self.loops.get(key.partition(":")[2])
        if spec is None or spec.keys is None:
            raise ConfigurationError(f"loop {key} has no keys= (it is not one loop per key)")
        return key

    async def _control(self, job: Callable[[Coordinator], Awaitable[T]]) -> T:
        """Run ``job`` on the coordinator: the hosted runner's open one when this event
        loop hosts the app, else a connection made for the call."""
        runner = self._runner
        if runner is not None and runner.loop is asyncio.get_running_loop() and runner.connected.is_set():
            return await job(runner.coordinator)
        store = self.connect()
        owned = store is not self._coordinator
        try:
            await store.open()
            return await job(store)
        finally:
            if owned:
                await store.close()
