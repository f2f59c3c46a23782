"""The Redis coordinator's reads of the fleet: live runners, every loop's record, settings
(``redis.py`` has the leases)."""

from __future__ import annotations

import json
from typing import Any, cast

from ostinato.coordinators.protocol import STAT_FIELDS, LoopRecord, RunnerRecord, Setting, hosts_from
from ostinato.coordinators.redis_connections import RedisConnections
from ostinato.coordinators.redis_lua import LIVE_RUNNERS


def decode(value: str | None) -> Any:
    return None if value is None else json.loads(value)


class RedisReads(RedisConnections):
    """What status, the page and the runners' counts read."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._live_runners = self._client.register_script(LIVE_RUNNERS)

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
                    **{name: decode(loop.get(name)) for name in STAT_FIELDS},
                )
            )
        return records

    async def read_setting(self, name: str) -> Setting | None:
        with self._reaching():
            row = await self._client.hmget(self._key("setting", name), ["value", "fence"])
        value, fence = cast("list[str | None]", row)  # text: the client decodes replies
        return None if value is None or fence is None else Setting(value, int(fence))
