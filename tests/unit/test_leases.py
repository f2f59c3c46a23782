"""The batching of lease requests (``ostinato.leases.Leases``), against a coordinator that
only records the batches it is sent."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Mapping
from types import SimpleNamespace

from ostinato.coordinators.protocol import Denied, Renewal, RunnerInfo
from ostinato.leases import ACQUIRE_BATCH, Leases
from ostinato.loop import REVOKED, LocalLease


class Recording:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.sent = asyncio.Event()

    async def acquire_many(self, runner: RunnerInfo, requests: Mapping[str, float]) -> dict[str, Denied]:
        self.batches.append(list(requests))
        self.sent.set()
        await asyncio.sleep(0.01)
        return {key: Denied(holder=None, expires_in=None) for key in requests}


async def test_a_request_an_event_hurries_goes_in_the_next_batch() -> None:
    coordinator = Recording()
    owner = SimpleNamespace(coordinator=coordinator, info=RunnerInfo.here(hosts=()),
                            calls=collections.Counter(), loop=asyncio.get_running_loop(), stopping=False)
    leases = Leases(owner, 10.0)
    keys = [f"k{i}" for i in range(3 * ACQUIRE_BATCH)]
    futures = [leases.request(key, 10.0) for key in keys]
    await coordinator.sent.wait()  # the first batch is out
    last = keys[-1]
    assert leases.hurry(last)
    assert not leases.hurry("not asked for")
    await asyncio.gather(*futures)
    assert [len(batch) for batch in coordinator.batches] == [ACQUIRE_BATCH] * 3
    assert coordinator.batches[1][0] == last  # not at the end of the queue
    assert sorted(key for batch in coordinator.batches for key in batch) == sorted(keys)  # each once


async def test_an_urgent_request_goes_in_the_next_batch_before_those_waiting() -> None:
    """A standby woken because its lease may be free asks again as urgent: it must not wait
    behind the thousands of first requests of a runner that just joined."""
    coordinator = Recording()
    owner = SimpleNamespace(coordinator=coordinator, info=RunnerInfo.here(hosts=()),
                            calls=collections.Counter(), loop=asyncio.get_running_loop(), stopping=False)
    leases = Leases(owner, 10.0)
    keys = [f"k{i}" for i in range(3 * ACQUIRE_BATCH)]
    futures = [leases.request(key, 10.0) for key in keys]
    await coordinator.sent.wait()  # the first batch is out
    futures.append(leases.request("woken", 10.0, urgent=True))
    futures.append(leases.request("asked late", 10.0))
    await asyncio.gather(*futures)
    assert coordinator.batches[1][0] == "woken"
    assert coordinator.batches[-1][-1] == "asked late"
    assert sorted(key for batch in coordinator.batches for key in batch) == sorted(
        [*keys, "woken", "asked late"])


async def test_a_lease_revoked_while_its_renewal_is_out_stays_revoked() -> None:
    """The renewal reached the server before the revocation and answers HELD: the holder must
    not start passes again under that fence (a successor may hold the lease already)."""
    renewing, answer = asyncio.Event(), asyncio.Event()

    class Slow:
        async def renew(
            self, runner: RunnerInfo, leases: Mapping[str, tuple[int, float]]
        ) -> dict[str, Renewal]:
            renewing.set()
            await answer.wait()
            return dict.fromkeys(leases, Renewal.HELD)

    owner = SimpleNamespace(coordinator=Slow(), info=RunnerInfo.here(hosts=()),
                            calls=collections.Counter(), loop=asyncio.get_running_loop(), stopping=False)
    leases = Leases(owner, 10.0)
    lease = LocalLease(7, 10.0, time.monotonic())
    keeper = SimpleNamespace(key="app:loop", lease=lease)
    leases.granted(keeper, lease)  # type: ignore[arg-type]
    renewal = asyncio.ensure_future(leases.renew_once())
    await renewing.wait()
    lease.revoke()  # as ``LoopKeeper.lose`` does on a ``revoked`` event
    answer.set()
    await renewal
    assert not lease.holds()
    assert lease.deadline == REVOKED
