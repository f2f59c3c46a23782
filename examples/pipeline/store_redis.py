"""The pipeline's store on Redis (``$PIPELINE_STORE=redis://...``): streams for the inbox, hashes
for windows, and Lua scripts that check the fence and write, atomically.

``ostinato.redis_fenced`` applies a fenced batch of blind writes, which cannot say
"only if these bundles are still pending", and reads made before the batch may be
stale by the time it applies. So a drain here is one script of its own: it compares
the pass's fence with the one recorded at ``P:fence:<lease name>`` (the same value
``redis_fenced(client, ctx, prefix="P:fence:")`` reads and writes), refuses when a
greater one is there, checks that every bundle it was given is still in its stream,
and only then records the fence, deletes the bundles and adds them to their windows
and totals. Redis runs a script alone, so another drainer's script comes wholly
before or wholly after.

Keys (``P`` is ``$PIPELINE_REDIS_PREFIX``, default ``pipeline``): ``P:inbox:<slot>``
streams; ``P:win:<width>:<app>:<start>`` hashes (``count``, ``max``, ``version``,
``b<bucket>``) listed in the sorted sets ``P:wins:<width>:<app>``; ``P:apps``;
``P:totals:bundles`` and ``P:totals:samples`` hashes by app; ``P:dirty``, the
``app|minute`` pairs to roll up; ``P:lag:<start>:<part>`` hashes listed in ``P:lags``.
All keys are built inside the scripts, so this store wants one Redis, not a cluster.
Every check of a script comes before its first write; a write fails only on a key of
the wrong type, and then, as in any Redis script, the writes before it stay. How long
an answered bundle survives a Redis crash is Redis's ``appendfsync``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

from examples.pipeline.model import (
    ROLLUP,
    SLOTS,
    WINDOW,
    Bundle,
    Fold,
    Window,
    fold,
    merged,
    window_start,
)

import ostinato

_FENCE = """
local recorded = tonumber(redis.call('GET', KEYS[1]) or '-1')
if recorded > tonumber(ARGV[1]) then
  return {0, tostring(recorded)}
end
"""

_ADD_WINDOW = """
local function add_window(key, w)
  redis.call('HINCRBY', key, 'count', w[3])
  local old = tonumber(redis.call('HGET', key, 'max') or '-1')
  if w[4] > old then redis.call('HSET', key, 'max', w[4]) end
  for bucket, n in pairs(w[5]) do redis.call('HINCRBY', key, 'b' .. bucket, n) end
  redis.call('HINCRBY', key, 'version', 1)
end
"""

# ARGV: fence, prefix, JSON {slots: [[slot, [id...]]...], windows: [[app, start, count, max, {b: n}]...],
# totals: [[app, bundles, samples]...], lag: [start, part, count, max, {b: n}]}. Each slot's ids are
# the head of its stream as read: they must still be exactly what the stream holds between them.
DRAIN = _FENCE + _ADD_WINDOW + """
local p, job = ARGV[2], cjson.decode(ARGV[3])
for _, s in ipairs(job.slots) do
  local ids = s[2]
  local still = redis.call('XRANGE', p .. ':inbox:' .. s[1], ids[1], ids[#ids])
  if #still ~= #ids then return {2, ids[1]} end
  for i, entry in ipairs(still) do
    if entry[1] ~= ids[i] then return {2, ids[i]} end
  end
end
redis.call('SET', KEYS[1], ARGV[1])
for _, s in ipairs(job.slots) do
  local ids = s[2]
  for i = 1, #ids, 1000 do
    redis.call('XDEL', p .. ':inbox:' .. s[1], unpack(ids, i, math.min(i + 999, #ids)))
  end
end
for _, w in ipairs(job.windows) do
  add_window(p .. ':win:10:' .. w[1] .. ':' .. w[2], w)
  redis.call('ZADD', p .. ':wins:10:' .. w[1], w[2], w[2])
  redis.call('SADD', p .. ':apps', w[1])
  redis.call('SADD', p .. ':dirty', w[1] .. '|' .. (w[2] - w[2] % 60))
end
for _, t in ipairs(job.totals) do
  redis.call('HINCRBY', p .. ':totals:bundles', t[1], t[2])
  redis.call('HINCRBY', p .. ':totals:samples', t[1], t[3])
end
local lag = job.lag
add_window(p .. ':lag:' .. lag[1] .. ':' .. lag[2], lag)
redis.call('ZADD', p .. ':lags', lag[1], lag[1] .. ':' .. lag[2])
return {1}
"""

# ARGV: fence, prefix, JSON [[app, minute, count, max, {b: n}, versions, [starts]]...]: each minute
# is written, and leaves the dirty set only if its 10-second windows' versions add up as read.
ROLLUP_SCRIPT = _FENCE + """
local p, job = ARGV[2], cjson.decode(ARGV[3])
redis.call('SET', KEYS[1], ARGV[1])
for _, m in ipairs(job) do
  local key = p .. ':win:60:' .. m[1] .. ':' .. m[2]
  redis.call('DEL', key)
  redis.call('HSET', key, 'count', m[3], 'max', m[4], 'version', 1)
  for bucket, n in pairs(m[5]) do redis.call('HSET', key, 'b' .. bucket, n) end
  redis.call('ZADD', p .. ':wins:60:' .. m[1], m[2], m[2])
  local now = 0
  for _, start in ipairs(m[7]) do
    now = now + tonumber(redis.call('HGET', p .. ':win:10:' .. m[1] .. ':' .. start, 'version') or '0')
  end
  if now == m[6] then redis.call('SREM', p .. ':dirty', m[1] .. '|' .. m[2]) end
end
return {1}
"""

# ARGV: fence, prefix, JSON [[sorted set, member, key]...] to delete.
PRUNE = _FENCE + """
local p, job = ARGV[2], cjson.decode(ARGV[3])
redis.call('SET', KEYS[1], ARGV[1])
for _, d in ipairs(job) do
  redis.call('ZREM', d[1], d[2])
  redis.call('DEL', d[3])
end
return {1}
"""


def _window(fields: dict[bytes, bytes]) -> Window:
    buckets = {int(k[1:]): int(v) for k, v in fields.items() if k.startswith(b"b")}
    return Window(int(fields.get(b"count", 0)), float(fields.get(b"max", 0.0)), buckets)


def _job(app: str, start: int, window: Window) -> list[Any]:
    return [app, start, window.count, window.max, {str(b): n for b, n in window.buckets.items()}]


class RedisStore:
    """The pipeline's keys in one Redis database, and every command run on them."""

    dialect = "redis"

    def __init__(self, url: str, prefix: str | None = None) -> None:
        self.url = url
        self.p = prefix or os.environ.get("PIPELINE_REDIS_PREFIX", "pipeline")
        #: Where fences are recorded, beside the data they guard (as the SQL stores keep their
        #: fences table): a fresh store starts with no fence recorded.
        self.fence_prefix = f"{self.p}:fence:"

    def connect(self, *, poll_lock: bool = False, flush: bool = True, checkpoint: bool = True) -> Any:
        """A client; the flags are ``Store``'s (SQLite's), and mean nothing here."""
        import redis

        return redis.Redis.from_url(self.url)

    def checkpoint(self, conn: Any) -> None:
        """Nothing to do (SQLite's WAL checkpoint; see ``Store.checkpoint``)."""

    def _inbox(self, slot: int) -> str:
        return f"{self.p}:inbox:{slot}"

    def _run(self, conn: Any, script: str, ctx: ostinato.Pass, job: Any) -> list[Any]:
        result: list[Any] = conn.eval(script, 1, self.fence_prefix + ctx.lease_name, ctx.fence, self.p,
                                      json.dumps(job))
        if int(result[0]) == 0:
            raise ostinato.StaleFence(ctx.lease_name, ctx.fence, int(result[1]))
        return result

    # -- the ingest tier -------------------------------------------------------------------

    def add(self, conn: Any, bundles: Sequence[tuple[Bundle, float]]) -> None:
        with conn.pipeline(transaction=True) as pipe:
            for b, received in bundles:
                pipe.xadd(self._inbox(b.slot), {"app": b.app, "source": b.source, "received": received,
                                                "samples": b.samples_json()})
            pipe.execute()

    # -- the loops: each write is one script that checks the fence -------------------------

    def has_pending(self, conn: Any, slots: Sequence[int]) -> bool:
        with conn.pipeline(transaction=False) as pipe:
            for slot in slots:
                pipe.xlen(self._inbox(slot))
            return any(pipe.execute())

    def drain(self, conn: Any, ctx: ostinato.Pass, slots: Sequence[int], part: int,
              limit: int) -> Fold | None:
        """Fold up to ``limit`` pending bundles of ``slots`` into windows and totals and delete
        them, in one fenced script; None when there were none. ``StaleFence`` if stale."""
        with conn.pipeline(transaction=True) as pipe:  # one snapshot of every slot
            for slot in slots:
                pipe.xrange(self._inbox(slot), count=limit)
            streams = pipe.execute()
        entries = [(slot, eid, fields) for slot, rows in zip(slots, streams, strict=True)
                   for eid, fields in rows][:limit]
        if not entries:
            return None
        now = time.time()
        folded = fold((f[b"app"].decode(), json.loads(f[b"samples"])) for _, _, f in entries)
        lag = Window()
        for _, _, fields in entries:
            lag.add(max(0.0, (now - float(fields[b"received"])) * 1000.0))
        by_slot: dict[int, list[str]] = {}
        for slot, eid, _ in entries:
            by_slot.setdefault(slot, []).append(eid.decode())
        job = {
            "slots": [[slot, ids] for slot, ids in by_slot.items()],
            "windows": [_job(app, start, w) for (app, start), w in sorted(folded.windows.items())],
            "totals": [[app, folded.bundles[app], folded.samples[app]] for app in sorted(folded.bundles)],
            "lag": [window_start(now), part, lag.count, lag.max, {str(b): n for b, n in lag.buckets.items()}],
        }
        result = self._run(conn, DRAIN, ctx, job)
        if int(result[0]) == 2:
            # Never expected: a bundle went while the fence was ours.
            raise RuntimeError(f"bundle {result[1]!r} was drained meanwhile; nothing was written")
        return folded

    def rollup(self, conn: Any, ctx: ostinato.Pass, limit: int = 500) -> int:
        dirty = [m.decode() for m in conn.srandmember(f"{self.p}:dirty", limit) or []]
        job = []
        for member in sorted(dirty):
            app, minute_text = member.rsplit("|", 1)
            minute = int(minute_text)
            starts = [minute + i * WINDOW for i in range(ROLLUP // WINDOW)]
            with conn.pipeline(transaction=True) as pipe:
                for start in starts:
                    pipe.hgetall(f"{self.p}:win:10:{app}:{start}")
                rows = pipe.execute()
            present = [(start, row) for start, row in zip(starts, rows, strict=True) if row]
            total = merged(_window(row) for _, row in present)
            versions = sum(int(row.get(b"version", 0)) for _, row in present)
            job.append([*_job(app, minute, total), versions, [s for s, _ in present]])
        self._run(conn, ROLLUP_SCRIPT, ctx, job)
        return len(job)

    def prune(self, conn: Any, ctx: ostinato.Pass, now: float, tens: float, minutes: float) -> int:
        """Delete 10-second windows rolled up and older than ``tens`` seconds (and lags), minutes
        older than ``minutes``. Drained bundles are already gone: a drain deletes them."""
        dirty = {m.decode() for m in conn.smembers(f"{self.p}:dirty")}
        doomed = []
        for app in sorted(a.decode() for a in conn.smembers(f"{self.p}:apps")):
            for width, age in ((WINDOW, tens), (ROLLUP, minutes)):
                index = f"{self.p}:wins:{width}:{app}"
                for raw in conn.zrangebyscore(index, "-inf", f"({int(now - age)}"):
                    start = int(raw)
                    if width == WINDOW and f"{app}|{start - start % 60}" in dirty:
                        continue
                    doomed.append([index, raw.decode(), f"{self.p}:win:{width}:{app}:{start}"])
        for raw in conn.zrangebyscore(f"{self.p}:lags", "-inf", f"({int(now - tens)}"):
            doomed.append([f"{self.p}:lags", raw.decode(), f"{self.p}:lag:{raw.decode()}"])
        self._run(conn, PRUNE, ctx, doomed)
        return len(doomed)

    # -- reads: committed aggregates only --------------------------------------------------

    def totals(self, conn: Any) -> dict[str, int]:
        bundles = conn.hvals(f"{self.p}:totals:bundles")
        samples = conn.hvals(f"{self.p}:totals:samples")
        return {"bundles": sum(int(v) for v in bundles), "samples": sum(int(v) for v in samples)}

    def apps(self, conn: Any) -> dict[str, dict[str, int]]:
        bundles = conn.hgetall(f"{self.p}:totals:bundles")
        samples = conn.hgetall(f"{self.p}:totals:samples")
        return {app.decode(): {"bundles": int(n), "samples": int(samples.get(app, 0))}
                for app, n in sorted(bundles.items())}

    def _windows(self, conn: Any, app: str, width: int, since: float) -> list[tuple[int, Window]]:
        starts = [int(s) for s in conn.zrangebyscore(f"{self.p}:wins:{width}:{app}", int(since), "+inf")]
        with conn.pipeline(transaction=False) as pipe:
            for start in starts:
                pipe.hgetall(f"{self.p}:win:{width}:{app}:{start}")
            rows = pipe.execute()
        return [(start, _window(row)) for start, row in zip(starts, rows, strict=True) if row]

    def windows(self, conn: Any, app: str, width: int, since: float) -> list[dict[str, Any]]:
        return [{"start": start, **w.summary()} for start, w in self._windows(conn, app, width, since)]

    def recent(self, conn: Any, since: float) -> dict[str, list[dict[str, Any]]]:
        apps = sorted(a.decode() for a in conn.smembers(f"{self.p}:apps"))
        return {app: rows for app in apps if (rows := self.windows(conn, app, WINDOW, since))}

    def depth(self, conn: Any) -> int:
        with conn.pipeline(transaction=False) as pipe:
            for slot in range(SLOTS):
                pipe.xlen(self._inbox(slot))
            return sum(pipe.execute())

    def unrolled(self, conn: Any) -> int:
        return int(conn.scard(f"{self.p}:dirty"))

    def _lags(self, conn: Any, since: float) -> list[tuple[int, Window]]:
        members = [m.decode() for m in conn.zrangebyscore(f"{self.p}:lags", int(since), "+inf")]
        with conn.pipeline(transaction=False) as pipe:
            for member in members:
                pipe.hgetall(f"{self.p}:lag:{member}")
            rows = pipe.execute()
        return [(int(m.split(":")[0]), _window(row)) for m, row in zip(members, rows, strict=True) if row]

    def lags(self, conn: Any, since: float) -> list[dict[str, Any]]:
        by_start: dict[int, Window] = {}
        for start, window in self._lags(conn, since):
            by_start.setdefault(start, Window()).merge(window)
        return [{"start": start, **window.summary()} for start, window in sorted(by_start.items())]

    def lag_total(self, conn: Any, since: float) -> Window:
        return merged(window for _, window in self._lags(conn, since))
