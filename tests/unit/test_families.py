"""Partitions and keys: declarations, names, the rules for the partition count in force, and
status grouped by loop. Pure functions and the memory coordinator; nothing sleeps."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

import ostinato
from ostinato import control
from ostinato.coordinators import LoopRecord
from ostinato.coordinators.memory import MemoryCoordinator
from ostinato.errors import DeclarationError, UnknownLoopError
from ostinato.families import Count, clean_keys, keys_setting, may_run, should_ask
from ostinato.loop import Pass, family_of
from ostinato.observe import unhealthy


def app() -> ostinato.App:
    return ostinato.App("a", coordinator=f"memory://{uuid.uuid4().hex}")


@pytest.mark.parametrize(
    ("options", "field", "says"),
    [
        ({"partitions": 0}, "partitions", "from 1 to 100,000"),
        ({"partitions": True}, "partitions", "whole number"),
        ({"partitions": 2.5}, "partitions", "whole number"),
        ({"keys": ["a", "b"]}, "keys", "not callable"),
        ({"keys": list, "partitions": 2}, "keys", "not both"),
        ({"refresh": "10s"}, "refresh", "keys= only"),
        ({"keys": list, "refresh": "-1s"}, "refresh", "refresh"),
        ({"partition": 4}, "partition", "did you mean partitions=?"),
    ],
)
def test_bad_declarations_name_the_loop_and_the_field(options: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(DeclarationError) as caught:
        app().loop(name="shard", **options)(lambda ctx: None)
    assert caught.value.loop == "shard"
    assert caught.value.field == field
    assert says in str(caught.value)


def test_names_of_members_and_their_loops() -> None:
    assert family_of("a:shard#3") == "a:shard"
    assert family_of("a:sync[acme]") == "a:sync"
    assert family_of("a:sync[x#y]") == "a:sync"
    assert family_of("a:plain") == "a:plain"
    assert Pass("shard", app="a", partition=3, partitions=8).lease_name == "a:shard#3"
    assert Pass("sync", app="a", key="acme").lease_name == "a:sync[acme]"


def test_a_key_source_is_checked_deduplicated_and_sorted() -> None:
    assert clean_keys(["b", "a", "b"]) == ["a", "b"]
    assert clean_keys(k for k in ("z", "y")) == ["y", "z"]
    for bad, says in (("abc", "iterable of strings"), ([1], "must be a string"), ([""], "empty"),
                      (["x" * 201], "longer than 200"), (["a\nb"], "control character"), (None, "iterable")):
        with pytest.raises(ValueError, match=says):
            clean_keys(bad)


def count(n: int, started: float, runner: str) -> Count:
    return Count(n, started, runner, f"host:{runner}")


def test_partitions_run_only_under_the_count_in_force() -> None:
    alive = {"old", "new"}
    force8 = count(8, 100.0, "old")
    assert may_run(8, force8, None, alive)
    assert not may_run(16, force8, None, alive)
    assert not may_run(8, None, None, alive)
    # A live runner started later asks for 16: the runners of 8 stop running theirs.
    wants16 = count(16, 200.0, "new")
    assert not may_run(8, force8, wants16, alive)
    # ... unless it died before making the change.
    assert may_run(8, force8, wants16, {"old"})
    # An older wish changes nothing.
    assert may_run(8, force8, count(16, 50.0, "new"), alive)


def test_the_most_recently_started_runner_asks_for_its_count() -> None:
    alive = {"old", "new", "newer"}
    force8 = count(8, 100.0, "old")
    new = count(16, 200.0, "new")
    newer = count(16, 300.0, "newer")
    assert should_ask(new, force8, None, alive)
    assert not should_ask(count(8, 400.0, "x"), force8, None, alive)  # its count is in force
    assert not should_ask(new, force8, newer, alive)  # a later runner asks for the same count
    assert should_ask(newer, force8, new, alive) is False  # the same count is asked for already
    assert should_ask(count(8, 500.0, "newest"), force8, new, alive | {"newest"})  # rolled back
    assert not should_ask(count(8, 150.0, "mid"), force8, new, alive | {"mid"})  # older: waits
    assert should_ask(new, force8, count(32, 300.0, "gone"), alive)  # the asker died


def record(key: str, **fields: Any) -> LoopRecord:
    return LoopRecord(key=key, fence=1, paused=False, holder=fields.pop("holder", "h:1"),
                      held_since=time.time(), **fields)


async def test_control_acts_on_one_member_or_on_the_whole_loop() -> None:
    store = MemoryCoordinator(uuid.uuid4().hex)
    for i in range(3):
        await store.report(ostinato.coordinators.RunnerInfo.here(), 5.0,
                           [ostinato.coordinators.LoopStats(key=f"a:shard#{i}", passes=1)])
    assert await control.pause(store, "shard#1") == "a:shard#1"
    paused = {r.key for r in await store.loops() if r.paused}
    assert paused == {"a:shard#1"}
    assert await control.pause(store, "a:shard") == "a:shard (3 leases)"
    assert {r.key for r in await store.loops() if r.paused} == {f"a:shard#{i}" for i in range(3)}
    assert await control.resume(store, "shard") == "a:shard (3 leases)"
    assert not [r for r in await store.loops() if r.paused]
    with pytest.raises(UnknownLoopError, match="no loop named 'shard#7'"):
        await control.pause(store, "shard#7")


async def test_status_shows_only_listed_keys_and_groups_members_under_their_loop() -> None:
    store = MemoryCoordinator(uuid.uuid4().hex)
    runner = ostinato.coordinators.RunnerInfo.here()
    stats = [ostinato.coordinators.LoopStats(key=k, passes=2, last_outcome="worked")
             for k in ("a:sync", "a:sync[acme]", "a:sync[gone]", "a:sync[globex]", "a:plain")]
    await store.report(runner, 5.0, stats)
    await store.write_setting(keys_setting("a:sync"), '{"keys": ["acme", "globex"], "at": 0}', 1)
    rows = await control.status(store)
    assert sorted(r["loop"] for r in rows) == ["plain", "sync", "sync[acme]", "sync[globex]"]
    member = next(r for r in rows if r["loop"] == "sync[acme]")
    assert (member["family"], member["member"]) == ("a:sync", "[acme]")
    text = control.table(rows)
    assert "a:sync (2 keys)" in text
    assert "[acme]" not in text
    assert "  [acme]" in control.table(rows, expand=True)


def test_check_names_a_loop_made_of_members_once() -> None:
    rows = [
        {"app": "a", "loop": f"sync[k{i}]", "family": "a:sync", "member": f"[k{i}]",
         "state": "failing" if i < 7 else "running"}
        for i in range(100)
    ]
    problems = unhealthy(rows)
    assert len(problems) == 1
    assert problems[0].startswith("a:sync: 7 of 100 ")
    assert "and 2 more" in problems[0]


def test_an_app_names_members_and_refuses_ones_it_does_not_have() -> None:
    made = app()

    @made.loop(partitions=4)
    def shard(ctx: Pass) -> None: ...

    @made.loop(keys=lambda: ["x"])
    def sync(ctx: Pass) -> None: ...

    assert made._key("shard#3") == "a:shard#3"
    assert made._key("a:sync[anything]") == "a:sync[anything]"
    with pytest.raises(UnknownLoopError, match="#0 to #3"):
        made._key("shard#4")
    with pytest.raises(UnknownLoopError, match="no member"):
        made._key("shard[x]")
