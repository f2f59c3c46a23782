"""Fenced writes to Redis: a batch of commands applied by one Lua script, or not at all.

``redis_fenced(client, ctx)`` collects the commands people publish results
with (SET, HSET, ZADD, XADD, INCRBY, DEL, EXPIRE). Leaving the ``with`` block
sends them as one script that compares the pass's fence with the one recorded
for the loop, records it and applies every command, atomically; a greater
recorded fence applies nothing and raises ``StaleFence``. A block that raises
sends nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ostinato import fencing
from ostinato.errors import ConfigurationError, StaleFence

if TYPE_CHECKING:
    from ostinato.loop import Pass

__all__ = ["FencedBatch", "redis_fenced"]

DEFAULT_PREFIX = "ostinato:fence:"

Key = str | bytes
Value = str | bytes | int | float

# KEYS[1] is the fence's key, KEYS[i] (i > 1) the key of command i - 1. ARGV holds the fence,
# whether to compare it, then per command its name, its argument count and its arguments.
# A command that fails (a key of the wrong type) ends the script; the ones before it stay.
_SCRIPT = """
local fence = tonumber(ARGV[1])
local recorded = tonumber(redis.call('GET', KEYS[1]) or '-1')
if ARGV[2] == '1' and recorded > fence then
  return {0, recorded}
end
redis.call('SET', KEYS[1], ARGV[1])
local results, at = {}, 3
for i = 2, #KEYS do
  local count = tonumber(ARGV[at + 1])
  results[i - 1] = redis.call(ARGV[at], KEYS[i], unpack(ARGV, at + 2, at + 1 + count))
  at = at + 2 + count
end
return {1, results}
"""


class FencedBatch:
    """Commands to apply under a fence; built by ``redis_fenced``, sent when the block ends.

    After the block, ``results`` holds each command's reply in order (an XADD's
    entry id, an INCRBY's new value, ...).
    """

    def __init__(self, client: Any, loop: str, fence: int, key: str, is_async: bool) -> None:
        #: The lease name the fence is recorded against, and the fence.
        self.loop, self.fence, self.key = loop, fence, key
        self.results: list[Any] = []
        self._client, self._async = client, is_async
        self._keys: list[Key] = [key]
        self._args: list[Value] = []

    def _add(self, command: str, key: Key, *args: Value) -> FencedBatch:
        self._keys.append(key)
        self._args += [command, len(args), *args]
        return self

    def set(self, key: Key, value: Value, *, ex: float | None = None, px: int | None = None) -> FencedBatch:
        """SET ``key`` to ``value``, with an expiry in seconds (``ex``) or milliseconds (``px``)."""
        extra: list[Value] = []
        if ex is not None:
            extra += ["PX", int(ex * 1000)]
        if px is not None:
            extra += ["PX", px]
        return self._add("SET", key, value, *extra)

    def hset(self, key: Key, field: Key | None = None, value: Value | None = None, *,
             mapping: Mapping[Key, Value] | None = None) -> FencedBatch:
        """HSET one ``field`` to ``value``, and/or every pair of ``mapping``."""
        pairs: list[Value] = [] if field is None else [field, "" if value is None else value]
        for name, item in (mapping or {}).items():
            pairs += [name, item]
        if not pairs:
            raise ConfigurationError("hset() needs a field and value or a mapping")
        return self._add("HSET", key, *pairs)

    def zadd(self, key: Key, mapping: Mapping[Key, float]) -> FencedBatch:
        """ZADD each member of ``mapping`` with its score."""
        if not mapping:
            raise ConfigurationError("zadd() needs a mapping of members to scores")
        args: list[Value] = []
        for member, score in mapping.items():
            args += [score, member]
        return self._add("ZADD", key, *args)

    def xadd(self, key: Key, fields: Mapping[Key, Value], *, id: str = "*",
             maxlen: int | None = None, approximate: bool = True) -> FencedBatch:
        """XADD an entry of ``fields``, trimming the stream to about ``maxlen`` when given."""
        if not fields:
            raise ConfigurationError("xadd() needs at least one field")
        args: list[Value] = []
        if maxlen is not None:
            args += ["MAXLEN", "~" if approximate else "=", maxlen]
        args.append(id)
        for name, item in fields.items():
            args += [name, item]
        return self._add("XADD", key, *args)

    def incrby(self, key: Key, amount: int = 1) -> FencedBatch:
        """INCRBY ``key`` by ``amount``."""
        return self._add("INCRBY", key, amount)

    def delete(self, *keys: Key) -> FencedBatch:
        """DEL each of ``keys``."""
        for key in keys:
            self._add("DEL", key)
        return self

    def expire(self, key: Key, seconds: int) -> FencedBatch:
        """EXPIRE ``key`` in ``seconds``."""
        return self._add("EXPIRE", key, seconds)

    def _outcome(self, reply: Any) -> None:
        ok, value = reply[0], reply[1]
        if int(ok) != 1:
            raise StaleFence(self.loop, self.fence, int(value))
        self.results = list(value)

    def _call(self) -> Any:
        script = self._client.register_script(_SCRIPT)
        args: list[Value] = [self.fence, "1" if fencing._CHECK else "0", *self._args]
        return script(keys=self._keys, args=args)

    def __enter__(self) -> FencedBatch:
        if self._async:
            raise ConfigurationError(
                "this is a redis.asyncio client: use  async with ostinato.redis_fenced(...)"
            )
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            self._outcome(self._call())

    async def __aenter__(self) -> FencedBatch:
        if not self._async:
            raise ConfigurationError("this is a sync Redis client: use  with ostinato.redis_fenced(...)")
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        tb: TracebackType | None) -> None:
        if kind is None:
            self._outcome(await self._call())


def redis_fenced(
    client: object,
    ctx: Pass | None = None,
    *,
    loop: str | None = None,
    fence: int | None = None,
    prefix: str = DEFAULT_PREFIX,
) -> FencedBatch:
    """A batch of Redis commands applied only if no greater fence of the loop was recorded.

    ``with ostinato.redis_fenced(client, ctx) as batch: batch.hset(...)``
    (``async with`` for a ``redis.asyncio`` client). The fence lives at
    ``prefix + lease name``; on Redis Cluster every key of a batch must hash to
    that key's slot (give the prefix and your keys one ``{hash tag}``).
    """
    name, number = fencing.fence_of(ctx, loop, fence)
    kind = type(client).__module__
    if not kind.startswith("redis.") or not callable(getattr(client, "register_script", None)):
        raise ConfigurationError(
            f"ostinato.redis_fenced() needs a redis-py client (redis.Redis or redis.asyncio.Redis), "
            f"not a {kind}.{type(client).__qualname__}"
        )
    return FencedBatch(client, name, number, prefix + name, kind.startswith("redis.asyncio"))
