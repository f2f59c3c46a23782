"""The lease rules of ``Coordinator``, checked against every backend."""

from __future__ import annotations

import asyncio
import json
import random
import time

from ostinato.coordinators import Coordinator, Denied, Event, Grant, LoopStats, Renewal, RunnerInfo, Setting
from ostinato.coordinators.clocks import drift_margin
from ostinato.coordinators.sqlite import SQLiteCoordinator
from tests.contract.conftest import Make

KEY = "app:loop"


def runner(n: int) -> RunnerInfo:
    return RunnerInfo(id=f"runner-{n}-{time.monotonic_ns()}", host="test", pid=1000 + n)


async def test_first_acquire_is_granted_and_others_are_denied(make: Make) -> None:
    """An unclaimed lease is granted; another runner is refused and told who holds it."""
    a, b = await make(), await make()
    ra, rb = runner(1), runner(2)
    grant = await a.acquire(KEY, ra, 5.0)
    assert isinstance(grant, Grant)
    assert grant.fence >= 1
    denied = await b.acquire(KEY, rb, 5.0)
    assert isinstance(denied, Denied)
    assert denied.holder == ra.label
    assert denied.expires_in is not None
    # At most the TTL, and the drift margin by which a standby that judges expiry on its
    # own clock waits longer.
    assert 0 < denied.expires_in <= 5.0 + drift_margin(5.0) + 1e-6


async def test_fence_grows_on_every_grant(make: Make) -> None:
    """Each grant, to anyone, carries a fence greater than all before it."""
    a = await make()
    fences = []
    for n in range(4):
        r = runner(n)
        grant = await a.acquire(KEY, r, 5.0)
        assert isinstance(grant, Grant)
        fences.append(grant.fence)
        assert await a.release(KEY, r, grant.fence)
    assert fences == sorted(set(fences))


async def test_expired_lease_is_taken_over_with_a_greater_fence(make: Make) -> None:
    """Once its TTL has run out, a lease goes to the next runner that asks."""
    a, b = await make(), await make()
    ra, rb = runner(1), runner(2)
    first = await a.acquire(KEY, ra, 0.3)
    assert isinstance(first, Grant)
    assert isinstance(await b.acquire(KEY, rb, 0.3), Denied)
    await asyncio.sleep(0.45)
    second = await b.acquire(KEY, rb, 5.0)
    assert isinstance(second, Grant)
    assert second.fence > first.fence
    assert (await a.renew(ra, {KEY: (first.fence, 5.0)}))[KEY] is Renewal.LOST


async def test_renew_checks_owner_and_fence(make: Make) -> None:
    """Only the owner with the current fence can extend a lease; others change nothing."""
    a, b = await make(), await make()
    ra, rb = runner(1), runner(2)
    grant = await a.acquire(KEY, ra, 0.5)
    assert isinstance(grant, Grant)
    assert (await b.renew(rb, {KEY: (grant.fence, 5.0)}))[KEY] is Renewal.LOST
    assert (await a.renew(ra, {KEY: (grant.fence + 1, 5.0)}))[KEY] is Renewal.LOST
    assert (await a.renew(ra, {KEY: (grant.fence, 5.0)}))[KEY] is Renewal.HELD
    await asyncio.sleep(0.6)  # past the first TTL: only the renewal keeps it
    assert isinstance(await b.acquire(KEY, rb, 5.0), Denied)


async def test_renew_of_an_expired_lease_is_lost(make: Make) -> None:
    """A lease whose TTL ran out cannot be renewed back to life."""
    a = await make()
    ra = runner(1)
    grant = await a.acquire(KEY, ra, 0.2)
    assert isinstance(grant, Grant)
    await asyncio.sleep(0.3)
    assert (await a.renew(ra, {KEY: (grant.fence, 5.0)}))[KEY] is Renewal.LOST


async def test_renew_many_at_once(make: Make) -> None:
    """One renewal call answers for every lease in it, each on its own merits: held ones are
    extended by their own TTL, a wrong fence or a lapsed lease is lost, a paused loop's lease
    is given up."""
    a, b = await make(), await make()
    ra, rb = runner(1), runner(2)
    fences = {}
    ttls = {"app:one": 0.4, "app:two": 5.0, "app:three": 0.4, "app:four": 5.0, "app:five": 0.2}
    for key, ttl in ttls.items():
        grant = await a.acquire(key, ra, ttl)
        assert isinstance(grant, Grant)
        fences[key] = grant.fence
    await a.set_paused("app:four", True)
    await asyncio.sleep(0.25)  # app:five has lapsed
    request = {key: (fence, 5.0) for key, fence in fences.items()}
    request["app:two"] = (fences["app:two"] + 7, 5.0)
    answers = await a.renew(ra, request)
    assert answers == {"app:one": Renewal.HELD, "app:two": Renewal.LOST, "app:three": Renewal.HELD,
                       "app:four": Renewal.PAUSED, "app:five": Renewal.LOST}
    await asyncio.sleep(0.3)  # past the first TTL of app:one and app:three: only the renewal keeps them
    assert isinstance(await b.acquire("app:one", rb, 5.0), Denied)
    assert isinstance(await b.acquire("app:three", rb, 5.0), Denied)


async def test_a_renewal_of_ten_thousand_leases_answers_each_on_its_merits(make: Make) -> None:
    """At the size a runner holds, one renewal still answers every lease rightly (split in
    chunks by some coordinators: wrong fences and a pause land in several of them) and in
    time (a statement whose cost grows with the square of the leases runs past the
    coordinator's timeout here)."""
    a = await make()
    ra = runner(1)
    keys = [f"app:many[{i:05d}]" for i in range(10_000)]
    fences: dict[str, int] = {}
    for start in range(0, len(keys), 1000):
        answers = await a.acquire_many(ra, dict.fromkeys(keys[start:start + 1000], 30.0))
        fences.update({key: grant.fence for key, grant in answers.items() if isinstance(grant, Grant)})
    assert len(fences) == len(keys)
    wrong, paused = set(keys[7::997]), keys[5003]
    await a.set_paused(paused, True)
    answers = await a.renew(ra, {key: (fences[key] + (key in wrong), 30.0) for key in keys})
    assert answers == {
        key: Renewal.LOST if key in wrong else Renewal.PAUSED if key == paused else Renewal.HELD
        for key in keys
    }


async def test_release_checks_owner_and_fence(make: Make) -> None:
    """A runner can give back only its own lease; the fence counter survives the release."""
    a, b = await make(), await make()
    ra, rb = runner(1), runner(2)
    grant = await a.acquire(KEY, ra, 5.0)
    assert isinstance(grant, Grant)
    assert not await b.release(KEY, rb, grant.fence)
    assert not await a.release(KEY, ra, grant.fence - 1)
    assert isinstance(await b.acquire(KEY, rb, 5.0), Denied)
    assert await a.release(KEY, ra, grant.fence)
    after = await b.acquire(KEY, rb, 5.0)
    assert isinstance(after, Grant)
    assert after.fence > grant.fence


async def test_reacquire_by_owner_gets_a_new_fence(make: Make) -> None:
    """A holder asking again gets a new, greater fence, and its old fence stops renewing."""
    a = await make()
    ra = runner(1)
    first = await a.acquire(KEY, ra, 5.0)
    second = await a.acquire(KEY, ra, 5.0)
    assert isinstance(first, Grant)
    assert isinstance(second, Grant)
    assert second.fence > first.fence
    answers = await a.renew(ra, {KEY: (first.fence, 5.0)})
    assert answers[KEY] is Renewal.LOST


async def test_hand_over_passes_the_lease_on_with_the_next_fence(make: Make) -> None:
    """The heir holds the lease with the very next fence; the old owner's fence stops
    renewing, and a third runner is refused as long as the heir's claim lasts."""
    a, c = await make(), await make()
    ra, rb, rc = runner(1), runner(2), runner(3)
    grant = await a.acquire(KEY, ra, 5.0)
    assert isinstance(grant, Grant)
    passed = await a.hand_over(KEY, ra, grant.fence, rb, 5.0)
    assert isinstance(passed, Grant)
    assert passed.fence == grant.fence + 1
    assert (await a.renew(ra, {KEY: (grant.fence, 5.0)}))[KEY] is Renewal.LOST
    assert isinstance(await c.acquire(KEY, rc, 5.0), Denied)
    assert (await a.renew(rb, {KEY: (passed.fence, 5.0)}))[KEY] is Renewal.HELD
    [record] = [r for r in await c.loops() if r.key == KEY]
    assert (record.holder, record.fence) == (rb.label, passed.fence)


async def test_hand_over_checks_owner_and_fence_and_leaves_a_refused_lease_alone(make: Make) -> None:
    """Only the owner with its fence can hand a lease over (one copy of a link takes the
    baton up); a refused hand-over changes nothing."""
    a, b = await make(), await make()
    ra, rb, rc = runner(1), runner(2), runner(3)
    grant = await a.acquire(KEY, ra, 5.0)
    assert isinstance(grant, Grant)
    assert await b.hand_over(KEY, rb, grant.fence, rc, 5.0) is None
    assert await a.hand_over(KEY, ra, grant.fence - 1, rc, 5.0) is None
    assert (await a.renew(ra, {KEY: (grant.fence, 5.0)}))[KEY] is Renewal.HELD
    first = await a.hand_over(KEY, ra, grant.fence, rb, 5.0)
    assert isinstance(first, Grant)
    assert await a.hand_over(KEY, ra, grant.fence, rc, 5.0) is None  # a second copy of the step
    [record] = [r for r in await b.loops() if r.key == KEY]
    assert (record.holder, record.fence) == (rb.label, first.fence)


async def test_hand_over_of_a_paused_loop_gives_the_lease_up(make: Make) -> None:
    """A paused loop is handed to nobody: the hand-over is refused and the lease is free."""
    a, b = await make(), await make()
    ra, rb = runner(1), runner(2)
    grant = await a.acquire(KEY, ra, 5.0)
    assert isinstance(grant, Grant)
    await b.set_paused(KEY, True)
    assert await a.hand_over(KEY, ra, grant.fence, rb, 5.0) is None
    [record] = [r for r in await b.loops() if r.key == KEY]
    assert record.paused
    assert record.holder is None


async def test_pause_refuses_grants_and_ends_the_holders_lease(make: Make) -> None:
    """A paused loop is granted to nobody, its holder learns at renewal, resume undoes it."""
    a, b = await make(), await make()
    ra, rb = runner(1), runner(2)
    grant = await a.acquire(KEY, ra, 5.0)
    assert isinstance(grant, Grant)
    await b.set_paused(KEY, True)
    assert (await a.renew(ra, {KEY: (grant.fence, 5.0)}))[KEY] is Renewal.PAUSED
    denied = await b.acquire(KEY, rb, 5.0)
    assert isinstance(denied, Denied)
    assert denied.paused
    [record] = [r for r in await b.loops() if r.key == KEY]
    assert record.paused
    assert record.holder is None
    await b.set_paused(KEY, False)
    again = await b.acquire(KEY, rb, 5.0)
    assert isinstance(again, Grant)
    assert again.fence > grant.fence


async def test_pause_before_any_runner(make: Make) -> None:
    """A loop can be paused before any runner has seen it."""
    a = await make()
    await a.set_paused("app:later", True)
    denied = await a.acquire("app:later", runner(1), 5.0)
    assert isinstance(denied, Denied)
    assert denied.paused


async def test_report_adds_counts_and_shows_in_loops(make: Make) -> None:
    """Reports add pass and error counts and replace the latest timings."""
    a, b = await make(), await make()
    ra = runner(1)
    grant = await a.acquire(KEY, ra, 5.0)
    assert isinstance(grant, Grant)
    now = time.time()
    await a.report(ra, 5.0, [LoopStats(KEY, passes=3, errors=1, last_start=now - 1, last_end=now,
                                       last_duration=0.5, last_outcome="worked", p50=0.1, p99=0.4,
                                       last_error="ValueError: x", last_error_at=now)])
    await a.report(ra, 5.0, [LoopStats(KEY, passes=2, last_end=now + 1, last_outcome="idle")])
    [record] = [r for r in await b.loops() if r.key == KEY]
    assert record.passes == 5
    assert record.errors == 1
    assert record.fence == grant.fence
    assert record.holder == ra.label
    assert record.last_end == now + 1
    assert record.last_outcome == "idle"
    assert record.last_error == "ValueError: x"
    assert record.p99 == 0.4
    assert record.app == "app"
    assert record.name == "loop"


async def test_a_report_of_many_loops_keeps_every_field_as_sent(make: Make) -> None:
    """Every field of every loop reported comes back as it was sent: text of any kind, whole
    numbers and timings; a loop's fields never land on another's."""
    a = await make()
    ra = runner(1)
    now = time.time()
    sent = [
        LoopStats(f"app:loop[{n}]", passes=n, errors=n % 3, last_start=now - n, last_end=now - n + 0.25,
                  last_duration=0.25 + n / 1000, last_outcome=("worked", "idle", "failed")[n % 3],
                  last_error=f'ValueError: "quoted", \\ back\nnew line, tab\t, {n} é ✓',
                  last_error_at=now - n / 7, p50=n / 3, p99=n / 2, running_since=now - 0.5,
                  stall_after=30.0 + n, fail_streak=n % 4, fail_after=5, next_start=now + n,
                  zone="Europe/Paris" if n % 2 else None)
        for n in range(1, 301)
    ]
    await a.report(ra, 5.0, sent)
    found = {r.key: r for r in await a.loops()}
    for stats in sent:
        record = found[stats.key]
        assert (record.passes, record.errors) == (stats.passes, stats.errors), stats.key
        for name in ("last_start", "last_end", "last_duration", "last_outcome", "last_error",
                     "last_error_at", "p50", "p99", "stall_after", "fail_streak", "fail_after",
                     "next_start", "zone"):
            assert getattr(record, name) == getattr(stats, name), (stats.key, name)


async def test_runners_are_listed_while_their_heartbeat_lasts(make: Make) -> None:
    """A runner's report registers it for its TTL; after that it is gone."""
    a = await make()
    ra, rb = runner(1), runner(2)
    await a.report(ra, 0.3, [])
    await a.report(rb, 10.0, [])
    assert {r.id for r in await a.runners()} >= {ra.id, rb.id}
    await asyncio.sleep(0.45)
    ids = {r.id for r in await a.runners()}
    assert rb.id in ids
    assert ra.id not in ids


async def test_released_lease_shows_no_holder(make: Make) -> None:
    """After a release, status shows the loop with no runner and its last fence."""
    a = await make()
    ra = runner(1)
    grant = await a.acquire(KEY, ra, 5.0)
    assert isinstance(grant, Grant)
    assert await a.release(KEY, ra, grant.fence)
    [record] = [r for r in await a.loops() if r.key == KEY]
    assert record.holder is None
    assert record.fence == grant.fence
    assert record.state(time.time()) == "no runner"


async def test_published_events_reach_subscribers(make: Make) -> None:
    """An event published through one coordinator reaches a runner subscribed through another."""
    a, b = await make(), await make()
    got: asyncio.Queue[Event] = asyncio.Queue()
    await b.subscribe(runner(2), got.put_nowait)
    await b.report(runner(2), 10.0, [])
    await a.publish(Event("wake", KEY))
    event = await asyncio.wait_for(got.get(), 2.0)
    assert event == Event("wake", KEY)


async def test_many_events_published_at_once_reach_subscribers_in_order(make: Make) -> None:
    """``publish_many``: every event reaches a runner subscribed through another coordinator,
    in the order published."""
    a, b = await make(), await make()
    got: asyncio.Queue[Event] = asyncio.Queue()
    await b.subscribe(runner(2), got.put_nowait)
    await b.report(runner(2), 10.0, [])
    sent = [Event("released", f"app:loop{i}") for i in range(50)]
    await a.publish_many(sent)
    received = [await asyncio.wait_for(got.get(), 2.0) for _ in sent]
    assert received == sent


async def test_release_many_gives_back_only_what_the_runner_owns_with_that_fence(make: Make) -> None:
    """``release_many`` follows ``release`` per key: a lease of another runner, or under an
    older fence, is kept; the ones given back are free at once."""
    a, b = await make(), await make()
    ra, rb = runner(1), runner(2)
    keys = [f"app:many{i}" for i in range(300)]
    granted = await a.acquire_many(ra, dict.fromkeys(keys, 5.0))
    fences = {key: answer.fence for key, answer in granted.items() if isinstance(answer, Grant)}
    assert len(fences) == len(keys)
    theirs = await b.acquire("app:theirs", rb, 5.0)
    assert isinstance(theirs, Grant)
    asked = {**fences, keys[0]: fences[keys[0]] - 1, "app:theirs": theirs.fence, "app:never": 1}
    released = await a.release_many(ra, asked)
    assert released == set(keys[1:])
    assert (await a.renew(ra, {keys[0]: (fences[keys[0]], 5.0)}))[keys[0]] is Renewal.HELD
    assert (await b.renew(rb, {"app:theirs": (theirs.fence, 5.0)}))["app:theirs"] is Renewal.HELD
    again = await b.acquire_many(rb, dict.fromkeys(keys[1:], 5.0))
    assert all(isinstance(answer, Grant) for answer in again.values())
    assert await a.release_many(ra, {}) == set()


async def test_only_one_of_many_simultaneous_acquires_wins(make: Make) -> None:
    """Runners racing for a free lease: exactly one is granted."""
    coordinators = [await make() for _ in range(6)]
    answers = await asyncio.gather(
        *(c.acquire(KEY, runner(n), 5.0) for n, c in enumerate(coordinators))
    )
    assert sum(isinstance(a, Grant) for a in answers) == 1


async def test_revoke_drops_any_holders_lease_and_keeps_the_fence(make: Make) -> None:
    """An operator's revoke ends the lease whoever holds it; the next grant has a greater fence."""
    a, b = await make(), await make()
    ra, rb = runner(1), runner(2)
    assert await b.revoke(KEY) is None
    grant = await a.acquire(KEY, ra, 5.0)
    assert isinstance(grant, Grant)
    assert await b.revoke(KEY) == grant.fence
    assert (await a.renew(ra, {KEY: (grant.fence, 5.0)}))[KEY] is Renewal.LOST
    after = await b.acquire(KEY, rb, 5.0)
    assert isinstance(after, Grant)
    assert after.fence > grant.fence


async def test_forget_is_refused_while_held_and_keeps_the_fence(make: Make) -> None:
    """A held loop cannot be forgotten; a free one leaves status, and comes back with its
    next report, its next grant still greater than every earlier one."""
    a = await make()
    ra = runner(1)
    grant = await a.acquire(KEY, ra, 5.0)
    assert isinstance(grant, Grant)
    await a.report(ra, 5.0, [LoopStats(KEY, passes=3, errors=1, last_end=time.time(), fail_streak=1,
                                       fail_after=3, next_start=time.time() + 5, zone="Europe/Berlin")])
    (record,) = [r for r in await a.loops() if r.key == KEY]
    assert (record.passes, record.fail_streak, record.fail_after, record.zone) == (3, 1, 3, "Europe/Berlin")
    assert record.next_start is not None
    assert await a.forget(KEY) is False
    assert [r.key for r in await a.loops()] == [KEY]
    assert await a.release(KEY, ra, grant.fence)
    assert await a.forget(KEY) is True
    assert [r.key for r in await a.loops()] == []
    assert await a.forget("app:never-seen") is True
    again = await a.acquire(KEY, ra, 5.0)
    assert isinstance(again, Grant)
    assert again.fence > grant.fence
    await a.report(ra, 5.0, [LoopStats(KEY, passes=1)])
    (record,) = [r for r in await a.loops() if r.key == KEY]
    assert record.passes == 1  # counted afresh
    assert record.holder == ra.label


async def test_runners_say_which_loops_they_host(make: Make) -> None:
    """The loops a runner hosts come back with it from ``runners()``."""
    a = await make()
    hosting = RunnerInfo(id=f"hosting-{time.monotonic_ns()}", host="test", pid=7,
                         hosts=("app:x", "app:y"))
    await a.report(hosting, 5.0, [])
    (record,) = [r for r in await a.runners() if r.id == hosting.id]
    assert record.hosts == frozenset({"app:x", "app:y"})
    assert record.can_run("app:x")
    assert not record.can_run("other:x")


SETTING = "app:sync/keys"


async def test_an_absent_setting_reads_as_none(make: Make) -> None:
    """A setting never written reads as ``None``."""
    a = await make()
    assert await a.read_setting(SETTING) is None


async def test_a_written_setting_reads_back_with_its_fence(make: Make) -> None:
    """A setting reads back as written, value and fence."""
    a = await make()
    assert await a.write_setting(SETTING, '["acme", "Zürich"]', 3)
    assert await a.read_setting(SETTING) == Setting('["acme", "Zürich"]', 3)


async def test_a_setting_write_under_a_lower_fence_is_refused(make: Make) -> None:
    """A write under an older fence than the stored one changes nothing and says so."""
    a = await make()
    assert await a.write_setting(SETTING, "new", 7)
    assert not await a.write_setting(SETTING, "stale", 6)
    assert await a.read_setting(SETTING) == Setting("new", 7)


async def test_a_setting_write_under_an_equal_or_greater_fence_overwrites(make: Make) -> None:
    """The holder that wrote a setting may write it again; a newer holder may too."""
    a = await make()
    assert await a.write_setting(SETTING, "first", 4)
    assert await a.write_setting(SETTING, "again", 4)
    assert await a.read_setting(SETTING) == Setting("again", 4)
    assert await a.write_setting(SETTING, "newer", 5)
    assert await a.read_setting(SETTING) == Setting("newer", 5)


async def test_a_setting_of_megabytes_round_trips(make: Make) -> None:
    """A key list of 100,000 tenants (over 2 MB of JSON) is stored and read back whole."""
    a, b = await make(), await make()
    value = json.dumps([f"tenant-{n:012d}" for n in range(100_000)])
    assert len(value.encode()) > 2_000_000
    assert await a.write_setting(SETTING, value, 1)
    assert await b.read_setting(SETTING) == Setting(value, 1)


async def test_settings_are_kept_apart_by_name(make: Make) -> None:
    """Each name has its own value and its own fence."""
    a = await make()
    assert await a.write_setting("app:one/keys", "one", 9)
    assert await a.write_setting("app:two/keys", "two", 1)
    assert await a.read_setting("app:one/keys") == Setting("one", 9)
    assert await a.read_setting("app:two/keys") == Setting("two", 1)
    assert await a.read_setting("app:three/keys") is None


async def test_settings_are_shared_by_coordinators_of_one_store(make: Make) -> None:
    """A setting written through one coordinator is read, and fenced, through another."""
    a, b = await make(), await make()
    assert await a.write_setting(SETTING, "from a", 2)
    assert await b.read_setting(SETTING) == Setting("from a", 2)
    assert not await b.write_setting(SETTING, "from b, stale", 1)
    assert await b.write_setting(SETTING, "from b", 3)
    assert await a.read_setting(SETTING) == Setting("from b", 3)


async def test_racing_setting_writes_leave_the_greatest_fence(make: Make) -> None:
    """Writes racing through several coordinators: the greatest fence is stored, whatever
    the order they land in, and its write is never refused."""
    coordinators = [await make() for _ in range(4)]
    fences = list(range(1, 21))
    random.shuffle(fences)
    answers = await asyncio.gather(*(
        coordinators[n % 4].write_setting(SETTING, f"value {fence}", fence)
        for n, fence in enumerate(fences)
    ))
    assert dict(zip(fences, answers, strict=True))[20] is True
    assert await coordinators[0].read_setting(SETTING) == Setting("value 20", 20)


async def _silent_for(coordinator: Coordinator, owner: str, seconds: float) -> float:
    """Read ``owner``'s silence until it reaches ``seconds``; return the last reading."""
    while True:
        silence = await coordinator.silence([owner])
        assert silence is not None
        if silence[owner] >= seconds:
            return silence[owner]
        await asyncio.sleep(0.05)


async def test_silence_counts_every_grant_and_renewal(make: Make) -> None:
    """An owner's silence grows while it makes no grant and no renewal, and starts again at
    each; a coordinator that does not count says ``None`` (its standbys ask on their own)."""
    a, b = await make(), await make()
    ra = runner(1)
    first = await b.silence([ra.id])
    if first is None:
        assert isinstance(b, SQLiteCoordinator)  # the one backend that does not count
        return
    assert first == {ra.id: 0.0}
    grant = await a.acquire(KEY, ra, 5.0)
    assert isinstance(grant, Grant)
    assert (await b.silence([ra.id]))[ra.id] == 0.0  # a count not seen before
    await _silent_for(b, ra.id, 0.3)
    assert await a.renew(ra, {KEY: (grant.fence, 5.0)}) == {KEY: Renewal.HELD}
    assert (await b.silence([ra.id]))[ra.id] == 0.0
    await _silent_for(b, ra.id, 0.3)
    assert isinstance(await a.acquire(KEY + "-2", ra, 5.0), Grant)
    assert (await b.silence([ra.id]))[ra.id] == 0.0


async def test_a_claim_whose_owner_was_silent_for_its_ttl_is_taken(make: Make) -> None:
    """A standby that saw the owner's activity count unchanged for the claim's TTL takes the
    claim, though it never saw that claim itself unchanged for so long (the owner renewed
    after the standby last asked)."""
    a, b = await make(), await make()
    ra, rb = runner(1), runner(2)
    grant = await a.acquire(KEY, ra, 1.0)
    assert isinstance(grant, Grant)
    denied = await b.acquire(KEY, rb, 1.0)
    assert isinstance(denied, Denied)
    if await b.silence([ra.id]) is None:
        return
    assert denied.owner == ra.id
    await asyncio.sleep(0.3)
    assert await a.renew(ra, {KEY: (grant.fence, 1.0)}) == {KEY: Renewal.HELD}
    await _silent_for(b, ra.id, 1.0 + drift_margin(1.0))
    taken = await b.acquire(KEY, rb, 1.0)
    assert isinstance(taken, Grant)
    assert taken.fence > grant.fence
    assert await a.renew(ra, {KEY: (grant.fence, 1.0)}) == {KEY: Renewal.LOST}


async def test_silence_takes_no_claim_of_an_active_owner_nor_one_longer_than_it(make: Make) -> None:
    """While the owner renews, its claim is never taken however the standby asks; and a
    silence shorter than a claim's TTL does not take that claim."""
    a, b = await make(), await make()
    ra, rb = runner(1), runner(2)
    grant = await a.acquire(KEY, ra, 1.0)
    assert isinstance(grant, Grant)
    if await b.silence([ra.id]) is None:
        return
    ended = time.monotonic() + 2.5
    while time.monotonic() < ended:
        assert await a.renew(ra, {KEY: (grant.fence, 1.0)}) == {KEY: Renewal.HELD}
        for _ in range(3):
            await b.silence([ra.id])
            assert isinstance(await b.acquire(KEY, rb, 1.0), Denied)
            await asyncio.sleep(0.1)
    long = await a.acquire(KEY + "-long", ra, 4.0)
    assert isinstance(long, Grant)
    assert isinstance(await b.acquire(KEY + "-long", rb, 4.0), Denied)
    await _silent_for(b, ra.id, 1.5)
    assert isinstance(await b.acquire(KEY + "-long", rb, 4.0), Denied)
    # KEY's claim ran out unrenewed, and its owner took it again after the standby last read
    # the owner's count: silent for longer than KEY's TTL as read, but not the owner's any more.
    again = await a.acquire(KEY, ra, 1.0)
    assert isinstance(again, Grant)
    assert isinstance(await b.acquire(KEY, rb, 1.0), Denied)
    assert await a.renew(ra, {KEY + "-long": (long.fence, 4.0), KEY: (again.fence, 1.0)}) == {
        KEY + "-long": Renewal.HELD, KEY: Renewal.HELD}


async def test_a_batch_answers_each_key_by_the_rules_of_acquire(make: Make) -> None:
    """``acquire_many`` grants what ``acquire`` would grant and refuses the rest, key by key:
    free and never-seen keys are granted, a live holder's and a paused loop's refused, and
    a claim whose owner fell silent for its TTL taken while an active owner's is kept."""
    a, b, c = await make(), await make(), await make()
    ra, rb, rc = runner(1), runner(2), runner(3)
    active = await a.acquire("app:active", ra, 1.0)
    silent = await c.acquire("app:silent", rc, 1.0)
    freed = await a.acquire("app:freed", ra, 1.0)
    assert isinstance(active, Grant)
    assert isinstance(silent, Grant)
    assert isinstance(freed, Grant)
    assert await a.release("app:freed", ra, freed.fence)
    await a.set_paused("app:paused", True)
    keys = ["app:silent", "app:new", "app:active", "app:freed", "app:paused"]
    first = await b.acquire_many(rb, dict.fromkeys(keys, 1.0))
    assert list(first) == keys  # answered in the order asked
    assert isinstance(first["app:new"], Grant)
    assert isinstance(first["app:freed"], Grant)
    assert first["app:freed"].fence > freed.fence
    refused = {key: first[key] for key in ("app:active", "app:silent", "app:paused")}
    assert all(isinstance(answer, Denied) for answer in refused.values())
    paused = refused["app:paused"]
    assert isinstance(paused, Denied)
    assert paused.paused
    if await b.silence([rc.id, ra.id]) is None:
        return  # no activity counts here: the silent owner's claim is taken when it expires
    # ``c`` renews once more (the claim ``b`` saw is not the claim any more), then stops;
    # ``a`` keeps renewing.
    await asyncio.sleep(0.3)
    assert await c.renew(rc, {"app:silent": (silent.fence, 1.0)}) == {"app:silent": Renewal.HELD}
    ended = time.monotonic() + 1.0 + drift_margin(1.0) + 0.3
    while time.monotonic() < ended:
        assert await a.renew(ra, {"app:active": (active.fence, 1.0)}) == {"app:active": Renewal.HELD}
        await b.silence([rc.id, ra.id])
        await asyncio.sleep(0.1)
    second = await b.acquire_many(rb, dict.fromkeys(["app:active", "app:silent"], 1.0))
    assert isinstance(second["app:active"], Denied)
    taken = second["app:silent"]
    assert isinstance(taken, Grant)
    assert taken.fence > silent.fence
    assert await c.renew(rc, {"app:silent": (silent.fence, 1.0)}) == {"app:silent": Renewal.LOST}


async def test_racing_batches_grant_each_key_to_exactly_one_runner(make: Make) -> None:
    """Four runners ask for the same 200 leases at once, each in its own order: every key is
    granted once, and no batch fails (rows locked in different orders would deadlock)."""
    coordinators = [await make() for _ in range(4)]
    runners = [runner(n) for n in range(4)]
    keys = [f"app:race{i}" for i in range(200)]
    orders = [random.Random(n).sample(keys, len(keys)) for n in range(4)]
    for _ in range(2):  # once on new keys, once more on keys released in between
        answers = await asyncio.gather(*(
            c.acquire_many(r, dict.fromkeys(order, 5.0))
            for c, r, order in zip(coordinators, runners, orders, strict=True)
        ))
        winners: dict[str, list[int]] = {key: [] for key in keys}
        for n, batch in enumerate(answers):
            assert set(batch) == set(keys)
            for key, answer in batch.items():
                if isinstance(answer, Grant):
                    winners[key].append(n)
        assert all(len(won) <= 1 for won in winners.values())
        granted = sum(len(won) for won in winners.values())
        assert granted >= len(keys) - 5  # a key inserted by a racer may be asked again later
        for n, batch in enumerate(answers):
            fences = {key: a.fence for key, a in batch.items() if isinstance(a, Grant)}
            assert await coordinators[n].release_many(runners[n], fences) == set(fences)
