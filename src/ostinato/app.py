"""``App``: the loops of one application and the way to run them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any, TypeVar, overload

from ostinato import logs
from ostinato.coordinators import Coordinator, from_url
from ostinato.durations import Duration, parse_duration
from ostinato.errors import ConfigurationError, CoordinatorUnavailable, UnknownLoopError
from ostinato.loop import Body, KeySource, LoopSpec, declare
from ostinato.notices import StallHook
from ostinato.observe import Observe
from ostinato.operate import Operations
from ostinato.runner import Runner

log = logging.getLogger("ostinato")

DEFAULT_COORDINATOR = "sqlite:///ostinato.db"
ENV_COORDINATOR = "OSTINATO_COORDINATOR"
_APP_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")

F = TypeVar("F", bound=Body)
T = TypeVar("T")


def resolve_url(given: str | None, app_default: str | None = None) -> str:
    """The coordinator URL: the one given, else the app's, else the environment's, else SQLite."""
    return given or app_default or os.environ.get(ENV_COORDINATOR) or DEFAULT_COORDINATOR


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


class App(Operations):
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
