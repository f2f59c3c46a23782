"""The loops' passes on a real store (SQLite, PostgreSQL): drained exactly once, fenced, rolled up, pruned."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from examples.pipeline import loops
from examples.pipeline.model import Bundle, Window, partition_of, window_start
from examples.pipeline.store import Store, drained_by, pending_ids
from examples.pipeline.store_redis import RedisStore

import ostinato

ROOT = Path(__file__).resolve().parents[2]
AnyStore = Store | RedisStore
APPS = ["shop", "blog", "api", "docs", "admin", "search"]


def add(store: AnyStore, count: int, now: float | None = None, apps: list[str] = APPS) -> list[Bundle]:
    now = time.time() if now is None else now
    bundles = [Bundle(apps[i % len(apps)], "web", tuple((now - (i % 7), float(i % 50 + 1)) for _ in range(3)))
               for i in range(count)]
    with closing(store.connect()) as conn:
        store.add(conn, [(b, now) for b in bundles])
    return bundles


def drain(fence: int, partition: int = 0, partitions: int = 1) -> object:
    return loops.aggregate(ostinato.Pass("aggregate", app="pipeline", fence=fence,
                                         partition=partition, partitions=partitions))


def snapshot(store: AnyStore) -> dict[str, Any]:
    with closing(store.connect()) as conn:
        return {"totals": store.totals(conn), "apps": store.apps(conn), "pending": store.depth(conn),
                "windows": {app: store.windows(conn, app, 10, 0) for app in APPS}}


def test_a_pass_drains_its_bundles_into_windows_and_totals(store: AnyStore) -> None:
    """After one pass every bundle is in a window, counted once, and the next pass is IDLE."""
    bundles = add(store, 500)
    assert drain(fence=1) is None
    seen = snapshot(store)
    assert seen["pending"] == 0
    assert seen["totals"] == {"bundles": 500, "samples": 1500}
    for app in APPS:
        mine = [ms for b in bundles if b.app == app for _, ms in b.samples]
        assert sum(w["count"] for w in seen["windows"][app]) == len(mine)
        assert max(w["max"] for w in seen["windows"][app]) == max(mine)
    assert drain(fence=1) is ostinato.IDLE
    assert snapshot(store) == seen


def test_each_partition_drains_only_its_own_applications(store: AnyStore) -> None:
    """Partition p of 4 leaves other partitions' bundles pending; all four together drain everything."""
    add(store, 240)
    mine = {app for app in APPS if partition_of(app, 4) == 1}
    drain(fence=1, partition=1, partitions=4)
    seen = snapshot(store)
    assert set(seen["apps"]) == mine
    for p in (0, 2, 3):
        drain(fence=1, partition=p, partitions=4)
    assert snapshot(store)["totals"] == {"bundles": 240, "samples": 720}


def test_a_stale_holder_changes_nothing(store: AnyStore) -> None:
    """Once fence 2 has committed a pass, a pass under fence 1 raises StaleFence and leaves every
    table as it was: no bundle marked, no window or total touched."""
    add(store, 100)
    drain(fence=2)
    add(store, 50)
    before = snapshot(store)
    assert before["pending"] == 50
    with pytest.raises(ostinato.StaleFence):
        drain(fence=1)
    assert snapshot(store) == before
    if isinstance(store, Store):
        with closing(store.connect()) as conn:
            assert drained_by(conn, 1) == 0
    assert drain(fence=3) is None
    assert snapshot(store)["totals"] == {"bundles": 150, "samples": 450}


def test_a_pass_that_fails_midway_leaves_nothing_behind(
    store: AnyStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An error after the bundles were marked (before the windows were written) rolls the marks back."""
    if isinstance(store, RedisStore):
        pytest.skip("a Redis drain is one script that checks everything before its first write")
    add(store, 30)
    before = snapshot(store)

    def broken(*args: object) -> None:
        raise RuntimeError("the pass died here")

    monkeypatch.setattr(Store, "_merge_into", broken)
    with pytest.raises(RuntimeError, match="died here"):
        drain(fence=1)
    assert snapshot(store) == before
    monkeypatch.undo()
    drain(fence=1)
    assert snapshot(store)["totals"] == {"bundles": 30, "samples": 90}


def test_rollup_makes_minutes_of_the_ten_second_windows_and_redoes_a_minute_that_changed(
    store: AnyStore,
) -> None:
    """A minute is the merge of its six 10-second windows, and a late bundle re-rolls its minute."""
    now = float(window_start(time.time(), 60) - 60)  # a whole minute in the past
    add(store, 120, now=now + 59)
    drain(fence=1)
    loops.rollup(ostinato.Pass("rollup", app="pipeline", fence=1))
    with closing(store.connect()) as conn:
        for app in APPS:
            tens = store.windows(conn, app, 10, now)
            (minute,) = [w for w in store.windows(conn, app, 60, now) if w["start"] == now]
            assert minute["count"] == sum(w["count"] for w in tens if now <= w["start"] < now + 60)
            assert minute["max"] == max(w["max"] for w in tens if now <= w["start"] < now + 60)
    add(store, 6, now=now + 59)
    drain(fence=1)
    loops.rollup(ostinato.Pass("rollup", app="pipeline", fence=1))
    with closing(store.connect()) as conn:
        minutes = [w for app in APPS for w in store.windows(conn, app, 60, now) if w["start"] == now]
        assert sum(m["count"] for m in minutes) == 126 * 3
        assert store.unrolled(conn) == 0


def test_prune_deletes_old_drained_bundles_but_never_pending_ones(store: AnyStore) -> None:
    """Drained bundles past their age go; pending ones stay however old; totals are kept."""
    if not isinstance(store, Store):
        pytest.skip("a Redis drain deletes the bundles it drains")
    add(store, 20)
    drain(fence=1)
    add(store, 5)
    with closing(store.connect()) as conn:
        conn.execute("UPDATE bundles SET received = received - 3000")
        with store.fenced(conn, ostinato.Pass("prune", app="pipeline", fence=1)):
            store.prune(conn, time.time() + 3600, raw=60, tens=10**9, minutes=10**9)
        assert conn.execute("SELECT COUNT(*) FROM bundles").fetchone()[0] == 5
        assert len(list(pending_ids(conn))) == 5
        assert store.totals(conn) == {"bundles": 20, "samples": 60}


def prune(store: AnyStore, now: float, tens: float, minutes: float) -> None:
    ctx = ostinato.Pass("prune", app="pipeline", fence=1)
    with closing(store.connect()) as conn:
        if isinstance(store, RedisStore):
            store.prune(conn, ctx, now, tens, minutes)
        else:
            with store.fenced(conn, ctx):
                store.prune(conn, now, 600, tens, minutes)


def test_prune_deletes_old_windows_once_rolled_up_and_keeps_recent_ones(store: AnyStore) -> None:
    """Ten-second windows past their age go once their minute is rolled up; minutes and newer
    windows stay; the totals are not touched."""
    now = time.time()
    old = float(window_start(now, 60) - 1200)
    add(store, 12, now=old + 30)
    add(store, 12, now=now)
    drain(fence=1)
    prune(store, now, tens=600, minutes=10**9)  # not rolled up yet: nothing goes
    with closing(store.connect()) as conn:
        assert any(w["start"] < now - 600 for app in APPS for w in store.windows(conn, app, 10, 0))
    loops.rollup(ostinato.Pass("rollup", app="pipeline", fence=1))
    prune(store, now, tens=600, minutes=10**9)
    with closing(store.connect()) as conn:
        tens = [w for app in APPS for w in store.windows(conn, app, 10, 0)]
        assert tens
        assert all(w["start"] >= now - 600 for w in tens)
        assert sum(w["count"] for app in APPS for w in store.windows(conn, app, 60, 0)) == 72
        assert store.totals(conn) == {"bundles": 24, "samples": 72}


def test_lags_are_recorded_per_drained_bundle(store: AnyStore) -> None:
    """Each drained bundle's wait since it was received is in the lag histogram."""
    add(store, 40, now=time.time() - 2.0)
    drain(fence=1)
    with closing(store.connect()) as conn:
        lag: Window = store.lag_total(conn, 0)
    assert lag.count == 40
    assert 1500 < lag.quantile(0.5) < 60_000


@pytest.mark.slow
def test_a_kill_9_before_any_statement_of_a_pass_loses_nothing_and_counts_nothing_twice(
    tmp_path: Path,
) -> None:
    """A pass killed by SIGKILL just before each of its SQL statements in turn (SQLite): after
    every kill, each bundle is either pending or in the totals, never both, never neither; a pass
    that then runs to the end counts every bundle exactly once."""
    db = tmp_path / "pipeline.db"
    store = Store(f"sqlite:///{db}")
    add(store, 60, apps=["shop", "blog"])  # two applications: fewer statements, a shorter test
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PIPELINE_DATA": str(tmp_path)}

    def attempt(k: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tests.pipeline.killed_pass", str(db), str(k)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)

    k = 1
    while (done := attempt(k)).returncode == -signal.SIGKILL:
        with closing(store.connect()) as conn:
            pending = len(list(pending_ids(conn)))
            totals = store.totals(conn)
        assert totals["bundles"] + pending == 60, (k, totals, pending)
        assert totals["bundles"] in (0, 60), (k, totals)
        k += 1
    assert done.returncode == 0, done.stderr
    assert k > 10, "the pass ran fewer statements than expected: was the kill ever inside it?"
    with closing(store.connect()) as conn:
        assert store.totals(conn) == {"bundles": 60, "samples": 180}


def test_a_redis_drain_whose_bundle_went_meanwhile_writes_nothing(
    store: AnyStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If a bundle the pass read is gone by the time its script runs, the script writes nothing:
    no fence, no window, no total, no deleted bundle."""
    if not isinstance(store, RedisStore):
        pytest.skip("the SQL stores' case is the test below")
    add(store, 20)
    run = RedisStore._run

    def meanwhile(self: RedisStore, conn: Any, script: str, ctx: ostinato.Pass, job: Any) -> list[Any]:
        slot, ids = job["slots"][0]
        conn.xdel(f"{self.p}:inbox:{slot}", ids[-1])
        return run(self, conn, script, ctx, job)

    monkeypatch.setattr(RedisStore, "_run", meanwhile)
    with pytest.raises(RuntimeError, match="drained meanwhile"):
        drain(fence=1)
    seen = snapshot(store)
    assert (seen["totals"], seen["pending"]) == ({"bundles": 0, "samples": 0}, 19)
    with closing(store.connect()) as conn:
        assert conn.get(f"{store.p}:fence:pipeline:aggregate#0") is None
    monkeypatch.undo()
    drain(fence=1)
    assert snapshot(store)["totals"] == {"bundles": 19, "samples": 57}


def test_a_sql_drain_whose_bundle_went_after_it_was_read_writes_nothing(
    store: AnyStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pass reads and folds its bundles before its transaction; if one of them was drained in
    between, the transaction is rolled back whole (no window, no total, no mark) and the next
    pass drains the rest."""
    if not isinstance(store, Store):
        pytest.skip("a Redis drain's case is the test above")
    add(store, 20)
    read = Store.pending

    def meanwhile(self: Store, conn: Any, slots: Any, limit: int) -> Any:
        pending = read(self, conn, slots, limit)
        conn.execute(store.q["drained"], (time.time(), 99, self._list(pending.ids[-1:])))
        return pending

    monkeypatch.setattr(Store, "pending", meanwhile)
    assert drain(fence=1) is None  # found work, wrote nothing: the next pass reads again
    seen = snapshot(store)
    assert (seen["totals"], seen["pending"]) == ({"bundles": 0, "samples": 0}, 19)
    with closing(store.connect()) as conn:
        assert drained_by(conn, 1) == 0
    monkeypatch.undo()
    drain(fence=1)
    assert snapshot(store)["totals"] == {"bundles": 19, "samples": 57}
