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
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ostinato.loop import Pass


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
def entered(hooks: tuple[AroundPass, ...], ctx: Pass) -> Iterator[list[PassOutcome]]:
    """Enter every hook for ``ctx``; yields their outcomes for the runner to fill in."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(hook(ctx)) for hook in hooks]
