"""Loop declarations: accepted as the design says, refused with the loop and field named."""

from __future__ import annotations

import re
import time
from datetime import timedelta

import pytest

import ostinato
from ostinato.loop import LocalLease, Pass, parse_size


def test_declaration_forms() -> None:
    """Bare decorator, options, async bodies and every pacing field are accepted."""
    app = ostinato.App("t", coordinator="memory://decl")

    @app.loop
    def plain(ctx: Pass) -> None: ...

    @app.loop(every="2s", lease="5s", timeout=timedelta(seconds=1), stall_after="1m")
    async def rated(ctx: Pass) -> None: ...

    @app.loop(pause=0.25, idle=("10ms", "1s"), error_backoff=(1, 30))
    def paced(ctx: Pass) -> None: ...

    @app.loop(cron="*/5 * * * *", name="calendar")
    def by_cron(ctx: Pass) -> None: ...

    assert list(app.loops) == ["plain", "rated", "paced", "calendar"]
    assert not app.loops["plain"].is_async
    assert app.loops["rated"].is_async
    assert app.loops["rated"].pacing.every == 2.0
    assert app.loops["rated"].timeout == 1.0
    assert app.loops["paced"].pacing.idle == (0.01, 1.0)
    assert app.loops["calendar"].pacing.cron == "*/5 * * * *"
    assert app.loops["plain"].lease == 10.0


@pytest.mark.parametrize(
    ("options", "field", "words"),
    [
        ({"every": "2x"}, "every", "unknown unit"),
        ({"pause": "-1s"}, "pause", "not a duration"),
        ({"every": "2s", "pause": "1s"}, "pause", "only one of"),
        ({"every": "2s", "cron": "* * * * *"}, "cron", "only one of"),
        ({"cron": "every day"}, "cron", "not a valid cron"),
        ({"every": 0}, "every", "more than zero"),
        ({"lease": "50ms"}, "lease", "too short"),
        ({"timeout": "0s"}, "timeout", "more than zero"),
        ({"idle": ("1s",)}, "idle", "pair"),
        ({"idle": ("5s", "1s")}, "idle", "more than max"),
        ({"stall_after": "soon"}, "stall_after", "not a duration"),
    ],
)
def test_bad_declarations_name_loop_and_field(options: dict[str, object], field: str, words: str) -> None:
    """A bad declaration fails at once, naming the loop, the field and the problem."""
    app = ostinato.App("t", coordinator="memory://decl")
    with pytest.raises(ostinato.DeclarationError) as info:

        @app.loop(**options)  # type: ignore[call-overload]
        def drain(ctx: Pass) -> None: ...

    message = str(info.value)
    assert message.startswith(f"loop 'drain', {field}=:")
    assert re.search(words, message)
    assert info.value.loop == "drain"
    assert info.value.field == field


def test_duplicate_loop_names_are_refused() -> None:
    """Two loops of one app cannot share a name."""
    app = ostinato.App("t", coordinator="memory://decl")
    app.loop(name="x")(lambda ctx: None)
    with pytest.raises(ostinato.ConfigurationError, match="already has a loop named 'x'"):
        app.loop(name="x")(lambda ctx: None)


def test_bad_app_name() -> None:
    """An app name must be usable as a key."""
    with pytest.raises(ostinato.ConfigurationError, match="bad app name"):
        ostinato.App("has space")


def test_idle_is_one_value() -> None:
    """IDLE is a singleton with a readable repr."""
    assert repr(ostinato.IDLE) == "ostinato.IDLE"
    assert type(ostinato.IDLE)() is ostinato.IDLE


def test_local_lease_holds_only_with_margin_on_the_monotonic_clock() -> None:
    """A lease holds while more than a tenth of its TTL is left, and never after a revoke."""
    lease = LocalLease(fence=3, ttl=10.0, sent_at=100.0)
    assert lease.deadline == pytest.approx(100.0 + 10.0 - 0.102)
    assert lease.holds(100.0)
    assert lease.holds(108.8)
    assert not lease.holds(109.0)
    lease.extend(105.0)
    assert lease.holds(113.0)
    lease.revoke()
    assert not lease.holds(100.0)


def test_pass_holds_follows_its_lease() -> None:
    """ctx.holds() turns false once the lease is revoked."""
    lease = LocalLease(fence=7, ttl=10.0, sent_at=time.monotonic())
    ctx = Pass("x", lease, 1, 0.0)
    assert ctx.fence == 7
    assert ctx.holds()
    lease.revoke()
    assert not ctx.holds()


def test_a_pass_can_be_built_by_hand() -> None:
    """A test of a loop body builds its Pass without a runner: it holds, and names its lease."""
    ctx = Pass("aggregate")
    assert (ctx.fence, ctx.number, ctx.holds()) == (1, 1, True)
    assert ctx.lease_name == "aggregate"
    ctx = Pass("aggregate", app="metrics", fence=42, number=3)
    assert (ctx.fence, ctx.number, ctx.lease_name) == (42, 3, "metrics:aggregate")
    assert repr(ctx) == "<Pass metrics:aggregate fence=42 number=3>"


def test_public_names() -> None:
    """The package exports exactly its documented public names."""
    assert set(ostinato.__all__) == {
        "IDLE", "App", "ConfigurationError", "Coordinator", "CoordinatorUnavailable",
        "DeclarationError", "MissingExtraError", "OstinatoError", "Pass", "StaleFence",
        "UnknownLoopError", "fenced", "from_url", "redis_fenced",
    }
    for name in ostinato.__all__:
        assert hasattr(ostinato, name)


def test_isolation_options() -> None:
    """isolation='process' with recycling bounds is accepted; sizes read in powers of 1024."""
    app = ostinato.App("t", coordinator="memory://decl")

    @app.loop(isolation="process", max_passes=100, max_memory="512MB")
    def heavy(ctx: Pass) -> None: ...

    spec = app.loops["heavy"]
    assert spec.isolated
    assert spec.max_passes == 100
    assert spec.max_memory == 512 * 2**20
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("800k") == 800 * 1024
    assert parse_size(4096) == 4096


@pytest.mark.parametrize(
    ("options", "field", "words"),
    [
        ({"isolation": "thread"}, "isolation", "not a mode"),
        ({"max_passes": 5}, "max_passes", "needs isolation='process'"),
        ({"max_memory": "1GB"}, "max_memory", "needs isolation='process'"),
        ({"isolation": "process", "max_passes": 0}, "max_passes", "whole number"),
        ({"isolation": "process", "max_memory": "lots"}, "max_memory", "not a size"),
        ({"isolation": "process", "max_memory": "0MB"}, "max_memory", "more than zero"),
    ],
)
def test_bad_isolation_options(options: dict[str, object], field: str, words: str) -> None:
    """Isolation options are checked at declaration, naming the loop and the field."""
    app = ostinato.App("t", coordinator="memory://decl")
    with pytest.raises(ostinato.DeclarationError, match=words) as info:
        app.loop(name="iso", **options)(lambda ctx: None)  # type: ignore[call-overload]
    assert info.value.field == field


def test_locate_names_the_app_for_child_processes() -> None:
    """An app defined at module level can be found again by child processes."""
    from tests.isolation import isoapp

    assert isoapp.app.locate().endswith("tests/isolation/isoapp.py:app") or (
        isoapp.app.locate() == "tests.isolation.isoapp:app"
    )
    orphan = ostinato.App("orphan")
    with pytest.raises(ostinato.ConfigurationError, match="importable by child processes"):
        orphan.locate()
