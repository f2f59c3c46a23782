"""kill -9 of the aggregator's holder during load: every accepted sample is counted once, none lost."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from examples.pipeline.store_redis import RedisStore

from tests.pipeline.stack import Stack, wait_for
from tests.servers import redis_url


def taken_over(stack: Stack, before: dict[str, tuple[str | None, int]], victim: str) -> Callable[[], bool]:
    """Whether every partition ``victim`` held has another holder, with a greater fence."""
    mine = [key for key, (holder, _) in before.items() if holder == victim]

    def done() -> bool:
        now = stack.holders()
        return all(now[k][0] not in (None, victim) and now[k][1] > before[k][1] for k in mine)

    return done


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "kills"), [
    ("sqlite", 5),
    pytest.param("redis", 3, marks=pytest.mark.backend),
])
@pytest.mark.extended
def test_kills_of_the_aggregators_holder_lose_no_sample_and_count_none_twice(
    tmp_path: Path, kind: str, kills: int,
) -> None:
    """Five (three on the Redis store) kill -9s of the runner holding the most aggregator
    partitions, during load; after the queue drains, /v1/totals equals the load generator's own
    count of accepted bundles and samples. Passes run back to back on small batches, so a kill
    lands inside one most of the time."""
    env = {"PIPELINE_PAUSE": "0s", "PIPELINE_BATCH": "40"}
    if kind == "redis":
        env.update(PIPELINE_STORE=redis_url(), PIPELINE_REDIS_PREFIX=f"pipeline-test-{uuid.uuid4().hex[:12]}")
    stack = Stack.make(tmp_path, **env)
    try:
        stack.serve()
        for _ in range(2):
            stack.runner()
        wait_for(lambda: (h := stack.holders()) and len(h) == 4 and all(v[0] for v in h.values()),
                 what="every partition held")
        load = stack.load(rate=600, seconds=3 + 2.2 * kills)
        victims = []
        for _ in range(kills):
            time.sleep(2.0)
            before = stack.holders()
            counts: dict[str, int] = {}
            for holder, _ in before.values():
                if holder in stack.runners:
                    counts[holder] = counts.get(holder, 0) + 1
            victim = max(counts, key=lambda h: counts[h])
            stack.runners.pop(victim).kill()
            victims.append(victim)
            stack.runner()  # two runners again
            wait_for(taken_over(stack, before, victim), what="the takeover")
        out, _ = load.communicate(timeout=60)
        summary = json.loads(out.decode().splitlines()[-1])
        assert summary["accepted"] > 0
        assert summary["rejected"] == summary["errors"] == 0, summary
        wait_for(lambda: stack.stats()["queue_depth"] == 0, timeout=30, what="an empty queue")
        time.sleep(0.5)
        totals = stack.stats()["totals"]
        assert (totals["bundles"], totals["samples"]) == (summary["accepted"], summary["samples_accepted"])
        assert len(set(victims)) == kills
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()
        if kind == "redis":
            forget(RedisStore(env["PIPELINE_STORE"], env["PIPELINE_REDIS_PREFIX"]))


def forget(store: RedisStore) -> None:
    """Delete every key of ``store``."""
    client = store.connect()
    for key in client.scan_iter(match=f"{store.p}:*", count=1000):
        client.delete(key)
    client.close()
