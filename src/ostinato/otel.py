"""OpenTelemetry: a span per pass, current while the body runs, lease events as span events.

::

    from ostinato.otel import OstinatoInstrumentor
    OstinatoInstrumentor().instrument()            # or instrument(tracer_provider=provider)

Each pass is a span named ``ostinato.pass app:loop`` (kind INTERNAL) with the attributes
``ostinato.loop`` (the lease name), ``ostinato.app``, ``ostinato.fence``,
``ostinato.pass.number``, ``ostinato.holder`` (``host:pid``), ``ostinato.outcome``
(``worked``, ``idle`` or ``failed``) and, on ``cron=`` loops, ``ostinato.scheduled_for``
and ``ostinato.missed``. A failed pass records its exception and sets the status to
ERROR. The span is current while the body runs (in its thread, or its task), so the
spans the body makes, and the trace context it sends on (HTTP headers, messages),
belong to the pass. Lease events of the loop (acquired, lost, suspended, handed
over, released) are events on the span of the pass they happen in, or of the next
pass of that loop in this process.

Like the instrumentors of opentelemetry-instrumentation, it is one object per process:
``OstinatoInstrumentor()`` always returns the same one. It needs opentelemetry-api
only; with no SDK configured a pass makes a no-op span (a couple of microseconds, besides
the cost of running hooks at all) and nothing is recorded.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ostinato import __version__, hooks
from ostinato.errors import MissingExtraError
from ostinato.hooks import PassOutcome, RunnerEvent

try:
    from opentelemetry import trace
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider
except ImportError:
    raise MissingExtraError("ostinato.otel", "otel") from None

if TYPE_CHECKING:
    from ostinato.loop import Pass

__all__ = ["LEASE_EVENTS", "OstinatoInstrumentor"]

#: The runner events recorded on pass spans.
LEASE_EVENTS = frozenset({"lease_acquired", "lease_lost", "lease_suspended", "lease_released",
                          "hand_over"})
#: Events of a loop that runs no pass here are kept for its next pass, this many at most.
_PENDING_LIMIT = 16


class OstinatoInstrumentor:
    """Trace every pass of every runner in this process (see the module's docstring)."""

    _instance: OstinatoInstrumentor | None = None
    _tracer: Tracer | None = None

    def __new__(cls) -> OstinatoInstrumentor:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
            cls._instance._lock = threading.Lock()
            cls._instance._current = {}
            cls._instance._pending = {}
            # Bound once: hooks are removed by identity.
            cls._instance._hook = cls._instance._around_pass
            cls._instance._listener = cls._instance._on_event
        return cls._instance

    _lock: threading.Lock
    #: The span of the pass in flight, by lease name.
    _current: dict[str, Span]
    #: Lease events that came between passes, by lease name: (name, attributes, time in ns).
    _pending: dict[str, deque[tuple[str, dict[str, Any], int]]]
    _hook: hooks.AroundPass
    _listener: hooks.RunnerListener

    @property
    def is_instrumented(self) -> bool:
        return self._tracer is not None

    def instrument(self, tracer_provider: TracerProvider | None = None, **_: Any) -> None:
        """Start tracing passes, with ``tracer_provider`` or the global one. Instrumenting
        again only changes the provider."""
        self._tracer = trace.get_tracer("ostinato", __version__, tracer_provider)
        hooks.add_around_pass(self._hook)
        hooks.add_runner_event(self._listener)

    def uninstrument(self, **_: Any) -> None:
        """Stop tracing passes; passes in flight finish their spans."""
        hooks.remove_around_pass(self._hook)
        hooks.remove_runner_event(self._listener)
        self._tracer = None
        with self._lock:
            self._pending.clear()

    @contextlib.contextmanager
    def _around_pass(self, ctx: Pass) -> Iterator[PassOutcome]:
        outcome = PassOutcome()
        tracer = self._tracer
        span = None if tracer is None else tracer.start_span(
            f"ostinato.pass {ctx.lease_name}", kind=SpanKind.INTERNAL
        )
        if span is None or not span.is_recording():
            # No SDK: nothing is recorded, and there is no trace context to pass on.
            yield outcome
            return
        key = ctx.lease_name
        span.set_attributes({
            "ostinato.loop": key, "ostinato.app": ctx.app, "ostinato.fence": ctx.fence,
            "ostinato.pass.number": ctx.number, "ostinato.holder": hooks.holder(),
        })
        if ctx.scheduled_for is not None:
            span.set_attribute("ostinato.scheduled_for", ctx.scheduled_for.isoformat())
            span.set_attribute("ostinato.missed", ctx.missed)
        if self._pending.get(key):
            with self._lock:
                waiting = self._pending.pop(key, ())
            for name, attributes, at in waiting:
                span.add_event(name, attributes, at)
        self._current[key] = span
        try:
            with trace.use_span(span, record_exception=False, set_status_on_exception=False):
                yield outcome
        except BaseException as exc:
            span.set_attribute("ostinato.outcome", "failed")
            span.record_exception(exc, escaped=True)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        else:
            span.set_attribute("ostinato.outcome", outcome.outcome or "worked")
        finally:
            if self._current.get(key) is span:
                del self._current[key]
            span.end()

    def _on_event(self, event: RunnerEvent) -> None:
        if event.event not in LEASE_EVENTS or event.loop is None:
            return
        attributes: dict[str, Any] = {"ostinato.loop": event.loop, "ostinato.message": event.message}
        if event.fence is not None:
            attributes["ostinato.fence"] = event.fence
        at = int(event.at * 1e9)
        span = self._current.get(event.loop)
        if span is not None:
            span.add_event(event.event, attributes, at)
            return
        with self._lock:
            self._pending.setdefault(event.loop, deque(maxlen=_PENDING_LIMIT)).append(
                (event.event, attributes, at)
            )
