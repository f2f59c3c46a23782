"""OpenTelemetry: a span per pass with its attributes, current during the body, lease events."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import ostinato
from ostinato import hooks
from ostinato.loop import Pass
from ostinato.otel import OstinatoInstrumentor
from tests.runner.test_runner import until


@pytest.fixture
def traced() -> Iterator[tuple[InMemorySpanExporter, TracerProvider]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    OstinatoInstrumentor().instrument(tracer_provider=provider)
    try:
        yield exporter, provider
    finally:
        OstinatoInstrumentor().uninstrument()
        provider.shutdown()


def passes(exporter: InMemorySpanExporter, key: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == f"ostinato.pass {key}"]


def new_app() -> ostinato.App:
    return ostinato.App(f"o{uuid.uuid4().hex[:8]}", coordinator=f"memory://{uuid.uuid4().hex}",
                        grace="2s")


async def test_each_pass_is_a_span_with_its_attributes_and_outcome(
    traced: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    """Sync and async passes are spans named after the loop; a failure records its exception."""
    exporter, _ = traced
    app = new_app()

    @app.loop(pause="1ms", error_backoff=("1ms", "2ms"), idle=("1ms", "2ms"))
    def sync(ctx: Pass) -> object:
        if ctx.number == 2:
            raise ValueError("two")
        return ostinato.IDLE if ctx.number == 3 else None

    @app.loop(pause="1ms")
    async def coro(ctx: Pass) -> None:
        pass

    async with app.running():
        await until(lambda: len(passes(exporter, f"{app.name}:sync")) >= 3
                    and len(passes(exporter, f"{app.name}:coro")) >= 1)
    first, second, third = passes(exporter, f"{app.name}:sync")[:3]
    assert first.kind is SpanKind.INTERNAL
    assert dict(first.attributes or {}) == {
        "ostinato.loop": f"{app.name}:sync", "ostinato.app": app.name, "ostinato.fence": 1,
        "ostinato.pass.number": 1, "ostinato.holder": f"{socket.gethostname()}:{os.getpid()}",
        "ostinato.outcome": "worked",
    }
    assert (second.attributes or {})["ostinato.outcome"] == "failed"
    assert second.status.status_code is StatusCode.ERROR
    assert [e.name for e in second.events if e.name == "exception"] == ["exception"]
    assert (second.events[-1].attributes or {})["exception.type"] == "ValueError"
    assert (third.attributes or {})["ostinato.outcome"] == "idle"
    assert third.status.status_code is StatusCode.UNSET
    coro_span = passes(exporter, f"{app.name}:coro")[0]
    assert (coro_span.attributes or {})["ostinato.outcome"] == "worked"


async def test_spans_made_in_the_body_are_children_of_the_pass(
    traced: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    """The pass span is current in the body's thread and in its task: the body's spans nest."""
    exporter, provider = traced
    tracer = provider.get_tracer("user")
    app = new_app()

    @app.loop(pause="1ms")
    def sync(ctx: Pass) -> None:
        with tracer.start_as_current_span("sync work"):
            pass

    @app.loop(pause="1ms")
    async def coro(ctx: Pass) -> None:
        with tracer.start_as_current_span("async work"):
            pass

    def found(name: str) -> list[ReadableSpan]:
        return [s for s in exporter.get_finished_spans() if s.name == name]

    async with app.running():
        await until(lambda: bool(found("sync work")) and bool(found("async work")))
    for work, key in (("sync work", "sync"), ("async work", "coro")):
        child = found(work)[0]
        parent = next(s for s in passes(exporter, f"{app.name}:{key}")
                      if s.context is not None and child.parent is not None
                      and s.context.span_id == child.parent.span_id)
        assert parent.context is not None
        assert child.context is not None
        assert child.context.trace_id == parent.context.trace_id


async def test_lease_events_are_span_events(
    traced: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    """The acquisition, the loss on a release and the new acquisition show on pass spans."""
    exporter, _ = traced
    app = new_app()

    @app.loop(pause="5ms")
    def tick(ctx: Pass) -> None:
        pass

    key = f"{app.name}:tick"

    def events() -> list[tuple[str, object]]:
        return [(e.name, (e.attributes or {}).get("ostinato.fence"))
                for s in passes(exporter, key) for e in s.events]

    async with app.running():
        await until(lambda: len(passes(exporter, key)) >= 2)
        app.release("tick")
        await until(lambda: ("lease_acquired", 2) in events())
    assert events()[0] == ("lease_acquired", 1)
    assert ("lease_lost", 1) in events()
    assert events().index(("lease_lost", 1)) < events().index(("lease_acquired", 2))


async def test_uninstrument_stops_the_spans(
    traced: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    """After uninstrument() no pass makes a span and no hook is left behind."""
    exporter, _ = traced
    OstinatoInstrumentor().uninstrument()
    assert OstinatoInstrumentor() is OstinatoInstrumentor()
    assert not OstinatoInstrumentor().is_instrumented
    assert hooks.around_pass() == ()
    app = new_app()
    ran: list[int] = []

    @app.loop(pause="1ms")
    def tick(ctx: Pass) -> None:
        ran.append(ctx.number)

    async with app.running():
        await until(lambda: len(ran) >= 3)
    assert passes(exporter, f"{app.name}:tick") == []
