"""What only the Redis coordinator promises: fences that survive a wiped server,
secret-free errors, fast failure and a subscription that outlives its connection."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ostinato.coordinators import Coordinator, Denied, Event, Grant, Renewal, RunnerInfo, from_url
from ostinato.errors import CoordinatorUnavailable
from tests.servers import ThrowawayRedis, redis_url

pytestmark = pytest.mark.backend

KEY = "app:loop"
MakeRedis = Callable[[], Awaitable["RedisCoordinator"]]

if TYPE_CHECKING:  # at run time it needs the redis extra, which redis_url() checks first
    from ostinato.coordinators.redis import RedisCoordinator


def runner(n: int) -> RunnerInfo:
    return RunnerInfo(id=f"runner-{n}-{time.monotonic_ns()}", host="test", pid=2000 + n)


@pytest.fixture
async def make() -> AsyncIterator[MakeRedis]:
    url = f"{redis_url()}?prefix=test-{uuid.uuid4().hex[:10]}"
    from ostinato.coordinators.redis import RedisCoordinator

    opened: list[RedisCoordinator] = []

    async def factory() -> RedisCoordinator:
        coordinator = from_url(url)
        assert isinstance(coordinator, RedisCoordinator)
        await coordinator.open()
        opened.append(coordinator)
        return coordinator

    yield factory
    for coordinator in opened:
        await coordinator.close()
    if opened:
        await opened[0].drop_everything()


async def test_fence_never_goes_backwards_when_the_keys_vanish(make: MakeRedis) -> None:
    """A server that lost every key (restart without persistence) still grants greater fences."""
    a, b = await make(), await make()
    ra, rb = runner(1), runner(2)
    fences = []
    for _ in range(3):
        grant = await a.acquire(KEY, ra, 30.0)
        assert isinstance(grant, Grant)
        fences.append(grant.fence)
    assert isinstance(await b.acquire(KEY, rb, 30.0), Denied)
    await a.drop_everything()  # what a restart without persistence leaves: nothing
    assert (await a.renew(ra, {KEY: (fences[-1], 30.0)}))[KEY] is Renewal.LOST
    after = await b.acquire(KEY, rb, 30.0)
    assert isinstance(after, Grant)
    assert after.fence > max(fences)
    assert fences == sorted(set(fences))


async def test_fence_is_seeded_from_the_server_clock(make: MakeRedis) -> None:
    """A loop's first fence is the server's time in microseconds, so a later seed is greater."""
    a = await make()
    before = time.time_ns() // 1000
    grant = await a.acquire(KEY, runner(1), 5.0)
    assert isinstance(grant, Grant)
    # Local and server clocks are the same host's here; allow a second of slack.
    assert abs(grant.fence - before) < 1_000_000


async def test_password_never_appears_in_errors() -> None:
    """An unreachable server's error names the URL with the password replaced by ***."""
    coordinator = from_url("redis://bob:s3cret-pw@127.0.0.1:1/0?prefix=x")
    assert "s3cret-pw" not in coordinator.display_url
    with pytest.raises(CoordinatorUnavailable) as caught:
        await coordinator.acquire(KEY, runner(1), 5.0)
    message = str(caught.value)
    assert "s3cret-pw" not in message
    assert "redis://bob:***@127.0.0.1:1/0" in message
    await coordinator.close()


@pytest.fixture
async def silent_url() -> AsyncIterator[str]:
    """A server that accepts connections and never says a word."""
    writers: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda r, w: writers.append(w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"redis://127.0.0.1:{port}/0?timeout=0.3"
    for writer in writers:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_unreachable_server_fails_fast() -> None:
    """Every call to a closed port raises CoordinatorUnavailable at once, not after retries."""
    await _every_call_fails_within(from_url("redis://127.0.0.1:1/0"), 0.5)


async def test_silent_server_fails_within_the_timeout(silent_url: str) -> None:
    """A server that never replies makes each call fail after the URL's timeout, not later."""
    await _every_call_fails_within(from_url(silent_url), 0.9)


async def _every_call_fails_within(coordinator: Coordinator, seconds: float) -> None:
    calls: list[Callable[[], Awaitable[object]]] = [
        coordinator.open,
        lambda: coordinator.acquire(KEY, runner(1), 5.0),
        lambda: coordinator.renew(runner(1), {KEY: (1, 5.0)}),
        lambda: coordinator.report(runner(1), 5.0, []),
        coordinator.loops,
        lambda: coordinator.publish(Event("wake", KEY)),
        lambda: coordinator.subscribe(runner(1), lambda event: None),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(CoordinatorUnavailable):
            await call()
        assert time.monotonic() - started < seconds
    await coordinator.close()


async def test_denied_expires_in_counts_from_the_standbys_first_sighting(make: MakeRedis) -> None:
    """A standby is told to look again once it has seen the claim unchanged for the
    holder's TTL, whatever the server's clock says is left; a renewal starts it again."""
    a, b = await make(), await make()
    ra = runner(1)
    grant = await a.acquire(KEY, ra, 2.0)
    assert isinstance(grant, Grant)
    await asyncio.sleep(0.5)
    denied = await b.acquire(KEY, runner(2), 30.0)  # the holder's TTL counts, not this one
    assert isinstance(denied, Denied)
    assert denied.expires_in is not None
    assert 1.95 < denied.expires_in < 2.1
    await asyncio.sleep(0.3)
    again = await b.acquire(KEY, runner(2), 30.0)
    assert isinstance(again, Denied)
    assert again.expires_in is not None
    assert 1.65 < again.expires_in < 1.8
    assert (await a.renew(ra, {KEY: (grant.fence, 2.0)}))[KEY] is Renewal.HELD
    renewed = await b.acquire(KEY, runner(2), 30.0)
    assert isinstance(renewed, Denied)
    assert renewed.expires_in is not None
    assert renewed.expires_in > 1.95


async def test_a_standby_judges_expiry_on_its_own_clock_not_the_servers(make: MakeRedis) -> None:
    """A claim the server's clock calls ended (as after that clock stepped forward) is
    refused to a standby until the standby itself has seen it unchanged for its TTL; the
    holder's renewal is refused too, so it stops rather than runs on."""
    a, b = await make(), await make()
    ra, rb = runner(1), runner(2)
    grant = await a.acquire(KEY, ra, 60.0)
    assert isinstance(grant, Grant)
    admin = a._make_client(2.0)
    try:
        seconds, micros = await admin.time()
        await admin.hset(f"{a.prefix}:lease:{KEY}", "ends", str(seconds * 1000 + micros // 1000 - 30_000))
    finally:
        await admin.aclose()
    denied = await b.acquire(KEY, rb, 60.0)
    assert isinstance(denied, Denied)
    assert denied.holder == ra.label
    assert denied.expires_in is not None
    assert denied.expires_in > 59
    assert isinstance(await b.acquire(KEY, rb, 60.0), Denied)
    assert (await a.renew(ra, {KEY: (grant.fence, 60.0)}))[KEY] is Renewal.LOST
    assert not [r for r in await b.loops() if r.key == KEY and r.holder is not None]


async def test_a_claim_seen_unchanged_for_its_ttl_is_taken(make: MakeRedis) -> None:
    """A holder that stopped renewing loses its lease to a standby that watched it for the
    TTL, with a greater fence, and its late renewal is refused."""
    a, b = await make(), await make()
    ra, rb = runner(1), runner(2)
    grant = await a.acquire(KEY, ra, 0.4)
    assert isinstance(grant, Grant)
    first = await b.acquire(KEY, rb, 0.4)
    assert isinstance(first, Denied)
    assert first.expires_in is not None
    await asyncio.sleep(first.expires_in)
    taken = await b.acquire(KEY, rb, 0.4)
    assert isinstance(taken, Grant)
    assert taken.fence > grant.fence
    assert (await a.renew(ra, {KEY: (grant.fence, 0.4)}))[KEY] is Renewal.LOST


async def test_subscription_survives_a_dropped_connection(make: MakeRedis) -> None:
    """When the server drops the pub/sub connection, the subscriber reconnects and hears again."""
    a, b = await make(), await make()
    got: asyncio.Queue[Event] = asyncio.Queue()
    await b.subscribe(runner(2), got.put_nowait)
    admin = a._make_client(2.0)
    try:
        clients = await admin.client_list(_type="pubsub")
        ours = [c["id"] for c in clients if c.get("name") == f"ostinato:{b.prefix}"]
        assert ours
        for client_id in ours:
            await admin.client_kill_filter(_id=client_id)
    finally:
        await admin.aclose()
    missed = False
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        await a.publish(Event("wake", KEY))
        try:
            event = await asyncio.wait_for(got.get(), 0.2)
            while event.kind == "missed":  # the subscriber hears that it may have missed some
                missed = True
                event = await asyncio.wait_for(got.get(), 0.2)
            assert event == Event("wake", KEY)
            break
        except TimeoutError:
            continue
    else:
        pytest.fail("no event arrived after the subscriber's connection was killed")
    assert missed, "no 'missed' event after the events connection came back"


async def test_events_arrive_within_milliseconds(make: MakeRedis) -> None:
    """A published event reaches a subscriber at once, not on a polling tick."""
    a, b = await make(), await make()
    got: asyncio.Queue[Event] = asyncio.Queue()
    await b.subscribe(runner(2), got.put_nowait)
    started = time.monotonic()
    await a.publish(Event("released", KEY))
    assert await asyncio.wait_for(got.get(), 1.0) == Event("released", KEY)
    assert time.monotonic() - started < 0.05


async def test_a_restarted_server_grants_no_lease_it_forgot_at_once(tmp_path: Path) -> None:
    """A server up for less than RESTART_QUIET grants no lease whose fence it must seed:
    a holder of a lease it forgot must have stopped first."""
    from ostinato.coordinators.redis import RESTART_QUIET

    server = ThrowawayRedis(tmp_path)
    started = server.start()
    coordinator = from_url(server.url)
    try:
        await coordinator.open()
        first = await coordinator.acquire(KEY, runner(1), 30.0)
        assert isinstance(first, Denied), "granted by a server that had just started"
        assert first.expires_in is not None
        assert 0 < first.expires_in <= 1.0
        while not isinstance(answer := await coordinator.acquire(KEY, runner(1), 30.0), Grant):
            assert isinstance(answer, Denied)
            assert time.monotonic() - started < 10, "never granted"
            await asyncio.sleep(answer.expires_in or 0.1)
        assert time.monotonic() - started >= RESTART_QUIET
    finally:
        await coordinator.close()
        server.stop()


async def test_a_holder_is_told_at_once_when_the_server_goes_away(tmp_path: Path) -> None:
    """The events connection dropping tells the runner to stop the passes of the leases it
    holds (``dropped``), long before a renewal could; loops it does not hold are left alone."""
    server = ThrowawayRedis(tmp_path)
    server.start()
    coordinator = from_url(server.url)
    got: asyncio.Queue[Event] = asyncio.Queue()
    try:
        await coordinator.open()
        await coordinator.subscribe(runner(1), got.put_nowait)
        deadline = time.monotonic() + 10
        while not isinstance(await coordinator.acquire(KEY, runner(1), 30.0), Grant):
            assert time.monotonic() < deadline, "never granted"
            await asyncio.sleep(0.1)
        await coordinator.publish(Event("wake", "app:other"))
        assert await asyncio.wait_for(got.get(), 5.0) == Event("wake", "app:other")
        server.kill()
        assert await asyncio.wait_for(got.get(), 5.0) == Event("dropped", KEY)
        await asyncio.sleep(0.2)
        assert got.empty()
    finally:
        await coordinator.close()
        server.stop()


async def granting(server: ThrowawayRedis) -> None:
    """Wait until a freshly started ``server`` grants leases (its restart quiet is over)."""
    probe = from_url(server.url)
    try:
        deadline = time.monotonic() + 10
        while not isinstance(await probe.acquire("app:probe", runner(9), 1.0), Grant):
            assert time.monotonic() < deadline, "never granted"
            await asyncio.sleep(0.1)
    finally:
        await probe.close()


Own = tuple[ThrowawayRedis, Coordinator, "asyncio.Queue[Event]"]


@pytest.fixture
async def own(tmp_path: Path) -> AsyncIterator[Own]:
    """A Redis server of the test's own (to kill), a coordinator on it and the queue its
    runner's events would go to."""
    server = ThrowawayRedis(tmp_path)
    server.start()
    coordinator = from_url(server.url)
    try:
        yield server, coordinator, asyncio.Queue()
    finally:
        await coordinator.close()
        server.stop()


async def test_a_grant_answered_as_the_server_went_away_is_asked_for_again(
    own: Own, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A grant whose reply arrives after the events connection dropped may come from a server
    that forgot it: it is not taken as held."""
    server, coordinator, got = own
    events = coordinator._events  # type: ignore[attr-defined]
    await granting(server)
    await coordinator.subscribe(runner(1), got.put_nowait)
    real_ask = coordinator._ask_many  # type: ignore[attr-defined]

    async def ask_then_lose_the_server(*args: object, **kwargs: object) -> object:
        answer = await real_ask(*args, **kwargs)
        generation = events.generation
        server.kill()
        deadline = time.monotonic() + 5
        while events.generation == generation:
            assert time.monotonic() < deadline, "the events connection never dropped"
            await asyncio.sleep(0.01)
        return answer

    monkeypatch.setattr(coordinator, "_ask_many", ask_then_lose_the_server)
    answer = await coordinator.acquire(KEY, runner(1), 30.0)
    assert isinstance(answer, Denied)


async def restart_unseen(server: ThrowawayRedis, coordinator: Coordinator,
                         got: asyncio.Queue[Event]) -> Callable[[], Awaitable[object]]:
    """Subscribe, then restart the server while the events connection is kept from
    reconnecting. Returns the feed's own reopen, for the test to put back."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    events = coordinator._events  # type: ignore[attr-defined]
    await granting(server)
    await coordinator.subscribe(runner(1), got.put_nowait)
    reopen: Callable[[], Awaitable[object]] = events._reopen

    async def refused() -> object:
        raise RedisConnectionError("refused by the test")

    events._reopen = refused
    server.kill()
    await until_events(events, connected=False)
    server.start()
    await granting(server)
    return reopen


async def until_events(events: object, *, connected: bool) -> None:
    deadline = time.monotonic() + 5
    while events.connected != connected:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, f"the events connection never became {connected=}"
        await asyncio.sleep(0.01)


async def test_a_grant_made_while_events_were_down_is_dropped_when_they_return(own: Own) -> None:
    """A lease granted while the events connection was down may be from a server that
    restarted unseen: once the connection is back, the runner is told ``dropped``."""
    server, coordinator, got = own
    events = coordinator._events  # type: ignore[attr-defined]
    reopen = await restart_unseen(server, coordinator, got)
    grant = await coordinator.acquire(KEY, runner(1), 30.0)
    assert isinstance(grant, Grant)
    assert got.empty()
    events._reopen = reopen
    events.kick()
    assert await asyncio.wait_for(got.get(), 10.0) == Event("dropped", KEY)


async def test_a_grant_answered_as_events_came_back_is_asked_for_again(
    own: Own, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A grant asked for while the events connection was down, and answered after it came
    back, may come from a server that restarted unseen: it is not taken as held."""
    server, coordinator, got = own
    events = coordinator._events  # type: ignore[attr-defined]
    reopen = await restart_unseen(server, coordinator, got)
    real_ask = coordinator._ask_many  # type: ignore[attr-defined]

    async def ask_then_let_events_back(*args: object, **kwargs: object) -> object:
        answer = await real_ask(*args, **kwargs)
        events._reopen = reopen
        events.kick()
        await until_events(events, connected=True)
        return answer

    monkeypatch.setattr(coordinator, "_ask_many", ask_then_let_events_back)
    assert isinstance(await coordinator.acquire(KEY, runner(1), 30.0), Denied)


async def test_a_dead_holder_on_this_host_is_overtaken_at_once(make: MakeRedis) -> None:
    """A holder whose runner process died on this host loses its lease long before the TTL:
    its liveness lock is free. While it lives (even stopped), it keeps the lease."""
    import os
    import signal

    from ostinato.coordinators.liveness import host_folder

    runner_id = f"dead-{uuid.uuid4().hex}"
    lock_file = host_folder() / f"{runner_id}.lock"
    holder = _liveness_lock_holder(lock_file)
    try:
        a, b = await make(), await make()
        ra, rb = RunnerInfo(id=runner_id, host="test", pid=holder.pid), runner(2)
        a.locks.hold = lambda runner_id: None  # type: ignore[method-assign]  # the process holds it
        got: asyncio.Queue[Event] = asyncio.Queue()
        await b.subscribe(rb, got.put_nowait)
        grant = await a.acquire(KEY, ra, 60.0)
        assert isinstance(grant, Grant)
        assert isinstance(await b.acquire(KEY, rb, 60.0), Denied)
        os.kill(holder.pid, signal.SIGSTOP)  # stopped is not dead
        assert isinstance(await b.acquire(KEY, rb, 60.0), Denied)
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        assert await asyncio.wait_for(got.get(), 5.0) == Event("released", KEY)
        taken = await b.acquire(KEY, rb, 60.0)
        assert isinstance(taken, Grant)
        assert taken.fence > grant.fence
        assert (await a.renew(ra, {KEY: (grant.fence, 60.0)}))[KEY] is Renewal.LOST
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
        lock_file.unlink(missing_ok=True)


def _liveness_lock_holder(lock_file: Path) -> subprocess.Popen[bytes]:
    """A process standing for a runner: it holds its liveness lock, as a runner does."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, time\n"
         f"os.makedirs({str(lock_file.parent)!r}, mode=0o700, exist_ok=True)\n"
         f"fd = os.open({str(lock_file)!r}, os.O_RDWR | os.O_CREAT, 0o644)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(600)"],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == b"locked\n"
    return holder


async def test_a_holder_on_another_host_waits_out_its_ttl(make: MakeRedis) -> None:
    """A holder this host has no liveness lock of is never taken for dead."""
    a, b = await make(), await make()
    ra = RunnerInfo(id=f"elsewhere-{uuid.uuid4().hex}", host="far", pid=999999)
    a.locks.hold = lambda runner_id: None  # type: ignore[method-assign]  # not on this host
    assert isinstance(await a.acquire(KEY, ra, 60.0), Grant)
    denied = await b.acquire(KEY, runner(2), 60.0)
    assert isinstance(denied, Denied)
    assert denied.expires_in is not None
    assert denied.expires_in > 50


async def test_leases_are_granted_without_a_liveness_folder(
    make: MakeRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A liveness folder that cannot be created costs only the fast same-host failover."""
    a = await make()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    a.locks.folder = blocker / "runners"
    assert isinstance(await a.acquire(KEY, runner(1), 30.0), Grant)
    assert "no liveness lock in" in caplog.text


async def test_a_lease_handed_over_is_never_seen_free(make: MakeRedis) -> None:
    """A hand-over is one step on the server: a reader of status between links (a chain
    on job workers) never sees the loop without a holder."""
    a, reader = await make(), await make()
    owner = runner(1)
    grant = await a.acquire(KEY, owner, 5.0)
    assert isinstance(grant, Grant)
    fence, seen, done = grant.fence, [], asyncio.Event()

    async def read() -> None:
        while not done.is_set():
            seen.extend(record.holder for record in await reader.loops() if record.key == KEY)

    reading = asyncio.create_task(read())
    for n in range(300):
        heir = runner(n + 2)
        passed = await a.hand_over(KEY, owner, fence, heir, 5.0)
        assert isinstance(passed, Grant)
        owner, fence = heir, passed.fence
        await asyncio.sleep(0)
    done.set()
    await reading
    assert len(seen) >= 50, len(seen)
    assert None not in seen, f"{seen.count(None)} of {len(seen)} reads saw no holder"


async def test_a_renewal_does_not_wait_for_the_connections_other_calls_hold(make: MakeRedis) -> None:
    """Renewals have a client of their own: a renewal never goes through the shared one,
    whose connections other calls hold (each waiting out added latency, or a new
    connection's handshake round trips)."""
    coordinator = await make()
    ra = runner(1)
    grant = await coordinator.acquire("app:loop", ra, 5.0)
    assert isinstance(grant, Grant)
    assert await coordinator.renew(ra, {"app:loop": (grant.fence, 5.0)}) == {"app:loop": Renewal.HELD}

    def pipeline(*args: object, **kwargs: object) -> object:
        raise AssertionError("a renewal used the shared client")

    original = coordinator._client.pipeline
    coordinator._client.pipeline = pipeline  # type: ignore[method-assign]
    try:
        answer = await asyncio.wait_for(coordinator.renew(ra, {"app:loop": (grant.fence, 5.0)}), 1.0)
    finally:
        coordinator._client.pipeline = original  # type: ignore[method-assign]
    assert answer == {"app:loop": Renewal.HELD}
