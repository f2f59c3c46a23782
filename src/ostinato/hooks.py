"""Hooks around every pass of every runner in this process, for integrations (Sentry,
OpenTelemetry, Django) and for your own instrumentation.

A hook is a callable taking the pass's ``Pass`` and returning a context manager: it is
entered just before the body runs, in the thread or task that runs it (so context
variables it sets, such as a tracing span made current, are seen by the body), and
left just after, with the body's exception if it raised. What it yields is a
``PassOutcome`` whose ``outcome`` the runner fills in (``"worked"`` or ``"idle"``)
before the hook is left without an exception::

    @contextlib.contextmanager
    def timed(ctx):
        began = time.perf_counter()
        outcome = PassOutcome()
        yield outcome
        print(ctx.lease_name, outcome.outcome, time.perf_counter() - began)

    ostinato.hooks.add_around_pass(timed)

Hooks run in the order added; a hook that raises fails the pass like the body would.

Runner events (a lease acquired or lost, a coordinator out of reach) reach
``add_runner_event`` listeners as ``RunnerEvent`` values: they are read from the
``ostinato`` loggers' records that carry an ``event`` field (see ``ostinato.logs``),
so a listener sees the events those loggers let through (INFO and up under
``ostinato run`` and ``app.running()``). ``holder()`` is the label this process's
runners hold leases under, as ``ostinato status`` shows it.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ostinato.loop import LoopSpec, Pass


@dataclass
class PassOutcome:
    """How a pass ended, as far as a hook can see on its way out: ``"worked"`` or ``"idle"``,
    filled in by the runner; ``None`` when the body raised (the hook sees the exception)."""

    outcome: str | None = None


AroundPass = Callable[["Pass"], AbstractContextManager[PassOutcome]]

_lock = threading.Lock()
_around: tuple[AroundPass, ...] = ()


def add_around_pass(hook: AroundPass) -> AroundPass:
    """Run ``hook`` around every pass in this process from now on (usable as a decorator);
    adding the same hook twice adds it once."""
    global _around
    with _lock:
        if hook not in _around:
            _around = (*_around, hook)
    return hook


def remove_around_pass(hook: AroundPass) -> None:
    """Stop running ``hook``; a hook that was not added is ignored."""
    global _around
    with _lock:
        _around = tuple(h for h in _around if h is not hook)


def around_pass() -> tuple[AroundPass, ...]:
    """The hooks now in force (an immutable snapshot: cheap to read on every pass)."""
    return _around


@contextlib.contextmanager
def entered(
    hooks: tuple[AroundPass, ...], ctx: Pass, spec: LoopSpec | None = None
) -> Iterator[list[PassOutcome]]:
    """Enter every hook for ``ctx`` (a pass of the loop declared by ``spec``); yields their
    outcomes for the runner to fill in."""
    token = _declaration.set(spec)
    try:
        with contextlib.ExitStack() as stack:
            yield [stack.enter_context(hook(ctx)) for hook in hooks]
    finally:
        _declaration.reset(token)


def declared(ctx: Pass) -> LoopSpec | None:
    """The declaration of the loop ``ctx`` is a pass of (its schedule, lease, timeout...), when
    called from a hook while the runner enters or leaves it; else ``None``."""
    spec = _declaration.get()
    if spec is None or ctx.loop != spec.name:
        return None
    return spec


#: The declaration of the loop whose pass the hooks are around, in the pass's own context.
_declaration: contextvars.ContextVar[LoopSpec | None] = contextvars.ContextVar(
    "ostinato_declaration", default=None
)


def holder() -> str:
    """The holder label of this process's runners, ``host:pid``, as ``ostinato status`` shows it."""
    global _holder
    pid = os.getpid()
    if _holder[0] != pid:  # a forked child is a holder of its own
        _holder = (pid, f"{socket.gethostname()}:{pid}")
    return _holder[1]


_holder: tuple[int, str] = (0, "")


@dataclass(frozen=True)
class RunnerEvent:
    """A notable event of a runner: ``event`` (``"lease_acquired"``, ``"lease_lost"``, ...),
    the loop's lease name and fence where there is one, the runner's label, the log level
    and message, and the wall-clock time it happened (seconds since the epoch)."""

    event: str
    loop: str | None
    fence: int | None
    runner: str | None
    level: int
    message: str
    at: float


RunnerListener = Callable[[RunnerEvent], object]
_listeners: tuple[RunnerListener, ...] = ()


class _EventHandler(logging.Handler):
    """Hands the ``ostinato`` loggers' event records to the listeners."""

    def emit(self, record: logging.LogRecord) -> None:
        name = getattr(record, "event", None)
        if not isinstance(name, str):
            return
        event = RunnerEvent(name, getattr(record, "loop", None), getattr(record, "fence", None),
                            getattr(record, "runner", None), record.levelno, record.getMessage(),
                            record.created)
        for listener in _listeners:
            try:
                listener(event)
            except Exception:  # a listener's bug must not break the runner's logging
                self.handleError(record)


_handler = _EventHandler()
_handler.set_name("ostinato.hooks")
#: The loggers whose records carry runner events. The handler sits on them rather than on
#: ``ostinato``, so whether ``ostinato`` has a handler of its own (``logs.make_visible``
#: asks) does not change when a listener is added.
_EVENT_LOGGERS = ("ostinato.loop", "ostinato.runner", "ostinato.isolation")


def add_runner_event(listener: RunnerListener) -> RunnerListener:
    """Call ``listener(event)`` with every runner event in this process from now on (usable as a
    decorator); it runs in whichever thread logged the event, so keep it quick."""
    global _listeners
    with _lock:
        if listener not in _listeners:
            _listeners = (*_listeners, listener)
        for name in _EVENT_LOGGERS:
            logging.getLogger(name).addHandler(_handler)  # added once, however often called
    return listener


def remove_runner_event(listener: RunnerListener) -> None:
    """Stop calling ``listener``; one that was not added is ignored."""
    global _listeners
    with _lock:
        _listeners = tuple(x for x in _listeners if x != listener)  # a bound method is made anew
        if not _listeners:
            for name in _EVENT_LOGGERS:
                logging.getLogger(name).removeHandler(_handler)
