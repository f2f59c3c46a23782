"""``redis://`` and ``rediss://``: leases in a Redis server shared by runners on many hosts.

Each loop's lease is one hash key: owner, fence, a renewal count (``beat``),
the TTL and when the claim ends by the server's clock. Acquire, renew and
release are Lua scripts that check the owner token and the fence atomically;
nothing is ever extended or deleted blindly. A grant bumps the loop's fence
(``INCR``) in the same script.

The server's wall clock never hands a claim to a standby: a claim that was not
released is taken only by a standby that has seen it unchanged (same fence, same
renewal count) for its whole TTL on its own monotonic clock (``Sightings``), so a
step of the server's clock cannot move a live holder's lease. The key outlives
the claim by ``LINGER`` so that an ended claim is still there to be judged so; a
step forward longer than that (or a restart without persistence, below) forgets
it. The server's clock still decides whether a renewal came too late, which a
holder answers by stopping, and what status shows as held.

A Redis restarted without persistence forgets every key, the fence counters
among them, yet a fence must never go backwards. So when the grant script finds
a loop's fence key missing, it seeds it from the server's ``TIME`` in
microseconds since the epoch. Every fence granted before the restart was seeded
the same way and grew by one per grant, so it is below the new seed as long as
fewer than a million grants per second happened on average and the server's
clock did not step back. Fences on Redis are therefore large integers (about
1.8e15 today, far inside 64 bits); the scripts pass them around as strings, so
Lua's doubles never round them.

Such a restart also forgets the leases while their holders still run. Each
holder learns of it at once: its pub/sub connection drops, and the coordinator
tells its runner (``dropped``) to stop the passes of every lease it holds and
ask again. A grant is trusted only if that connection stayed up around it: one
answered after the connection dropped is not taken, and one made while it was
down is announced ``dropped`` once it is back, since the server may have
restarted unseen in between. And a server up for less than ``RESTART_QUIET``
grants no lease whose fence it has to seed, so that holders of forgotten
leases have stopped starting passes first.

Redis cannot tell that a holder died, so its lease is taken over when it
expires, except where the holder ran on this host under this user: every
runner holds a liveness lock (see ``liveness``) in ``host_folder()`` for its
whole life, and a standby refused by a holder whose lock it finds free takes the
lease at once (the grant script checks that the holder and fence are still the
ones found dead). A refused standby waits on such a holder's pidfd and hears
``released`` the moment it dies.

Keys, all under ``<prefix>:``: ``lease:<key>`` (hash: owner, holder, fence,
since; expires), ``fence:<key>`` (counter), ``loop:<key>`` (hash: paused flag,
counts and latest stats), ``loops`` (set of every key seen), ``runners``
(sorted set of runner ids by expiry), ``runner-labels`` and ``runner-hosts`` (hashes),
``setting:<name>`` (hash: value, fence), ``activity:<runner id>`` (a count every grant and
renewal call of that runner moves: ``silence``). The scripts are in ``redis_lua``; the
clients, key names and events in ``redis_connections``.

Needs Redis 5 or later: a script that reads ``TIME`` and then writes relies on
effects replication, the default since then. Not for Redis Cluster: one script
touches several keys that are not in one hash slot.

URL query parameters: ``prefix`` (default ``ostinato``) namespaces every key
and the event channel; ``timeout`` (seconds, default 2) bounds connecting and
each reply, and redis-py's own retries are off, so one renewal cannot outlive
a short lease. Events travel over Redis pub/sub.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from redis.typing import EncodableT

from ostinato.coordinators.clocks import Sightings, Silence
from ostinato.coordinators.network import RECONNECT_MIN
from ostinato.coordinators.protocol import (
    Denied,
    Grant,
    LoopStats,
    Renewal,
    RunnerInfo,
    hosts_text,
    stats_fields,
)
from ostinato.coordinators.redis_lua import (
    ACQUIRE_MANY,
    FORGET,
    HAND_OVER,
    HEARTBEAT,
    RELEASE_MANY,
    RENEW_MANY,
    REPORT,
    REVOKE,
    WRITE_SETTING,
)
from ostinato.coordinators.redis_reads import RedisReads, decode

log = logging.getLogger("ostinato.redis")
#: The most leases one renewal script call extends.
RENEW_CHUNK = 500
#: Lease requests per script call.
ACQUIRE_CHUNK = 500
TAB = "\t"
# A request that names no dead holder.
NO_DEAD = ("", "")

# Seconds a freshly (re)started server waits before granting a lease it has no fence
# for, time for holders of leases it forgot to hear ``dropped`` and stop starting
# passes (a pass already running is stopped only if it can be: see ``lose``). Redis
# counts its uptime in whole seconds of the wall clock, so the script waits for one
# more than this.
RESTART_QUIET = 1

# How long a lease key outlives its claim (ms), so that a claim the server's clock calls
# ended is still there for a standby to judge on its own clock: a forward step of the
# server's clock up to this long moves no live holder's lease.
LINGER_MS = 60_000


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _calls(keys: list[str], size: int, line: Callable[[str], str]) -> list[tuple[list[str], str]]:
    """``keys`` in chunks of ``size``, each with the one string its script call carries:
    ``line(key)`` for each key, in order."""
    chunks = [keys[start:start + size] for start in range(0, len(keys), size)]
    return [(chunk, "".join([line(key) for key in chunk])) for chunk in chunks]


def _json(value: object) -> str:
    """``json.dumps(value)``, without its cost for the numbers that most stats fields are
    (a report of a thousand loops encodes ten thousand of them)."""
    kind = type(value)
    if kind is int or (kind is float and math.isfinite(value)):  # type: ignore[arg-type]
        return repr(value)
    return json.dumps(value)


class RedisCoordinator(RedisReads):
    """Leases in Redis keys with server-side expiry, guarded by Lua scripts."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._acquire_many = self._client.register_script(ACQUIRE_MANY)
        self._renew_many = self._client.register_script(RENEW_MANY)
        self._report = self._client.register_script(REPORT)
        self._release_many = self._client.register_script(RELEASE_MANY)
        self._hand_over = self._client.register_script(HAND_OVER)
        self._revoke = self._client.register_script(REVOKE)
        self._heartbeat = self._client.register_script(HEARTBEAT)
        self._forget_loop = self._client.register_script(FORGET)
        self._write_setting = self._client.register_script(WRITE_SETTING)
        self._liveness_broken = False
        # Claims seen on refusals, so that expiry is judged on this host's clock.
        self._sightings = Sightings()
        # Owners' activity counts as read, and the owner each refusal named.
        self._silence = Silence()
        self._claimed_by: dict[str, str] = {}

    # -- leases --------------------------------------------------------------------

    async def acquire(self, key: str, runner: RunnerInfo, ttl: float) -> Grant | Denied:
        return (await self.acquire_many(runner, {key: ttl}))[key]

    async def acquire_many(
        self, runner: RunnerInfo, requests: Mapping[str, float]
    ) -> dict[str, Grant | Denied]:
        """Every request's script in one pipeline (one round trip for the batch); a refusal
        by a holder that died on this host is asked again on its own."""
        self._hold_liveness(runner)
        generation, watched = self._events.generation, self._events.connected
        now = time.monotonic()
        unchanged: dict[str, tuple[str, ...]] = {}
        for key in requests:
            seen = self._sightings.unchanged(key, now)
            claim = ("", "") if seen is None else (str(seen[0]), str(seen[1]))
            unchanged[key] = claim + self._proof(key, now)
        answers = await self._ask_many(runner, requests, unchanged)
        return {
            key: await self._settle(key, runner, ttl, answer, unchanged[key], generation, watched)
            for (key, ttl), answer in zip(requests.items(), answers, strict=True)
        }

    def _proof(self, key: str, now: float) -> tuple[str, str, str]:
        """The owner that last refused ``key``, its activity count and the longest claim TTL
        (ms) its silence covers, if it has been silent at all ('' for none)."""
        owner = self._claimed_by.get(key)
        proof = self._silence.proof(owner, now)
        if owner is None or proof is None:
            return ("", "", "")
        return (owner, str(proof[0]), str(int(proof[1] * 1000)))

    async def silence(self, owners: Collection[str]) -> dict[str, float]:
        owners = list(owners)
        if not owners:
            return {}
        with self._reaching():
            counts = await self._client.mget([self._key("activity", owner) for owner in owners])
        now = time.monotonic()
        self._silence.prune(now)
        return {
            owner: self._silence.saw(owner, count or "", now)
            for owner, count in zip(owners, counts, strict=True)
        }

    async def _settle(
        self, key: str, runner: RunnerInfo, ttl: float, answer: list[Any],
        unchanged: tuple[str, ...], generation: int, watched: bool,
    ) -> Grant | Denied:
        """What one answer of the acquire script means for ``key``."""
        if answer[0] == "denied" and len(answer) == 8:  # refused by a holder, not by a restart
            owner, fence, pid = answer[3:6]
            died = self.locks.died_here(owner)
            if died:
                answer = await self._ask(key, runner, ttl, dead=(owner, fence), unchanged=unchanged)
            elif died is False and pid:
                self._mourn(key, owner, int(pid))
        if answer[0] == "paused":
            return Denied(holder=None, expires_in=None, paused=True)
        if answer[0] == "denied":
            if len(answer) < 8:
                return Denied(holder=None, expires_in=int(answer[2]) / 1000)
            # Seen now, at the latest: after the server ran the script that last changed it.
            claim_ttl = int(answer[7]) / 1000 if answer[7] else ttl
            matures_in = self._sightings.saw(key, (answer[4], answer[6]), claim_ttl, time.monotonic())
            self._claimed_by[key] = owner = answer[3]
            return Denied(holder=answer[1] or None, expires_in=matures_in, owner=owner or None)
        self._sightings.forget(key)
        self._claimed_by.pop(key, None)
        if self._events.callbacks and self._events.generation != generation:
            # The events connection dropped or came back while this was asked: the grant
            # may come from a server that has since restarted and forgotten it, unseen.
            # Asking again settles it.
            return Denied(holder=None, expires_in=RECONNECT_MIN)
        self._held[key] = int(answer[1])
        if self._events.callbacks and not watched:
            # Asked while that connection was down (and it still is): announced
            # ``dropped`` once it is back.
            self._unwatched.add(key)
            self._events.kick()
        return Grant(fence=int(answer[1]), last_start=decode(answer[2] or None))

    def _hold_liveness(self, runner: RunnerInfo) -> None:
        """Take this runner's liveness lock before its first grant: standbys on this host
        look at it. Without it (a folder that cannot be written) they wait out the TTL."""
        if self._liveness_broken:
            return
        try:
            self.locks.hold(runner.id)
        except OSError as exc:
            self._liveness_broken = True
            log.warning("no liveness lock in %s (%s): a standby on this host will take over "
                        "from this runner only when its leases expire", self.locks.folder, exc)

    async def _ask(
        self, key: str, runner: RunnerInfo, ttl: float, dead: tuple[str, str] = ("", ""),
        unchanged: tuple[str, ...] = ("", "", "", "", ""),
    ) -> list[Any]:
        """One request, asked again with the holder known to be ``dead`` (owner, fence)."""
        return (await self._ask_many(runner, {key: ttl}, {key: unchanged}, dead={key: dead}))[0]

    async def _ask_many(
        self, runner: RunnerInfo, requests: Mapping[str, float],
        unchanged: Mapping[str, tuple[str, ...]], dead: Mapping[str, tuple[str, str]] | None = None,
    ) -> list[list[Any]]:
        """The requests in calls of up to ``ACQUIRE_CHUNK`` (one string each), in one pipeline.
        Each line: key, ttl, a dead holder (owner, fence; two empty fields for none), what
        was seen unchanged."""
        dead = dead or {}
        calls = _calls(list(requests), ACQUIRE_CHUNK, lambda key: (
            f"{key}\t{_ms(requests[key])}\t{TAB.join(dead.get(key, NO_DEAD))}\t{TAB.join(unchanged[key])}\n"
        ))
        head: list[EncodableT] = [runner.id, runner.label, RESTART_QUIET, runner.pid, LINGER_MS,
                                  f"{self.prefix}:"]
        names = [self._key("loops"), self._key("activity", runner.id)]
        answers: dict[str, list[Any]] = {}
        with self._reaching():
            for said in await self._each_chunk(self._acquire_many, names, head, calls):
                for key, answer in zip(said[0], said[1], strict=True):
                    answers[key] = answer.split("\t")
        return [answers[key] for key in requests]

    async def renew(
        self, runner: RunnerInfo, leases: Mapping[str, tuple[int, float]]
    ) -> dict[str, Renewal]:
        if not leases:
            return {}
        # Up to RENEW_CHUNK leases per script call (the server runs each call alone, so a
        # chunk keeps it short), every chunk in one pipeline: one round trip in all. A call
        # carries its leases as one string and is answered with the few not held.
        keys = list(leases)
        activity = [self._key("activity", runner.id)]
        calls = _calls(keys, RENEW_CHUNK, lambda key: f"{key}\t{leases[key][0]}\t{_ms(leases[key][1])}\n")
        answers = dict.fromkeys(keys, Renewal.HELD)
        head: list[EncodableT] = [runner.id, LINGER_MS, self._key("lease") + ":", self._key("loop") + ":"]
        with self._reaching():
            for chunk, result in await self._each_chunk(self._renew_many, activity, head, calls,
                                                        client=self._renewals):
                for i in range(0, len(result), 2):
                    key = chunk[int(result[i]) - 1]
                    answers[key] = Renewal(result[i + 1])
                    self._held.pop(key, None)
                    self._unwatched.discard(key)
        return answers

    async def release(self, key: str, runner: RunnerInfo, fence: int) -> bool:
        return key in await self.release_many(runner, {key: fence})

    async def release_many(self, runner: RunnerInfo, leases: Mapping[str, int]) -> set[str]:
        keys = list(leases)
        released: set[str] = set()
        with self._reaching():
            for start in range(0, len(keys), RENEW_CHUNK):  # the server runs each call alone
                chunk = keys[start:start + RENEW_CHUNK]
                answers = await self._release_many(
                    [self._key("lease", key) for key in chunk],
                    [runner.id, *(str(leases[key]) for key in chunk)],
                )
                released.update(key for key, done in zip(chunk, answers, strict=True) if done)
        for key, fence in leases.items():
            self._unheld(key, fence)
        return released

    def _unheld(self, key: str, fence: int) -> None:
        """The lease of ``key`` under ``fence`` is no longer this coordinator's to watch."""
        if self._held.get(key) == fence:
            del self._held[key]
            self._unwatched.discard(key)

    async def hand_over(
        self, key: str, holder: RunnerInfo, fence: int, heir: RunnerInfo, ttl: float
    ) -> Grant | None:
        with self._reaching():
            answer = await self._hand_over(
                [self._key("lease", key), self._key("fence", key), self._key("loop", key),
                 self._key("activity", heir.id)],
                [holder.id, str(fence), heir.id, heir.label, _ms(ttl), heir.pid, LINGER_MS],
            )
        self._unheld(key, fence)
        if answer[0] != "granted":
            return None
        # Taken once granted (a standby that looks before sees no lock file, and waits).
        self._hold_liveness(heir)
        self._held[key] = int(answer[1])
        return Grant(fence=int(answer[1]), last_start=decode(answer[2] or None))

    async def revoke(self, key: str) -> int | None:
        with self._reaching():
            fence = await self._revoke([self._key("lease", key)])
        return None if fence is None else int(fence)

    async def forget(self, key: str) -> bool:
        with self._reaching():
            done = await self._forget_loop(
                [self._key("lease", key), self._key("loops"), self._key("loop", key)], [key]
            )
        return bool(int(done))

    # -- reports and status ----------------------------------------------------------

    async def report(self, runner: RunnerInfo, ttl: float, stats: Sequence[LoopStats]) -> None:
        with self._reaching():
            await self._heartbeat(
                [self._key("runners"), self._key("runner-labels"), self._key("runner-hosts")],
                [runner.id, runner.label, repr(float(ttl)), hosts_text(runner)],
            )
            # Up to RENEW_CHUNK loops per script call, one round trip in all.
            items = list(stats)
            for start in range(0, len(items), RENEW_CHUNK):
                chunk = items[start:start + RENEW_CHUNK]
                entries = []
                for item in chunk:
                    fields = stats_fields(item)
                    entries.append([
                        item.key, item.passes, item.errors,
                        {name: _json(value) for name, value in fields.items() if value is not None},
                        [name for name, value in fields.items() if value is None],
                    ])
                names = [self._key("loops"), *(self._key("loop", item.key) for item in chunk)]
                await self._report(names, [json.dumps(entries)])

    async def set_paused(self, key: str, paused: bool) -> None:
        with self._reaching():
            pipe = self._client.pipeline(transaction=True)
            pipe.sadd(self._key("loops"), key)
            pipe.hset(self._key("loop", key), "paused", "1" if paused else "0")
            await pipe.execute()

    # -- settings ----------------------------------------------------------------------

    async def write_setting(self, name: str, value: str, fence: int) -> bool:
        with self._reaching():
            stored = await self._write_setting([self._key("setting", name)], [value, str(fence)])
        return bool(int(stored))

