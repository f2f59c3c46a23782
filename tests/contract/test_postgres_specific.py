"""What only the PostgreSQL coordinator promises: fast failover through advisory
locks (never on their word alone), safe concurrent schema creation, fast and
secret-free failure."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest

from ostinato.coordinators import (
    Coordinator,
    Denied,
    Event,
    Grant,
    LoopStats,
    Renewal,
    RunnerInfo,
    from_url,
)
from ostinato.errors import CoordinatorUnavailable
from tests.servers import postgres_url

if TYPE_CHECKING:  # at run time it needs the postgres extra, which postgres_url() checks first
    from ostinato.coordinators.postgres import PostgresCoordinator

pytestmark = pytest.mark.backend

KEY = "app:loop"
MakePostgres = Callable[[], Awaitable["PostgresCoordinator"]]


def runner(n: int) -> RunnerInfo:
    return RunnerInfo(id=f"runner-{n}-{time.monotonic_ns()}", host="test", pid=3000 + n)


@pytest.fixture
def url() -> str:
    return f"{postgres_url()}?schema=test_{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def make(url: str) -> AsyncIterator[MakePostgres]:
    from ostinato.coordinators.postgres import PostgresCoordinator

    opened: list[PostgresCoordinator] = []

    async def factory() -> PostgresCoordinator:
        coordinator = from_url(url)
        assert isinstance(coordinator, PostgresCoordinator)
        await coordinator.open()
        opened.append(coordinator)
        return coordinator

    yield factory
    for coordinator in opened:
        await coordinator.close()
    if opened:
        await opened[0].drop_everything()


async def admin(statement: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run one statement on a connection of the test's own."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(postgres_url(), autocommit=True) as conn:
        cursor = await conn.execute(statement, params)
        return await cursor.fetchall() if cursor.description else []


async def lock_holders(schema: str, key: str) -> list[int]:
    """The backend pids holding the advisory lock of ``key``."""
    from ostinato.coordinators.postgres import lock_id

    lock = lock_id(schema, key) & 0xFFFFFFFFFFFFFFFF
    rows = await admin(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
        " AND classid::bigint = %s AND objid::bigint = %s",
        lock >> 32, lock & 0xFFFFFFFF,
    )
    return [row[0] for row in rows]


async def until_lock_free(schema: str, key: str) -> None:
    """Wait for the server to finish ending a closed session that held the lock of ``key``."""
    deadline = time.monotonic() + 5.0
    while await lock_holders(schema, key):
        assert time.monotonic() < deadline, "the lock was never freed"
        await asyncio.sleep(0.01)


async def kill_holder_session(schema: str, key: str) -> None:
    """End the server session holding the lock of ``key``, as a killed runner's would end."""
    [pid] = await lock_holders(schema, key)
    await admin("SELECT pg_terminate_backend(%s)", pid)
    await until_lock_free(schema, key)


async def renew_after_session_loss(
    coordinator: PostgresCoordinator, who: RunnerInfo, fence: int
) -> Renewal:
    """The first renewal after the server ended the holder's session: LOST, or unreachable
    if the coordinator had not yet noticed the closed connection (the same to a runner)."""
    try:
        return (await coordinator.renew(who, {KEY: (fence, 60.0)}))[KEY]
    except CoordinatorUnavailable:
        return Renewal.LOST


async def take_after_quiet(coordinator: PostgresCoordinator, who: RunnerInfo) -> Grant:
    """Take over a lease whose holder's lock was just freed: refused until the lock has
    been free for the quiet its row asks for, granted right after."""
    from ostinato.coordinators.quiet import MIN_QUIET

    first = await coordinator.acquire(KEY, who, 60.0)
    assert isinstance(first, Denied), "taken before the holder's lock had been free for a while"
    assert first.expires_in is not None
    assert 0 < first.expires_in <= MIN_QUIET
    await asyncio.sleep(first.expires_in)
    taken = await coordinator.acquire(KEY, who, 60.0)
    assert isinstance(taken, Grant)
    return taken


async def test_killed_holder_connection_lets_a_standby_take_over_at_once(make: MakePostgres) -> None:
    """A holder whose session ends is overtaken long before its TTL (once its lock has been
    free for a moment), and its stats are kept."""
    a, b = await make(), await make()
    ra, rb = runner(1), runner(2)
    grant = await a.acquire(KEY, ra, 60.0)
    assert isinstance(grant, Grant)
    await a.report(ra, 60.0, [LoopStats(KEY, passes=7, errors=1)])
    assert isinstance(await b.acquire(KEY, rb, 60.0), Denied)
    await kill_holder_session(a.schema, KEY)
    started = time.monotonic()
    taken = await take_after_quiet(b, rb)
    assert taken.fence > grant.fence
    assert time.monotonic() - started < 1.0
    [record] = [r for r in await b.loops() if r.key == KEY]
    assert (record.passes, record.errors, record.holder) == (7, 1, rb.label)
    assert await renew_after_session_loss(a, ra, grant.fence) is Renewal.LOST
    assert (await a.renew(ra, {KEY: (grant.fence, 60.0)}))[KEY] is Renewal.LOST


async def test_standby_hears_released_when_the_holder_session_ends(make: MakePostgres) -> None:
    """A refused standby is told ``released`` the moment the holder's session ends."""
    a, b = await make(), await make()
    got: asyncio.Queue[Event] = asyncio.Queue()
    await b.subscribe(runner(2), got.put_nowait)
    assert isinstance(await a.acquire(KEY, runner(1), 60.0), Grant)
    assert isinstance(await b.acquire(KEY, runner(2), 60.0), Denied)
    await asyncio.sleep(0.2)  # the standby's waiter is queued behind the holder's lock
    await kill_holder_session(a.schema, KEY)
    freed = time.monotonic()
    assert await asyncio.wait_for(got.get(), 2.0) == Event("released", KEY)
    from ostinato.coordinators.quiet import MIN_QUIET

    assert time.monotonic() - freed >= MIN_QUIET / 2  # announced once the lock stayed free
    assert isinstance(await b.acquire(KEY, runner(2), 60.0), Grant)  # no second wait


async def test_a_standby_waiting_on_a_holder_never_holds_a_snapshot_for_long(
    make: MakePostgres,
) -> None:
    """A running statement holds a snapshot, and while it runs VACUUM keeps every row
    version the database discards: a standby's wait for its holder (which can last days)
    is a statement of at most ``WAIT_SLICE`` at a time, and it still hears the holder go."""
    from ostinato.coordinators.postgres import lock_id
    from ostinato.coordinators.postgres_standbys import WAIT_SLICE

    a, b = await make(), await make()
    lock = lock_id(a.schema, KEY) & 0xFFFFFFFFFFFFFFFF
    got: asyncio.Queue[Event] = asyncio.Queue()
    await b.subscribe(runner(2), got.put_nowait)
    assert isinstance(await a.acquire(KEY, runner(1), 60.0), Grant)
    assert isinstance(await b.acquire(KEY, runner(2), 60.0), Denied)
    oldest, waits = 0.0, set()
    deadline = time.monotonic() + 3 * WAIT_SLICE
    while time.monotonic() < deadline:
        for pid, age, xmin in await admin(
            "SELECT a.pid, extract(epoch FROM clock_timestamp() - a.query_start)::float8,"
            " a.backend_xmin FROM pg_stat_activity AS a JOIN pg_locks AS l ON l.pid = a.pid"
            " WHERE a.state = 'active' AND l.locktype = 'advisory' AND NOT l.granted"
            " AND l.classid::bigint = %s AND l.objid::bigint = %s",
            lock >> 32, lock & 0xFFFFFFFF,
        ):
            waits.add(pid)
            assert xmin is not None  # it is the statement that holds the snapshot
            oldest = max(oldest, age)
        await asyncio.sleep(0.05)
    assert waits, "the standby never waited for the holder's lock"
    assert oldest < WAIT_SLICE + 0.5
    await kill_holder_session(a.schema, KEY)
    assert await asyncio.wait_for(got.get(), 2.0) == Event("released", KEY)


async def test_renewals_go_first_and_lease_requests_last() -> None:
    """On a busy connection, a renewal goes before reports, and both before lease requests
    that were waiting longer."""
    from ostinato.coordinators.postgres_connections import RENEWAL, REQUEST, URGENT, Link

    link, order = Link("test"), []
    gate = asyncio.Event()

    async def use(name: str, priority: int) -> None:
        async with link.turn(priority):
            order.append(name)
            if name == "first":
                await gate.wait()

    first = asyncio.create_task(use("first", REQUEST))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(use(f"request-{n}", REQUEST)) for n in range(3)]
    await asyncio.sleep(0)
    report = asyncio.create_task(use("report", URGENT))
    cancelled = asyncio.create_task(use("gave-up", RENEWAL))
    renewal = asyncio.create_task(use("renewal", RENEWAL))
    await asyncio.sleep(0)
    cancelled.cancel()
    gate.set()
    await asyncio.gather(first, report, renewal, *waiting, return_exceptions=True)
    assert order == ["first", "renewal", "report", "request-0", "request-1", "request-2"]


async def test_renewal_fails_once_the_holder_session_was_replaced(make: MakePostgres) -> None:
    """A holder whose connection dropped cannot renew on a new one: it no longer holds the lock."""
    a = await make()
    ra = runner(1)
    grant = await a.acquire(KEY, ra, 60.0)
    assert isinstance(grant, Grant)
    await kill_holder_session(a.schema, KEY)
    assert await renew_after_session_loss(a, ra, grant.fence) is Renewal.LOST
    assert (await a.renew(ra, {KEY: (grant.fence, 60.0)}))[KEY] is Renewal.LOST
    again = await a.acquire(KEY, ra, 60.0)
    assert isinstance(again, Grant)
    assert again.fence > grant.fence
    assert len(await lock_holders(a.schema, KEY)) == 1


async def test_holder_without_the_lock_is_not_overtaken(make: MakePostgres) -> None:
    """A free lock alone never hands over a lease whose row does not record that lock."""
    import psycopg

    from ostinato.coordinators.postgres import lock_id

    a, b = await make(), await make()
    squatter = await psycopg.AsyncConnection.connect(postgres_url(), autocommit=True)
    try:
        await squatter.execute("SELECT pg_advisory_lock(%s)", [lock_id(a.schema, KEY)])
        grant = await a.acquire(KEY, runner(1), 60.0)
        assert isinstance(grant, Grant)  # granted, but without the lock
    finally:
        await squatter.close()
    await until_lock_free(a.schema, KEY)  # the lock is free now, yet the holder is alive
    denied = await b.acquire(KEY, runner(2), 60.0)
    assert isinstance(denied, Denied)
    assert denied.expires_in is not None
    assert denied.expires_in > 50


async def test_holder_takes_its_lock_at_renewal_once_free(make: MakePostgres) -> None:
    """A holder granted without its lock takes it when renewing, and from then on fails over fast."""
    import psycopg

    from ostinato.coordinators.postgres import lock_id

    a, b = await make(), await make()
    ra = runner(1)
    squatter = await psycopg.AsyncConnection.connect(postgres_url(), autocommit=True)
    try:
        await squatter.execute("SELECT pg_advisory_lock(%s)", [lock_id(a.schema, KEY)])
        grant = await a.acquire(KEY, ra, 60.0)
        assert isinstance(grant, Grant)
        assert (await a.renew(ra, {KEY: (grant.fence, 60.0)}))[KEY] is Renewal.HELD
    finally:
        await squatter.close()
    await until_lock_free(a.schema, KEY)
    assert (await a.renew(ra, {KEY: (grant.fence, 60.0)}))[KEY] is Renewal.HELD
    await kill_holder_session(a.schema, KEY)
    await take_after_quiet(b, runner(2))


async def test_holder_asking_again_keeps_its_lock_under_the_new_fence(
    make: MakePostgres,
) -> None:
    """A holder granted its lease again renews under the new fence and still fails over fast."""
    a, b = await make(), await make()
    ra = runner(1)
    first = await a.acquire(KEY, ra, 60.0)
    again = await a.acquire(KEY, ra, 60.0)
    assert isinstance(first, Grant)
    assert isinstance(again, Grant)
    assert again.fence > first.fence
    assert (await a.renew(ra, {KEY: (again.fence, 60.0)}))[KEY] is Renewal.HELD
    assert len(await lock_holders(a.schema, KEY)) == 1
    await kill_holder_session(a.schema, KEY)
    await take_after_quiet(b, runner(2))


async def test_grant_stands_without_its_lock_when_the_lease_connection_fails(
    make: MakePostgres, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A grant whose lock cannot be taken (no lease connection) is kept, and its renewal
    takes the lock once the server can be reached again."""
    import psycopg

    a, b = await make(), await make()
    ra = runner(1)
    real_connect = a._connect

    async def refused(statement_timeout: float | None = None) -> Any:
        raise psycopg.OperationalError("connection refused")

    monkeypatch.setattr(a, "_connect", refused)
    grant = await a.acquire(KEY, ra, 60.0)
    assert isinstance(grant, Grant)
    assert await lock_holders(a.schema, KEY) == []
    denied = await b.acquire(KEY, runner(2), 60.0)
    assert isinstance(denied, Denied)  # held, lock or not
    monkeypatch.setattr(a, "_connect", real_connect)
    assert (await a.renew(ra, {KEY: (grant.fence, 60.0)}))[KEY] is Renewal.HELD
    assert len(await lock_holders(a.schema, KEY)) == 1


async def test_grant_whose_lock_reply_was_lost_is_not_taken(
    make: MakePostgres, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If the connection fails once the lock was asked for, the row may say "locked" while
    the lock went with the connection: the grant is not taken, and a standby may have it."""
    import psycopg

    a, b = await make(), await make()
    ra = runner(1)
    real_fetch = a._fetch

    async def fetch(conn: Any, name: str, params: dict[str, Any]) -> Any:
        row = await real_fetch(conn, name, params)
        if name == "mark":
            raise psycopg.OperationalError("the reply was lost")
        return row

    monkeypatch.setattr(a, "_fetch", fetch)
    with pytest.raises(CoordinatorUnavailable):
        await a.acquire(KEY, ra, 60.0)
    monkeypatch.setattr(a, "_fetch", real_fetch)
    await until_lock_free(a.schema, KEY)
    await take_after_quiet(b, runner(2))  # long before the 60 s lease would expire


def lose_lease_connection_during(
    coordinator: PostgresCoordinator, monkeypatch: pytest.MonkeyPatch,
    then: Callable[[], Awaitable[None]],
) -> None:
    """Make the next acquire's answer arrive just after the lease connection was lost."""
    real_fetch = coordinator._fetch

    async def fetch(conn: Any, name: str, params: dict[str, Any]) -> Any:
        row = await real_fetch(conn, name, params)
        if name == "acquire":
            monkeypatch.setattr(coordinator, "_fetch", real_fetch)
            from ostinato.coordinators.postgres import URGENT

            async with coordinator._lease.turn(URGENT):  # not under a heartbeat in flight
                coordinator._unwatch_idle()  # as a failing renewal on that connection does
                await coordinator._drop(coordinator._lease)
            await until_lock_free(coordinator.schema, KEY)
            await then()
        return row

    monkeypatch.setattr(coordinator, "_fetch", fetch)


async def test_regrant_after_the_lock_went_with_its_connection_takes_the_lock_again(
    make: MakePostgres, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A row granted as locked just as the lock was lost is locked again before it is used."""
    a, b = await make(), await make()
    ra = runner(1)
    assert isinstance(await a.acquire(KEY, ra, 60.0), Grant)

    async def nothing() -> None:
        pass

    lose_lease_connection_during(a, monkeypatch, nothing)
    again = await a.acquire(KEY, ra, 60.0)
    assert isinstance(again, Grant)
    assert len(await lock_holders(a.schema, KEY)) == 1
    assert (await a.renew(ra, {KEY: (again.fence, 60.0)}))[KEY] is Renewal.HELD
    await asyncio.sleep(0.4)  # longer than the quiet: the lock is not free, no takeover
    assert isinstance(await b.acquire(KEY, runner(2), 60.0), Denied)


async def test_regrant_whose_lock_is_gone_for_good_is_given_back(
    make: MakePostgres, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If that lock cannot be had again, the grant is given back rather than run unguarded."""
    import psycopg

    from ostinato.coordinators.postgres import lock_id

    a, b = await make(), await make()
    ra = runner(1)
    assert isinstance(await a.acquire(KEY, ra, 60.0), Grant)
    squatter = await psycopg.AsyncConnection.connect(postgres_url(), autocommit=True)

    async def squat() -> None:
        await squatter.execute("SELECT pg_advisory_lock(%s)", [lock_id(a.schema, KEY)])

    try:
        lose_lease_connection_during(a, monkeypatch, squat)
        assert isinstance(await a.acquire(KEY, ra, 60.0), Denied)
    finally:
        await squatter.close()
    [record] = [r for r in await b.loops() if r.key == KEY]
    assert record.holder is None
    assert isinstance(await b.acquire(KEY, runner(2), 60.0), Grant)


async def test_released_lease_frees_the_lock(make: MakePostgres) -> None:
    """Releasing a lease also releases its advisory lock, so nothing lingers on the server."""
    a = await make()
    ra = runner(1)
    grant = await a.acquire(KEY, ra, 60.0)
    assert isinstance(grant, Grant)
    assert len(await lock_holders(a.schema, KEY)) == 1
    assert await a.release(KEY, ra, grant.fence)
    assert await lock_holders(a.schema, KEY) == []


async def test_release_is_one_statement(
    make: MakePostgres, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A release (lock included) is one round trip on the lease connection: a renewal
    queued behind it on a slow link waits for one round trip, not two."""
    a = await make()
    ra = runner(1)
    grant = await a.acquire(KEY, ra, 60.0)
    assert isinstance(grant, Grant)
    real_run = a._run
    sent: list[str] = []

    async def counting(conn: Any, name: str, *args: Any, **kwargs: Any) -> Any:
        sent.append(name)
        return await real_run(conn, name, *args, **kwargs)

    monkeypatch.setattr(a, "_run", counting)
    assert await a.release(KEY, ra, grant.fence)
    assert sent == ["release"]
    assert await lock_holders(a.schema, KEY) == []
    assert not await a.release(KEY, ra, grant.fence)  # a second release finds nothing


async def test_subscription_survives_a_terminated_listener(make: MakePostgres) -> None:
    """When the server ends the LISTEN session, the subscriber reconnects and hears again."""
    a, b = await make(), await make()
    got: asyncio.Queue[Event] = asyncio.Queue()
    await b.subscribe(runner(2), got.put_nowait)
    rows = await admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = %s",
                       f'LISTEN "{b.channel}"')
    assert rows == [(True,)]
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
        pytest.fail("no event arrived after the listener's session was terminated")
    assert missed, "no 'missed' event after the events connection came back"


async def test_concurrent_first_use_creates_the_schema_once(url: str) -> None:
    """Five coordinators opening a fresh schema at the same moment all succeed."""
    coordinators = [from_url(url) for _ in range(5)]
    try:
        await asyncio.gather(*(c.open() for c in coordinators))
        answers = await asyncio.gather(
            *(c.acquire(KEY, runner(n), 5.0) for n, c in enumerate(coordinators))
        )
        assert sum(isinstance(answer, Grant) for answer in answers) == 1
    finally:
        for coordinator in coordinators:
            await coordinator.close()
        await coordinators[0].drop_everything()  # type: ignore[attr-defined]


async def test_unreachable_server_fails_fast_without_the_password() -> None:
    """A server that is not there raises CoordinatorUnavailable at once, password redacted."""
    coordinator: Coordinator = from_url("postgresql://postgres:s3cret-pw@127.0.0.1:1/test")
    assert "s3cret-pw" not in coordinator.display_url
    for call in (coordinator.open, coordinator.loops,
                 lambda: coordinator.acquire(KEY, runner(1), 5.0),
                 lambda: coordinator.subscribe(runner(1), lambda event: None)):
        started = time.monotonic()
        with pytest.raises(CoordinatorUnavailable) as caught:
            await call()
        assert time.monotonic() - started < 1.0
        assert "s3cret-pw" not in str(caught.value)
        assert "postgresql://postgres:***@127.0.0.1:1/test" in str(caught.value)
    await coordinator.close()


@pytest.mark.parametrize("delay", [0.0, 0.1], ids=["fast-link", "slow-link"])
async def test_holder_cut_off_before_its_session_ends_stops_before_a_standby_takes_over(
    url: str, make: MakePostgres, delay: float
) -> None:
    """A holder cut off from the server whose session the server then ends hears nothing, yet
    it stops starting passes (and is told ``unconfirmed``) before a standby may take its lease;
    on a slow link (0.1 s each way) it asks standbys for a longer quiet and still runs."""
    from urllib.parse import urlsplit, urlunsplit

    from ostinato.coordinators.postgres import PostgresCoordinator
    from ostinato.coordinators.quiet import BOUND_MARGIN, MIN_QUIET, window_for
    from ostinato.loop import LocalLease
    from tests.chaos.proxy import NORMAL, Mode, Proxy

    parts = urlsplit(url)
    proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    port = proxy.listen()
    proxy.set_mode(Mode(delay=delay), port)
    netloc = f"{parts.username}@127.0.0.1:{port}" if parts.username else f"127.0.0.1:{port}"
    holder = from_url(urlunsplit(parts._replace(netloc=netloc)))
    assert isinstance(holder, PostgresCoordinator)
    standby = await make()
    ra, rb = runner(1), runner(2)
    heard: list[tuple[float, Event]] = []
    released: asyncio.Queue[Event] = asyncio.Queue()
    try:
        await holder.subscribe(ra, lambda e: heard.append((time.monotonic(), e)))
        await standby.subscribe(rb, released.put_nowait)
        sent = time.monotonic()
        grant = await holder.acquire(KEY, ra, 60.0)
        assert isinstance(grant, Grant)
        lease = LocalLease(grant.fence, 60.0, sent, grant.bound)  # as a runner holds it
        if delay:
            await asyncio.sleep(1.0)  # round trips are timed, then a renewal asks for more quiet
            assert (await holder.renew(ra, {KEY: (grant.fence, 60.0)}))[KEY] is Renewal.HELD
        deadline = time.monotonic() + 2.0
        while not lease.holds():
            assert time.monotonic() < deadline, "the holder's session was never heard from"
            await asyncio.sleep(0.005)
        samples = []
        for _ in range(100):  # once heard from, it keeps running
            samples.append(lease.holds())
            await asyncio.sleep(0.01)
        assert all(samples), samples.count(False)
        [row] = await admin(f'SELECT quiet FROM "{holder.schema}".loops WHERE key = %s', KEY)  # noqa: S608
        quiet = float(row[0])
        assert quiet == MIN_QUIET if not delay else quiet > MIN_QUIET + 2 * delay
        assert isinstance(await standby.acquire(KEY, rb, 60.0), Denied)
        [pid] = await lock_holders(holder.schema, KEY)

        stopped: list[float] = []

        async def watch() -> None:  # when the holder would have started its last pass
            while lease.holds():  # noqa: ASYNC110 - sampling holds() is the measurement
                await asyncio.sleep(0.001)
            stopped.append(time.monotonic())

        watcher = asyncio.create_task(watch())
        cut = time.monotonic()
        proxy.set_mode(Mode(blackhole=True), port)
        await asyncio.sleep(0.5)
        await admin("SELECT pg_terminate_backend(%s)", pid)  # the server ends the silent session
        assert await asyncio.wait_for(released.get(), 5.0) == Event("released", KEY)
        while isinstance(taken := await standby.acquire(KEY, rb, 60.0), Denied):
            assert taken.expires_in is not None, taken  # the rest of the row's quiet
            await asyncio.sleep(taken.expires_in)
        taken_at = time.monotonic()
        assert taken.fence > grant.fence
        await asyncio.wait_for(watcher, 1.0)
        # The holder stopped on its own, a bounded time after the cut, well before the takeover.
        window = window_for(quiet)
        assert stopped[0] - cut <= window + 0.05
        assert taken_at - stopped[0] >= quiet - window + BOUND_MARGIN
        drops = [t for t, e in heard if e == Event("unconfirmed", KEY)]
        assert drops, heard
        assert drops[0] < taken_at
    finally:
        proxy.set_mode(NORMAL, port)
        await holder.close()
        proxy.close()


def test_a_standby_waits_longer_than_a_holder_trusts_a_silent_session() -> None:
    """The fast path's arithmetic, for round trips from nothing to a second: the quiet a
    holder asks for exceeds its window even on clocks 1% apart, and the window leaves room
    for two round trips and a beat before passes stop."""
    from ostinato.coordinators.clocks import drift_margin
    from ostinato.coordinators.quiet import BEAT, BOUND_MARGIN, MIN_QUIET, SLACK, quiet_for, window_for

    assert quiet_for(0.0) == MIN_QUIET
    assert window_for(MIN_QUIET) >= 0.3
    for rtt in (0.0, 0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.6, 1.0):
        quiet = quiet_for(rtt)
        window = window_for(quiet)
        assert window + drift_margin(window) + SLACK <= quiet + 1e-9
        assert window - BOUND_MARGIN >= 2 * rtt + BEAT
    assert quiet_for(0.2) > quiet_for(0.1) > MIN_QUIET


async def test_a_standby_judges_expiry_on_its_own_clock_not_the_servers(make: MakePostgres) -> None:
    """A claim the server's clock calls expired (as after that clock stepped forward) is
    refused to a standby until the standby itself has seen it unchanged for its TTL."""
    a, b = await make(), await make()
    ra, rb = runner(1), runner(2)
    grant = await a.acquire(KEY, ra, 60.0)
    assert isinstance(grant, Grant)
    await admin(f'UPDATE "{a.schema}".loops SET expires = clock_timestamp() - interval \'30 s\''  # noqa: S608
                " WHERE key = %s", KEY)
    denied = await b.acquire(KEY, rb, 60.0)
    assert isinstance(denied, Denied)
    assert denied.holder == ra.label
    assert denied.expires_in is not None
    assert denied.expires_in > 59  # the holder's whole TTL, from when the standby saw it
    assert isinstance(await b.acquire(KEY, rb, 60.0), Denied)


async def test_a_standby_takes_a_claim_it_saw_unchanged_for_its_ttl(make: MakePostgres) -> None:
    """Seen unchanged for the holder's TTL (not the standby's), a claim is taken; a renewal
    in between starts the count again."""
    a, b = await make(), await make()
    ra, rb = runner(1), runner(2)
    grant = await a.acquire(KEY, ra, 0.4)
    assert isinstance(grant, Grant)
    first = await b.acquire(KEY, rb, 30.0)
    assert isinstance(first, Denied)
    assert first.expires_in is not None
    assert 0.35 < first.expires_in < 0.5  # the holder's TTL counts
    await asyncio.sleep(0.2)
    assert (await a.renew(ra, {KEY: (grant.fence, 0.4)}))[KEY] is Renewal.HELD
    await asyncio.sleep(0.25)  # the first sighting is 0.45 s old, the renewed claim 0.25 s
    again = await b.acquire(KEY, rb, 30.0)
    assert isinstance(again, Denied)
    assert again.expires_in is not None
    assert again.expires_in > 0.1
    await asyncio.sleep(again.expires_in)
    taken = await b.acquire(KEY, rb, 30.0)
    assert isinstance(taken, Grant)
    assert taken.fence > grant.fence


async def test_leases_past_the_lock_budget_are_held_without_a_lock_or_a_session_bound(
    url: str, make: MakePostgres
) -> None:
    """``locks=1``: the first lease takes its advisory lock and fails over fast; the second
    is held with neither lock nor session bound, never takes a lock at renewal (it has no
    bound to keep), and is taken over only once it expires."""
    from ostinato.coordinators.postgres import PostgresCoordinator

    a = from_url(f"{url}&locks=1")
    assert isinstance(a, PostgresCoordinator)
    b = await make()
    ra, rb = runner(1), runner(2)
    try:
        first = await a.acquire("app:first", ra, 60.0)
        second = await a.acquire("app:second", ra, 60.0)
        assert isinstance(first, Grant)
        assert isinstance(second, Grant)
        assert first.bound is not None
        assert second.bound is None
        assert await lock_holders(a.schema, "app:first")
        leases = {"app:first": (first.fence, 60.0), "app:second": (second.fence, 60.0)}
        assert set((await a.renew(ra, leases)).values()) == {Renewal.HELD}
        assert await a.release("app:first", ra, first.fence)
        # Room in the budget now, yet the lease granted without a bound stays unlocked.
        assert (await a.renew(ra, {"app:second": (second.fence, 60.0)}))["app:second"] is Renewal.HELD
        assert not await lock_holders(a.schema, "app:second")
        again = await a.acquire("app:first", ra, 60.0)
        assert isinstance(again, Grant)
        assert again.bound is not None
        await kill_holder_session(a.schema, "app:first")
        denied = await b.acquire("app:second", rb, 60.0)
        assert isinstance(denied, Denied)
        assert denied.expires_in is not None
        assert denied.expires_in > 50
        waiting = await b.acquire("app:first", rb, 60.0)  # from now, the lock's quiet
        assert isinstance(waiting, Denied)
        assert waiting.expires_in is not None
        assert waiting.expires_in < 1.0
        await asyncio.sleep(waiting.expires_in)
        taken = await b.acquire("app:first", rb, 60.0)
        assert isinstance(taken, Grant)
        assert taken.fence > again.fence
    finally:
        await a.close()


def test_a_lock_budget_that_is_not_a_whole_number_is_refused(url: str) -> None:
    from ostinato.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="locks must be a whole number"):
        from_url(f"{url}&locks=many")


async def test_renewals_and_reports_of_many_loops_at_once_never_deadlock(make: MakePostgres) -> None:
    """A renewal (on the lease connection) and a report (on the other) each write hundreds
    of rows in one statement; taken in different orders, row locks deadlock and the server
    aborts one statement, which for a renewal loses every lease. Both lock in key order."""
    import random

    a = await make()
    ra = runner(1)
    keys = [f"app:l{i}" for i in range(400)]
    granted = await a.acquire_many(ra, dict.fromkeys(keys, 60.0))
    leases = {key: (answer.fence, 60.0) for key, answer in granted.items()
              if isinstance(answer, Grant)}
    assert len(leases) == len(keys)
    shuffled = random.Random(7)
    for _ in range(15):
        order = list(leases)
        shuffled.shuffle(order)
        stats = [LoopStats(key, passes=1) for key in reversed(order)]
        renewed, _ = await asyncio.gather(
            a.renew(ra, {key: leases[key] for key in order}), a.report(ra, 60.0, stats)
        )
        assert set(renewed.values()) == {Renewal.HELD}


async def test_a_batch_of_grants_takes_advisory_locks_up_to_the_budget(
    url: str, make: MakePostgres
) -> None:
    """``acquire_many`` marks its grants with advisory locks while the budget lasts (those
    fail over the moment the holder's session ends); the rest are held unlocked, with no
    session bound, and a standby's batch waits for them to expire."""
    from ostinato.coordinators.postgres import PostgresCoordinator

    a = from_url(f"{url}&locks=2")
    assert isinstance(a, PostgresCoordinator)
    b = await make()
    ra, rb = runner(1), runner(2)
    keys = [f"app:b{i}" for i in range(5)]
    try:
        granted = await a.acquire_many(ra, dict.fromkeys(keys, 60.0))
        assert all(isinstance(answer, Grant) for answer in granted.values())
        bound = [key for key, answer in granted.items() if isinstance(answer, Grant) and answer.bound]
        assert len(bound) == 2
        for key in keys:
            assert bool(await lock_holders(a.schema, key)) == (key in bound)
        leases = {key: (answer.fence, 60.0) for key, answer in granted.items() if isinstance(answer, Grant)}
        assert set((await a.renew(ra, leases)).values()) == {Renewal.HELD}
        refused = await b.acquire_many(rb, dict.fromkeys(keys, 60.0))
        assert all(isinstance(answer, Denied) for answer in refused.values())
        await kill_holder_session(a.schema, bound[0])  # frees both locks: one session
        waiting = await b.acquire_many(rb, dict.fromkeys(keys, 60.0))
        for key, answer in waiting.items():
            assert isinstance(answer, Denied)
            assert answer.expires_in is not None
            assert (answer.expires_in < 1.0) == (key in bound), key
        await asyncio.sleep(max(w.expires_in or 0 for k, w in waiting.items() if k in bound))
        taken = await b.acquire_many(rb, dict.fromkeys(keys, 60.0))
        for key, answer in taken.items():
            assert isinstance(answer, Grant) == (key in bound), key
    finally:
        await a.close()


async def test_a_standby_waits_quietly_on_a_lease_held_past_the_lock_budget(
    url: str, make: MakePostgres
) -> None:
    """A refusal names the owner (the standby may wait for its silence) for a locked row at
    once, and for an unlocked one only once it was renewed under the same fence: until
    then it may be a grant whose reply was lost, which its active owner does not know it
    holds and never renews, so only its own sightings can take it."""
    from ostinato.coordinators.postgres import PostgresCoordinator

    a = from_url(f"{url}&locks=1")
    assert isinstance(a, PostgresCoordinator)
    b = await make()
    ra, rb = runner(1), runner(2)
    keys = ["app:locked", "app:unlocked"]
    try:
        locked = await a.acquire("app:locked", ra, 0.6)
        unlocked = await a.acquire("app:unlocked", ra, 0.6)
        assert isinstance(locked, Grant)
        assert isinstance(unlocked, Grant)
        assert locked.bound is not None
        assert unlocked.bound is None

        async def owners() -> list[str | None]:
            answers = await b.acquire_many(rb, dict.fromkeys(keys, 0.6))
            return [answer.owner if isinstance(answer, Denied) else "granted" for answer in answers.values()]

        assert await owners() == [ra.id, None]
        assert await owners() == [ra.id, None]  # not renewed: its holder may not know of it
        leases = {"app:locked": (locked.fence, 0.6), "app:unlocked": (unlocked.fence, 0.6)}
        assert set((await a.renew(ra, leases)).values()) == {Renewal.HELD}
        assert await owners() == [ra.id, ra.id]
        # Never renewed again, the unlocked claim is taken once seen unchanged for its TTL.
        taken = None
        deadline = time.monotonic() + 3.0
        while taken is None and time.monotonic() < deadline:
            await a.renew(ra, {"app:locked": (locked.fence, 0.6)})
            answer = (await b.acquire_many(rb, {"app:unlocked": 0.6}))["app:unlocked"]
            taken = answer if isinstance(answer, Grant) else None
            await asyncio.sleep(0.1)
        assert taken is not None
        assert taken.fence > unlocked.fence
    finally:
        await a.close()


async def test_a_batch_skips_a_row_another_statement_holds_instead_of_waiting(
    url: str, make: MakePostgres
) -> None:
    """A lease request never queues behind another statement's row lock (a renewal of
    thousands of rows, another runner's batch): that key is answered busy, to be asked
    again soon, and the rest of the batch is answered at once."""
    import psycopg
    from psycopg import sql

    from ostinato.coordinators.postgres import BUSY_RETRY

    a = await make()
    ra, rb = runner(1), runner(2)
    keys = ["app:held", "app:free"]
    granted = await a.acquire_many(ra, dict.fromkeys(keys, 60.0))
    assert all(isinstance(answer, Grant) for answer in granted.values())
    assert await a.release("app:free", ra, granted["app:free"].fence)  # type: ignore[union-attr]
    b = await make()
    schema = a.schema
    async with await psycopg.AsyncConnection.connect(postgres_url()) as holder:
        await holder.execute(sql.SQL("SELECT 1 FROM {}.loops WHERE key = %s FOR UPDATE").format(
            sql.Identifier(schema)), ["app:free"])
        # Waiting for the row would end in the statement timeout: unreachable.
        answers = await b.acquire_many(rb, dict.fromkeys(keys, 60.0))
        busy = answers["app:free"]
        assert isinstance(busy, Denied)
        assert busy.expires_in == BUSY_RETRY
        assert isinstance(answers["app:held"], Denied)
        await holder.rollback()
    again = await b.acquire_many(rb, {"app:free": 60.0})
    assert isinstance(again["app:free"], Grant)


async def test_a_report_with_an_infinite_figure_leaves_that_figure_unknown(make: MakePostgres) -> None:
    """JSON, in which reports travel, has no infinity: such a figure is stored as unknown and
    the rest of the report as sent."""
    a = await make()
    ra = runner(1)
    await a.report(ra, 5.0, [LoopStats(KEY, passes=2, stall_after=float("inf"), p99=0.5),
                             LoopStats(f"{KEY}[2]", passes=1, p50=float("nan"))])
    found = {r.key: r for r in await a.loops()}
    assert (found[KEY].passes, found[KEY].stall_after, found[KEY].p99) == (2, None, 0.5)
    assert (found[f"{KEY}[2]"].passes, found[f"{KEY}[2]"].p50) == (1, None)


async def test_a_renewal_may_take_as_long_as_its_leases_last(url: str) -> None:
    """On a busy server a renewal of thousands of leases can run past the coordinator's
    ``timeout``: it is allowed as long as its leases last, not cut off at ``timeout`` (and
    every lease lost with it). Here a row it must lock is held for three timeouts."""
    import psycopg
    from psycopg import sql

    from ostinato.coordinators.postgres import PostgresCoordinator

    a = from_url(f"{url}&timeout=0.5")
    assert isinstance(a, PostgresCoordinator)
    await a.open()
    try:
        ra = runner(1)
        keys = [f"app:loop[{i}]" for i in range(3)]
        granted = await a.acquire_many(ra, dict.fromkeys(keys, 10.0))
        fences = {key: answer.fence for key, answer in granted.items() if isinstance(answer, Grant)}
        assert len(fences) == 3
        async with await psycopg.AsyncConnection.connect(postgres_url()) as holder:
            await holder.execute(sql.SQL("SELECT 1 FROM {}.loops WHERE key = %s FOR UPDATE").format(
                sql.Identifier(a.schema)), [keys[1]])
            renewal = asyncio.ensure_future(a.renew(ra, {key: (fences[key], 10.0) for key in keys}))
            await asyncio.sleep(1.5)  # past the server's statement and lock timeouts, and ours
            assert not renewal.done(), renewal.result()
            await holder.rollback()
        assert await asyncio.wait_for(renewal, 5) == dict.fromkeys(keys, Renewal.HELD)
        # The longer timeouts are the lease connection's; the main connection keeps ``timeout``.
        started = time.monotonic()
        async with await psycopg.AsyncConnection.connect(postgres_url()) as holder:
            await holder.execute(sql.SQL("SELECT 1 FROM {}.loops WHERE key = %s FOR UPDATE").format(
                sql.Identifier(a.schema)), [keys[1]])
            with pytest.raises(CoordinatorUnavailable):
                await a.revoke(keys[1])
            await holder.rollback()
        assert time.monotonic() - started < 3.0
    finally:
        await a.close()
        await a.drop_everything()
