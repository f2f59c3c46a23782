"""ostinato.redis_fenced on redis-py, sync and asyncio: one script applies a batch or nothing."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

import ostinato
from ostinato import StaleFence, fencing
from tests.fencing.stores import LOOP, violations
from tests.servers import redis_url

pytestmark = pytest.mark.backend

CHECK = pytest.mark.parametrize("check", [True, False], ids=["checked", "unchecked"])


class Keys:
    """Unique key names for one test, all removed after it."""

    def __init__(self) -> None:
        self.tag = f"test-fencing:{uuid.uuid4().hex[:10]}"
        self.prefix = f"{self.tag}:fence:"

    def __call__(self, name: str) -> str:
        return f"{self.tag}:{name}"


@pytest.fixture(params=["sync", "asyncio"])
async def client(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Any, Keys]]:
    import redis
    import redis.asyncio

    url, keys = redis_url(), Keys()
    made: Any = redis.Redis.from_url(url) if request.param == "sync" else redis.asyncio.Redis.from_url(url)
    yield made, keys
    cleaner = redis.Redis.from_url(url)
    found = cleaner.keys(f"{keys.tag}:*")
    if found:
        cleaner.delete(*found)
    cleaner.close()
    if request.param == "sync":
        made.close()
    else:
        await made.aclose()


async def publish(client: Any, keys: Keys, fence: int, value: str) -> list[Any]:
    """One fenced batch of every kind of command; returns its results."""
    batch = ostinato.redis_fenced(client, loop=LOOP, fence=fence, prefix=keys.prefix)
    (batch.set(keys("latest"), value, ex=60)
     .hset(keys("totals"), "value", value, mapping={"fence": fence})
     .zadd(keys("ranking"), {value: fence})
     .xadd(keys("log"), {"fence": fence, "value": value}, maxlen=1000)
     .incrby(keys("count"), 1)
     .delete(keys("scratch"))
     .expire(keys("totals"), 3600))
    if hasattr(client, "aclose"):
        async with batch:
            pass
    else:
        with batch:
            pass
    return batch.results


async def read(client: Any, keys: Keys) -> tuple[Any, list[tuple[int, int, str]]]:
    async def wait(value: Any) -> Any:
        return await value if hasattr(value, "__await__") else value

    latest = await wait(client.get(keys("latest")))
    log = await wait(client.xrange(keys("log")))
    return latest, [(i, int(f[b"fence"]), f[b"value"].decode()) for i, (_, f) in enumerate(log)]


@CHECK
async def test_newer_fence_then_older_one(client: tuple[Any, Keys], monkeypatch: pytest.MonkeyPatch,
                                          check: bool) -> None:
    """After fence 2's batch, fence 1's batch is refused and applies nothing; unchecked, it
    overwrites the newer value and the checker sees the stale entry."""
    monkeypatch.setattr(fencing, "_CHECK", check)
    redis, keys = client
    results = await publish(redis, keys, 2, "newer")
    assert results[0] is True or results[0] in (b"OK", "OK")
    assert results[4] == 1  # INCRBY's new value
    if check:
        with pytest.raises(StaleFence) as refused:
            await publish(redis, keys, 1, "stale")
        assert (refused.value.loop, refused.value.fence, refused.value.newer) == (LOOP, 1, 2)
        latest, log = await read(redis, keys)
        assert latest == b"newer"
        assert [v for _, _, v in log] == ["newer"]
    else:
        await publish(redis, keys, 1, "stale")
        latest, log = await read(redis, keys)
        assert latest == b"stale"
        assert violations(log) == [(1, 2)]


@CHECK
async def test_a_stale_batch_begun_first(client: tuple[Any, Keys], monkeypatch: pytest.MonkeyPatch,
                                         check: bool) -> None:
    """A stale holder fills its batch, the newer holder's batch lands meanwhile, then the stale
    block ends: refused (nothing applied); unchecked, applied after the newer one."""
    monkeypatch.setattr(fencing, "_CHECK", check)
    redis, keys = client
    stale = ostinato.redis_fenced(redis, loop=LOOP, fence=1, prefix=keys.prefix)
    is_async = hasattr(redis, "aclose")
    await stale.__aenter__() if is_async else stale.__enter__()
    stale.xadd(keys("log"), {"fence": 1, "value": "stale"}).set(keys("latest"), "stale")
    await publish(redis, keys, 2, "newer")
    if check:
        with pytest.raises(StaleFence):
            await stale.__aexit__(None, None, None) if is_async else stale.__exit__(None, None, None)
        assert (await read(redis, keys))[0] == b"newer"
        assert violations((await read(redis, keys))[1]) == []
    else:
        await stale.__aexit__(None, None, None) if is_async else stale.__exit__(None, None, None)
        assert violations((await read(redis, keys))[1]) == [(1, 2)]


async def test_a_failing_block_sends_nothing(client: tuple[Any, Keys]) -> None:
    """A block that raises sends no command and records no fence."""
    redis, keys = client
    batch = ostinato.redis_fenced(redis, loop=LOOP, fence=9, prefix=keys.prefix)
    is_async = hasattr(redis, "aclose")
    await batch.__aenter__() if is_async else batch.__enter__()
    batch.set(keys("latest"), "lost")
    error = RuntimeError("the body failed")
    if is_async:
        await batch.__aexit__(RuntimeError, error, None)
    else:
        batch.__exit__(RuntimeError, error, None)
    await publish(redis, keys, 3, "kept")  # fence 9 was never recorded
    assert (await read(redis, keys))[0] == b"kept"
