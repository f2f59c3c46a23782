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
(sorted set of runner ids by expiry), ``runner-labels`` and ``runner-hosts`` (hashes).

Needs Redis 5 or later: a script that reads ``TIME`` and then writes relies on
effects replication, the default since then. Not for Redis Cluster: one script
touches several keys that are not in one hash slot.

URL query parameters: ``prefix`` (default ``ostinato``) namespaces every key
and the event channel; ``timeout`` (seconds, default 2) bounds connecting and
each reply, and redis-py's own retries are off, so one renewal cannot outlive
a short lease. Events travel over Redis pub/sub.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    InvalidResponse,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT, FieldT

from ostinato.coordinators import redact
from ostinato.coordinators.liveness import RunnerLocks, host_folder
from ostinato.coordinators.network import RECONNECT_MIN, EventFeed, take_options, unavailable
from ostinato.coordinators.protocol import (
    STAT_FIELDS,
    Coordinator,
    Denied,
    Event,
    Grant,
    LoopRecord,
    LoopStats,
    Renewal,
    RunnerInfo,
    RunnerRecord,
    Sightings,
    hosts_from,
    hosts_text,
    stats_fields,
)
from ostinato.errors import ConfigurationError, CoordinatorUnavailable

log = logging.getLogger("ostinato.redis")

# Errors that mean "no Redis to talk to right now" (down, loading, a read-only
# replica after a failover, something else on the port), as opposed to a bug.
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, InvalidResponse, OSError)

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

# KEYS: lease, fence, loop hash, loop set. ARGV: owner, holder, ttl ms, loop key, quiet s,
# pid, the owner and fence of a holder known to be dead, and the fence and renewal count
# of a claim the caller saw unchanged for its TTL ('' for none). A refusal says who
# holds it, ms left by the server's clock, owner, fence, pid, renewal count and TTL ms.
ACQUIRE = """
redis.call('SADD', KEYS[4], ARGV[4])
if redis.call('HGET', KEYS[3], 'paused') == '1' then return {'paused'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local owner = redis.call('HGET', KEYS[1], 'owner')
local held = redis.call('HGET', KEYS[1], 'fence')
local beat = redis.call('HGET', KEYS[1], 'beat') or '0'
if owner and owner ~= ARGV[1] and not (owner == ARGV[7] and held == ARGV[8])
   and not (held == ARGV[9] and beat == ARGV[10]) then
  local ends = tonumber(redis.call('HGET', KEYS[1], 'ends') or '')
  local left = ends and string.format('%d', ends - now) or redis.call('PTTL', KEYS[1])
  return {'denied', redis.call('HGET', KEYS[1], 'holder') or '', left, owner, held or '',
    redis.call('HGET', KEYS[1], 'pid') or '', beat, redis.call('HGET', KEYS[1], 'ttl') or ''}
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  -- A server that refuses INFO to scripts (some hosted ones) is taken to be up long.
  local info = redis.pcall('INFO', 'server')
  local up = type(info) == 'string' and string.match(info, 'uptime_in_seconds:(%d+)')
  if up and tonumber(up) <= tonumber(ARGV[5]) then return {'denied', '', 250} end
  redis.call('SET', KEYS[2], t[1] .. string.format('%06d', tonumber(t[2])))
end
redis.call('INCR', KEYS[2])
-- GET returns the counter as a string, never as a rounded Lua number.
local fence = redis.call('GET', KEYS[2])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'holder', ARGV[2], 'fence', fence, 'pid', ARGV[6],
  'since', t[1] .. '.' .. string.format('%06d', tonumber(t[2])), 'beat', '0', 'ttl', ARGV[3],
  'ends', string.format('%d', now + tonumber(ARGV[3])))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) + tonumber(ARGV[11]))
return {'granted', fence, redis.call('HGET', KEYS[3], 'last_start') or ''}
"""

# KEYS: lease, loop hash. ARGV: owner, fence, ttl ms, linger ms. A renewal after the claim
# ended by the server's clock is refused, and changes nothing.
RENEW = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1]
   or redis.call('HGET', KEYS[1], 'fence') ~= ARGV[2] then return 'lost' end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ends = tonumber(redis.call('HGET', KEYS[1], 'ends') or '')
if ends and ends <= now then return 'lost' end
if redis.call('HGET', KEYS[2], 'paused') == '1' then
  redis.call('DEL', KEYS[1])
  return 'paused'
end
redis.call('HINCRBY', KEYS[1], 'beat', 1)
redis.call('HSET', KEYS[1], 'ttl', ARGV[3], 'ends', string.format('%d', now + tonumber(ARGV[3])))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) + tonumber(ARGV[4]))
return 'held'
"""

# KEYS: lease. ARGV: owner, fence.
RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1]
   and redis.call('HGET', KEYS[1], 'fence') == ARGV[2] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: lease. Returns the fence of the lease it dropped, or nil if none was held (a
# claim that ended by the server's clock is dropped all the same).
REVOKE = """
local fence = redis.call('HGET', KEYS[1], 'fence')
if not fence then return nil end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ends = tonumber(redis.call('HGET', KEYS[1], 'ends') or '')
redis.call('DEL', KEYS[1])
if ends and ends <= now then return nil end
return fence
"""

# KEYS: runner zset (score: expiry in server seconds), labels hash. ARGV: id, label, ttl s.
HEARTBEAT = """
local t = redis.call('TIME')
local now = string.format('%.6f', t[1] + t[2] / 1e6)
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('HDEL', KEYS[2], gone)
  redis.call('HDEL', KEYS[3], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], string.format('%.6f', t[1] + t[2] / 1e6 + tonumber(ARGV[3])), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
"""

# KEYS: lease hash, loops set, loop stats hash. ARGV: loop key. 0 while a claim on the
# lease has not ended (a lease hash without an end counts as held); else the loop is
# dropped from status (its fence key stays) and 1 is returned.
FORGET = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if redis.call('EXISTS', KEYS[1]) == 1 then
  local ends = redis.call('HGET', KEYS[1], 'ends')
  if not ends or tonumber(ends) > now then
    return 0
  end
end
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return 1
"""

# KEYS: runner zset, labels hash, hosts hash. Returns id, expiry, label, hosts fours.
LIVE_RUNNERS = """
local t = redis.call('TIME')
local rows = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. string.format('%.6f', t[1] + t[2] / 1e6),
  '+inf', 'WITHSCORES')
local out = {}
for i = 1, #rows, 2 do
  out[#out + 1] = rows[i]
  out[#out + 1] = rows[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[2], rows[i]) or ''
  out[#out + 1] = redis.call('HGET', KEYS[3], rows[i]) or ''
end
return out
"""

def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _decode(value: str | None) -> Any:
    return None if value is None else json.loads(value)


class RedisCoordinator(Coordinator):
    """Leases in Redis keys with server-side expiry, guarded by Lua scripts."""

    def __init__(self, url: str) -> None:
        self.display_url = redact(url)
        self._url, options = take_options(url, {"prefix": "ostinato"})
        self.prefix, self.timeout = options["prefix"], float(options["timeout"])
        if not self.prefix:
            raise ConfigurationError(f"bad Redis URL {self.display_url!r}: empty prefix")
        self._password = urlsplit(url).password
        self._client = self._make_client(self.timeout)
        # No read timeout for pub/sub: it waits for messages for as long as it takes.
        self._events_client = self._make_client(None)
        self._acquire = self._client.register_script(ACQUIRE)
        self._renew = self._client.register_script(RENEW)
        self._release = self._client.register_script(RELEASE)
        self._revoke = self._client.register_script(REVOKE)
        self._heartbeat = self._client.register_script(HEARTBEAT)
        self._live_runners = self._client.register_script(LIVE_RUNNERS)
        self._forget_loop = self._client.register_script(FORGET)
        self.channel = f"{self.prefix}:events"
        self._events = EventFeed[PubSub](
            f"ostinato-redis-events:{self.prefix}", self.display_url, self._messages,
            self._listen, self._drop, UNREACHABLE, self._unavailable, self._connection_lost,
            self._reconnected,
        )
        self._closed = False
        # The leases granted here and not yet given up or lost: loop -> fence.
        self._held: dict[str, int] = {}
        # Those of them granted while the events connection was down, so by a server
        # that may have restarted unseen since.
        self._unwatched: set[str] = set()
        self.locks = RunnerLocks(host_folder())
        self._liveness_broken = False
        # Claims seen on refusals, so that expiry is judged on this host's clock.
        self._sightings = Sightings()
        # Holders on this host that refused us, by runner id: who waits, for which loops.
        self._mourners: dict[str, tuple[asyncio.Task[None], set[str]]] = {}

    def _make_client(self, read_timeout: float | None) -> aioredis.Redis:
        return aioredis.Redis.from_url(
            self._url,
            decode_responses=True,
            socket_timeout=read_timeout,
            socket_connect_timeout=self.timeout,
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            client_name=f"ostinato:{self.prefix}",  # tells operators whose connections these are
        )

    def _key(self, kind: str, key: str = "") -> str:
        return f"{self.prefix}:{kind}:{key}" if key else f"{self.prefix}:{kind}"

    @contextlib.contextmanager
    def _reaching(self) -> Iterator[None]:
        if self._closed:
            raise CoordinatorUnavailable(f"the coordinator {self.display_url} is closed")
        try:
            yield
        except UNREACHABLE as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: BaseException) -> CoordinatorUnavailable:
        return unavailable("Redis", self.display_url, self._password, exc)

    async def open(self) -> None:
        try:
            with self._reaching():
                await self._client.ping()
        except CoordinatorUnavailable as exc:
            if isinstance(exc.__cause__, AuthenticationError):
                raise ConfigurationError(f"{exc}; check the user and password in the URL") from None
            raise
        except ResponseError as exc:  # SELECT of a database the server does not have, say
            text = str(exc).replace(self._password, "***") if self._password else str(exc)
            raise ConfigurationError(
                f"Redis at {self.display_url} refused the connection: {text}; check the URL "
                "(redis://host:port/DB, where DB is below the server's 'databases' setting)"
            ) from None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        mourners = [task for task, _ in self._mourners.values()]
        for task in mourners:
            task.cancel()
        if mourners:
            await asyncio.wait(mourners, timeout=self.timeout)
        await self._events.stop(self.timeout)
        await self._client.aclose()
        await self._events_client.aclose()
        self.locks.release_all()

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
        unchanged: dict[str, tuple[str, str]] = {}
        for key in requests:
            seen = self._sightings.unchanged(key, now)
            unchanged[key] = ("", "") if seen is None else (str(seen[0]), str(seen[1]))
        answers = await self._ask_many(runner, requests, unchanged)
        return {
            key: await self._settle(key, runner, ttl, answer, unchanged[key], generation, watched)
            for (key, ttl), answer in zip(requests.items(), answers, strict=True)
        }

    async def _settle(
        self, key: str, runner: RunnerInfo, ttl: float, answer: list[Any],
        unchanged: tuple[str, str], generation: int, watched: bool,
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
            return Denied(holder=answer[1] or None, expires_in=matures_in)
        self._sightings.forget(key)
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
        return Grant(fence=int(answer[1]), last_start=_decode(answer[2] or None))

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
        unchanged: tuple[str, str] = ("", ""),
    ) -> list[Any]:
        with self._reaching():
            answer: list[Any] = await self._acquire(
                self._acquire_keys(key), self._acquire_args(key, runner, ttl, dead, unchanged)
            )
        return answer

    async def _ask_many(
        self, runner: RunnerInfo, requests: Mapping[str, float], unchanged: Mapping[str, tuple[str, str]]
    ) -> list[list[Any]]:
        """The acquire script for every request, in one pipeline."""
        with self._reaching():
            pipe = self._client.pipeline(transaction=False)
            for key, ttl in requests.items():
                await self._acquire(
                    self._acquire_keys(key), self._acquire_args(key, runner, ttl, unchanged=unchanged[key]),
                    client=pipe,
                )
            answers: list[list[Any]] = await pipe.execute()
        return answers

    def _acquire_keys(self, key: str) -> list[str]:
        return [self._key("lease", key), self._key("fence", key), self._key("loop", key),
                self._key("loops")]

    @staticmethod
    def _acquire_args(
        key: str, runner: RunnerInfo, ttl: float, dead: tuple[str, str] = ("", ""),
        unchanged: tuple[str, str] = ("", ""),
    ) -> list[EncodableT]:
        return [runner.id, runner.label, _ms(ttl), key, RESTART_QUIET, runner.pid, *dead,
                *unchanged, LINGER_MS]

    def _mourn(self, key: str, owner: str, pid: int) -> None:
        """Announce ``released`` for ``key`` once ``owner``, a runner of this host, dies."""
        if self._closed or not self._events.callbacks:
            return
        if owner in self._mourners:
            self._mourners[owner][1].add(key)
            return
        keys = {key}
        task = asyncio.get_running_loop().create_task(self._await_death(owner, pid, keys))
        self._mourners[owner] = (task, keys)

    async def _await_death(self, owner: str, pid: int, keys: set[str]) -> None:
        try:
            await self.locks.wait_for_death(owner, pid)
        finally:
            self._mourners.pop(owner, None)
        for key in keys:
            self._events.deliver(Event("released", key))

    def _connection_lost(self) -> None:
        """The events connection dropped: the server may have restarted and forgotten
        every lease, so the runner stops their passes and asks for them again."""
        held, self._held = self._held, {}
        self._unwatched.clear()
        for key in held:
            self._events.deliver(Event("dropped", key))

    def _reconnected(self) -> None:
        """The events connection is back: a lease granted while it was down may come from
        a server that restarted in the meantime, unseen, so it is asked for again."""
        unwatched, self._unwatched = self._unwatched, set()
        for key in unwatched:
            if self._held.pop(key, None) is not None:
                self._events.deliver(Event("dropped", key))

    async def renew(
        self, runner: RunnerInfo, leases: Mapping[str, tuple[int, float]]
    ) -> dict[str, Renewal]:
        if not leases:
            return {}
        calls = {
            key: (self._key("lease", key), self._key("loop", key), runner.id, str(fence), _ms(ttl),
                  LINGER_MS)
            for key, (fence, ttl) in leases.items()
        }
        answers: dict[str, Renewal] = {}
        with self._reaching():
            # EVALSHA straight into one pipeline: redis-py's script-aware pipeline would
            # spend a SCRIPT EXISTS round trip first on every renewal.
            for _ in range(2):
                pipe = self._client.pipeline(transaction=False)
                for args in calls.values():
                    pipe.evalsha(self._renew.sha, 2, *args)
                results = await pipe.execute(raise_on_error=False)
                missing = {}
                for (key, args), result in zip(calls.items(), results, strict=True):
                    if isinstance(result, NoScriptError):
                        missing[key] = args
                    elif isinstance(result, BaseException):
                        raise result
                    else:
                        answers[key] = Renewal(result)
                        if answers[key] is not Renewal.HELD:
                            self._held.pop(key, None)
                            self._unwatched.discard(key)
                if not missing:
                    break
                self._renew.sha = await self._client.script_load(RENEW)
                calls = missing
        return answers

    async def release(self, key: str, runner: RunnerInfo, fence: int) -> bool:
        with self._reaching():
            released = await self._release([self._key("lease", key)], [runner.id, str(fence)])
        if self._held.get(key) == fence:
            del self._held[key]
            self._unwatched.discard(key)
        return bool(released)

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
            if not stats:
                return
            pipe = self._client.pipeline(transaction=True)
            for item in stats:
                loop = self._key("loop", item.key)
                pipe.sadd(self._key("loops"), item.key)
                pipe.hincrby(loop, "passes", item.passes)
                pipe.hincrby(loop, "errors", item.errors)
                fields = stats_fields(item)
                stored: dict[FieldT, EncodableT] = {
                    name: json.dumps(value) for name, value in fields.items() if value is not None
                }
                if stored:
                    pipe.hset(loop, mapping=stored)
                cleared = [name for name, value in fields.items() if value is None]
                if cleared:
                    pipe.hdel(loop, *cleared)
            await pipe.execute()

    async def runners(self) -> list[RunnerRecord]:
        with self._reaching():
            rows = await self._live_runners(
                [self._key("runners"), self._key("runner-labels"), self._key("runner-hosts")]
            )
        return [
            RunnerRecord(id=rows[i], label=rows[i + 2], seen=float(rows[i + 1]),
                         hosts=hosts_from(rows[i + 3]))
            for i in range(0, len(rows), 4)
        ]

    async def set_paused(self, key: str, paused: bool) -> None:
        with self._reaching():
            pipe = self._client.pipeline(transaction=True)
            pipe.sadd(self._key("loops"), key)
            pipe.hset(self._key("loop", key), "paused", "1" if paused else "0")
            await pipe.execute()

    async def loops(self) -> list[LoopRecord]:
        with self._reaching():
            keys = sorted(str(k) for k in await self._client.smembers(self._key("loops")))
            seconds, micros = await self._client.time()
            now_ms = seconds * 1000 + micros // 1000
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(self._key("lease", key))
                pipe.get(self._key("fence", key))
                pipe.hgetall(self._key("loop", key))
            rows = await pipe.execute()
        records = []
        for n, key in enumerate(keys):
            lease, fence, loop = rows[3 * n: 3 * n + 3]
            if "ends" in lease and int(lease["ends"]) <= now_ms:
                lease = {}  # kept for standbys to judge, but no longer held
            records.append(
                LoopRecord(
                    key=key,
                    fence=int(fence or 0),
                    paused=loop.get("paused") == "1",
                    holder=lease.get("holder"),
                    held_since=float(lease["since"]) if "since" in lease else None,
                    passes=int(loop.get("passes", 0)),
                    errors=int(loop.get("errors", 0)),
                    **{name: _decode(loop.get(name)) for name in STAT_FIELDS},
                )
            )
        return records

    # -- events ------------------------------------------------------------------------

    async def publish(self, event: Event) -> None:
        payload = json.dumps({"kind": event.kind, "key": event.key})
        with self._reaching():
            await self._client.publish(self.channel, payload)

    async def subscribe(self, runner: RunnerInfo, callback: Callable[[Event], None]) -> None:
        if not self._events.started:
            with self._reaching():
                self._events.start(await self._listen())
        self._events.callbacks.append(callback)

    async def _listen(self) -> PubSub:
        """A pub/sub connection whose subscription the server has confirmed."""
        pubsub = self._events_client.pubsub()
        try:
            async with asyncio.timeout(self.timeout):
                await pubsub.subscribe(self.channel)
                while (await pubsub.get_message(timeout=self.timeout)) is None:
                    pass
        except BaseException:
            await self._drop(pubsub)
            raise
        return pubsub

    @staticmethod
    async def _messages(pubsub: PubSub) -> AsyncIterator[str]:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
            if message is not None and message.get("type") == "message":
                yield message["data"]

    @staticmethod
    async def _drop(pubsub: PubSub) -> None:
        with contextlib.suppress(RedisError, OSError):
            await cast(Any, pubsub).aclose()  # typed in some redis-py releases, not in others

    # -- tests -------------------------------------------------------------------------

    async def drop_everything(self) -> None:
        """Delete every key under this coordinator's prefix (for tests)."""
        client = self._make_client(self.timeout)
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in self.prefix) + ":*"
        try:
            async for name in client.scan_iter(match=pattern, count=500):
                await client.delete(name)
        finally:
            await client.aclose()
