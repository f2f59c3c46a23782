"""``App``: the loops of one application and the way to run them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine
from datetime import datetime
from typing import Any, TypeVar, overload

from ostinato import control, logs
from ostinato.coordinators import Coordinator, Event, from_url
from ostinato.durations import Duration, parse_duration
from ostinato.errors import ConfigurationError, CoordinatorUnavailable, UnknownLoopError
from ostinato.families import keys_setting, read_keys, refreshed_keys
from ostinato.loop import Body, KeySource, LoopSpec, declare, family_of
from ostinato.notices import StallHook
from ostinato.observe import Observe
from ostinato.pacing import upcoming
from ostinato.runner import Runner
from ostinato.schedule import zone_named

log = logging.getLogger("ostinato")

DEFAULT_COORDINATOR = "sqlite:///ostinato.db"
ENV_COORDINATOR = "OSTINATO_COORDINATOR"
_APP_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")

F = TypeVar("F", bound=Body)
T = TypeVar("T")


def resolve_url(given: str | None, app_default: str | None = None) -> str:
    """The coordinator URL: the one given, else the app's, else the environment's, else SQLite."""
    return given or app_default or os.environ.get(ENV_COORDINATOR) or DEFAULT_COORDINATOR


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


#: How long ``running(wait=True)`` waits for the coordinator.
WAIT_DEFAULT = 30.0
#: How long leaving ``running()`` waits for the coordinator's connections to close.
CLOSE_WITHIN = 0.3


async def _connected(runner: Runner, task: asyncio.Task[None], limit: float) -> None:
    """Wait until ``runner`` has connected; raise its error, or ``CoordinatorUnavailable``
    once ``limit`` seconds have passed."""
    connected = asyncio.ensure_future(runner.connected.wait())
    try:
        await asyncio.wait({connected, task}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
    finally:
        connected.cancel()
    if runner.error is not None:
        raise runner.error
    if not runner.connected.is_set():
        raise CoordinatorUnavailable(
            f"the coordinator {runner.coordinator.display_url} could not be reached within "
            f"{limit:g}s (running(wait=True)); is it up, and is the URL right?"
        )


class App:
    """A named set of loops sharing one coordinator.

    ``coordinator`` is a URL (``sqlite:///ostinato.db``, ``redis://...``) or a
    ``Coordinator``; when not given, ``$OSTINATO_COORDINATOR`` or
    ``sqlite:///ostinato.db`` is used.
    """

    def __init__(
        self,
        name: str,
        coordinator: str | Coordinator | None = None,
        *,
        grace: Duration = "30s",
    ) -> None:
        if not isinstance(name, str) or not _APP_NAME.match(name):
            raise ConfigurationError(
                f"bad app name {name!r}: use letters, digits, '_', '.' or '-'"
            )
        self.name = name
        self._coordinator = coordinator
        try:
            self.grace = parse_duration(grace, what="grace")
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        self.loops: dict[str, LoopSpec] = {}
        # Where the app was made, so a child process can import it again.
        self._module = sys._getframe(1).f_globals.get("__name__", "")
        self.target: str | None = None
        self._runner: Runner | None = None
        self._started = False
        # Inside run(): the process is the runner's alone.
        self._whole_process = False
        self.stall_hooks: list[StallHook] = []

    def __repr__(self) -> str:
        return f"<ostinato.App {self.name!r} loops={list(self.loops)}>"

    @overload
    def loop(self, body: F, /) -> F: ...

    @overload
    def loop(
        self,
        body: None = None,
        /,
        *,
        name: str | None = None,
        every: Duration | None = None,
        pause: Duration | None = None,
        cron: str | None = None,
        timezone: str | None = None,
        catchup: Duration | None = None,
        jitter: Duration | None = None,
        idle: tuple[Duration, Duration] = ("100ms", "5s"),
        error_backoff: tuple[Duration, Duration] = ("1s", "1m"),
        lease: Duration = "10s",
        timeout: Duration | None = None,
        stall_after: Duration | None = None,
        fail_after: int = 3,
        isolation: str | None = None,
        max_passes: int | None = None,
        max_memory: str | int | None = None,
        partitions: int | None = None,
        keys: KeySource | None = None,
        refresh: Duration | None = None,
    ) -> Callable[[F], F]: ...

    def loop(
        self,
        body: Any = None,
        /,
        *,
        name: str | None = None,
        every: Duration | None = None,
        pause: Duration | None = None,
        cron: str | None = None,
        timezone: str | None = None,
        catchup: Duration | None = None,
        jitter: Duration | None = None,
        idle: tuple[Duration, Duration] = ("100ms", "5s"),
        error_backoff: tuple[Duration, Duration] = ("1s", "1m"),
        lease: Duration = "10s",
        timeout: Duration | None = None,
        stall_after: Duration | None = None,
        fail_after: int = 3,
        isolation: str | None = None,
        max_passes: int | None = None,
        max_memory: str | int | None = None,
        partitions: int | None = None,
        keys: KeySource | None = None,
        refresh: Duration | None = None,
        **unknown: Any,
    ) -> Any:
        """Declare a loop: ``@app.loop`` or ``@app.loop(every="2s", ...)``.

        Durations are ``"250ms"``, ``"2s"``, ``"1m30s"``, numbers of seconds or timedeltas.

        - ``name``: the loop's name (default: the function's name).
        - ``every``: start to start, like ``"2s"``; a start missed by a long pass is skipped.
        - ``pause``: from the end of a pass to the start of the next.
        - ``cron``: a calendar schedule, like ``"*/5 * * * *"`` (a sixth field: seconds).
          (At most one of ``every``, ``pause`` and ``cron``; none means back to back.)
        - ``timezone``: the IANA zone ``cron`` is read in, like ``"Europe/Berlin"`` (default UTC).
        - ``catchup``: starts missed within this window (``"6h"``) run once, as one catch-up pass.
        - ``jitter``: delay each ``cron`` start by up to this much, the same delay on every runner.
        - ``idle``: ``(min, max)`` backoff after a pass returns ``ostinato.IDLE``; a wake-up ends it.
        - ``error_backoff``: ``(min, max)`` jittered backoff after a pass raises.
        - ``lease``: the lease's time to live (default ``"10s"``): a dead runner's loop
          resumes elsewhere within it.
        - ``timeout``: a pass over it is reported (an ``async def`` or isolated pass is ended).
        - ``stall_after``: no pass finished for this long shows the loop as ``stalled``.
        - ``fail_after``: this many failed passes in a row show it as ``failing`` (default 3).
        - ``isolation``: ``"process"`` runs each pass in a child process of its own.
        - ``max_passes``, ``max_memory``: recycle that child process after so many passes
          or past so much memory (``"512MB"``).
        - ``partitions``: N loops sharing this body, ``name#0`` .. ``name#N-1``, each with
          its own lease and fence; the pass reads ``ctx.partition`` and ``ctx.partitions``.
        - ``keys``: a function (sync or async) returning the keys: one loop per key,
          ``name[key]``, with ``ctx.key``; re-read every ``refresh`` (default ``"30s"``).

        A bad declaration raises ``DeclarationError`` here, naming the loop and the field;
        a misspelt option names the option it was probably meant to be.
        """
        options: dict[str, Any] = {
            "name": name, "every": every, "pause": pause, "cron": cron, "timezone": timezone,
            "catchup": catchup, "jitter": jitter, "idle": idle,
            "error_backoff": error_backoff, "lease": lease, "timeout": timeout,
            "stall_after": stall_after, "fail_after": fail_after, "isolation": isolation,
            "max_passes": max_passes, "max_memory": max_memory, "partitions": partitions,
            "keys": keys, "refresh": refresh, **unknown,
        }

        def register(fn: F) -> F:
            spec = declare(fn, **options)
            if self._started:
                raise ConfigurationError(
                    f"app {self.name!r} is already running, so loop {spec.name!r} would never "
                    "run: declare every loop before app.run() or app.running() starts"
                )
            if spec.name in self.loops:
                raise ConfigurationError(
                    f"app {self.name!r} already has a loop named {spec.name!r}; "
                    "give one of them name=..."
                )
            self.loops[spec.name] = spec
            return fn

        if body is not None:
            return register(body)
        return register

    def loop_names(self) -> str:
        """This app's loops as status names them (``app:loop, ...``), for messages."""
        return ", ".join(f"{self.name}:{loop}" for loop in self.loops) or "(none)"

    def locate(self) -> str:
        """``module:attr`` or ``path/file.py:attr`` naming this app, for child processes to import."""
        if self.target is not None:
            return self.target
        module = sys.modules.get(self._module)
        if module is not None:
            for attr, value in vars(module).items():
                if value is self:
                    # A top-level module may have been found through a sys.path entry
                    # the child will not have: name it by its file instead.
                    file = getattr(module, "__file__", None)
                    if file and "." not in self._module:
                        return f"{file}:{attr}"
                    return f"{self._module}:{attr}"
        raise ConfigurationError(
            f"isolation='process' needs app {self.name!r} importable by child processes: "
            "define it at module level (app = ostinato.App(...)) or set app.target = 'module:attr'"
        )

    def on_stall(self, hook: StallHook) -> StallHook:
        """Call ``hook(stall)`` when a loop stalls (``stall_after``) and again when it recovers.

        ``stall.recovered`` tells which. Sync hooks run in a worker thread, async
        ones on the event loop; usable as a decorator.
        """
        self.stall_hooks.append(hook)
        return hook

    # -- the coordinator -------------------------------------------------------------

    def coordinator_url(self, override: str | None = None) -> str:
        default = self._coordinator if isinstance(self._coordinator, str) else None
        return resolve_url(override, default)

    def connect(self, override: str | None = None) -> Coordinator:
        """The coordinator to use: ``override``, else the app's own, else the environment's."""
        if override is None and isinstance(self._coordinator, Coordinator):
            return self._coordinator
        return from_url(self.coordinator_url(override))

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

    # -- running --------------------------------------------------------------------------

    def specs(self, only: Collection[str] | None) -> list[LoopSpec]:
        if not only:
            return list(self.loops.values())
        unknown = sorted(set(only) - set(self.loops))
        if unknown:
            raise UnknownLoopError(
                f"app {self.name!r} has no loop named {', '.join(map(repr, unknown))}; "
                f"its loops are {self.loop_names()}"
            )
        return [spec for name, spec in self.loops.items() if name in only]

    @contextlib.asynccontextmanager
    async def running(
        self, *, only: Collection[str] | None = None, coordinator: str | None = None,
        observe: Observe | None = None, wait: bool | Duration = False,
    ) -> AsyncIterator[Runner]:
        """Host the loops inside the running event loop until the block exits.

        The block is entered at once: the loops are hosted in the background, which
        connects to the coordinator when it can (retrying while it cannot be reached,
        and saying so), so a slow or dead coordinator never holds up the program's
        start or its shutdown. ``wait=True`` (or a duration, ``wait="5s"``) enters the
        block only once connected, and raises ``CoordinatorUnavailable`` if that takes
        longer than the duration (``True``: 30 s).

        ``observe`` adds a metrics server and a stall webhook (``ostinato run
        --metrics-port --alert-webhook``).
        """
        specs = self.specs(only)
        logs.make_visible()
        limit = None
        if wait is not False:
            try:
                limit = WAIT_DEFAULT if wait is True else parse_duration(wait, what="wait")
            except ValueError as exc:
                raise ConfigurationError(str(exc)) from None
        hooks = [*self.stall_hooks, *(observe.hooks() if observe else ())]
        store = self.connect(coordinator)
        target = self.locate() if any(spec.isolated for spec in specs) else None
        runner = Runner(self.name, specs, store, grace=self.grace, stall_hooks=hooks,
                        app_target=target, freeze_gc=self._whole_process)
        exporter = observe.start(runner) if observe else None  # a port in use fails here
        stop = asyncio.Event()
        task = asyncio.create_task(runner.run(stop), name=f"ostinato:{self.name}")
        self._runner = runner
        self._started = True
        try:
            if limit is not None:
                await _connected(runner, task, limit)
            yield runner
        finally:
            self._runner = None
            stop.set()
            await asyncio.gather(task, return_exceptions=True)
            if exporter is not None:
                exporter.stop()
            if store is not self._coordinator:
                try:
                    await asyncio.wait_for(store.close(), CLOSE_WITHIN)
                except (TimeoutError, CoordinatorUnavailable):
                    log.warning("the coordinator %s did not close in time; leaving it",
                                store.display_url)

    def run(
        self, *, only: Collection[str] | None = None, coordinator: str | None = None,
        observe: Observe | None = None,
    ) -> None:
        """Host the loops in this process until SIGTERM or SIGINT, then stop gracefully."""
        self._whole_process = True  # the process is the runner's: it may tune the collector
        try:
            asyncio.run(self.serve(only=only, coordinator=coordinator, observe=observe))
        finally:
            self._whole_process = False

    async def serve(
        self, *, only: Collection[str] | None = None, coordinator: str | None = None,
        observe: Observe | None = None,
    ) -> None:
        """``run`` for a caller that owns the event loop: stops on SIGTERM or SIGINT."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        handled = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
                handled.append(sig)
        try:
            async with self.running(only=only, coordinator=coordinator, observe=observe) as runner:
                ended = asyncio.ensure_future(runner.ended.wait())
                stopped = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait({ended, stopped}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    ended.cancel()
                    stopped.cancel()
                if runner.error is not None:
                    raise runner.error
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)
