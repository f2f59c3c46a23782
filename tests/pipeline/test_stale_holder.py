"""A runner frozen inside a pass, past the end of its lease, is refused by the store when it resumes."""

from __future__ import annotations

import os
import signal
import time
from contextlib import closing
from pathlib import Path

import pytest
from examples.pipeline.model import Bundle
from examples.pipeline.store import Store, drained_by, pending_ids

from tests.pipeline.stack import Stack, wait_for

APP = "tests.pipeline.stale_app:app"
LEASE = "stale:aggregate#0"


def add(store: Store, count: int) -> None:
    now = time.time()
    with closing(store.connect()) as conn:
        bundles = [Bundle(f"app-{i % 5}", "web", ((now, 5.0), (now, 7.0))) for i in range(count)]
        store.add(conn, [(bundle, now) for bundle in bundles])


def counts(store: Store) -> tuple[int, int]:
    with closing(store.connect()) as conn:
        return store.totals(conn)["bundles"], len(list(pending_ids(conn)))


@pytest.mark.extended
@pytest.mark.slow
def test_a_paused_holder_resumes_after_losing_its_lease_and_its_write_is_refused(tmp_path: Path) -> None:
    """Runner A is frozen (SIGSTOP) in a pass, after it saw pending bundles and before its fenced
    transaction; B takes the lease over with a greater fence and drains them. Resumed, A's
    transaction raises StaleFence: it marks no bundle and counts nothing, and the totals equal
    what was added."""
    stack = Stack.make(tmp_path)
    store = Store(f"sqlite:///{tmp_path / 'pipeline.db'}")
    with closing(store.connect()):
        pass
    try:
        first = stack.runner(APP)
        a = stack.runners[first]
        wait_for(lambda: stack.holders("stale:")[LEASE][0] == first, what="A holds the lease")
        add(store, 100)
        wait_for(lambda: counts(store) == (100, 0), what="A drains the first bundles")
        (tmp_path / "hold").touch()
        add(store, 50)
        held = tmp_path / f"held-{a.pid}"
        wait_for(held.exists, what="A held inside its pass")
        stale_fence = int(held.read_text())
        os.kill(a.pid, signal.SIGSTOP)
        (tmp_path / "hold").unlink()
        with closing(store.connect()) as conn:
            drained_before = drained_by(conn, stale_fence)
        second = stack.runner(APP)
        wait_for(lambda: (h := stack.holders("stale:")[LEASE])[0] == second and h[1] > stale_fence,
                 what="B takes the lease over with a greater fence")
        wait_for(lambda: counts(store) == (150, 0), what="B drains the bundles A had seen")
        os.kill(a.pid, signal.SIGCONT)
        outcome = tmp_path / f"outcome-{a.pid}"
        wait_for(outcome.exists, what="A's pass to end")
        assert outcome.read_text().startswith("StaleFence"), outcome.read_text()
        add(store, 25)
        wait_for(lambda: counts(store) == (175, 0), what="B drains later bundles")
        with closing(store.connect()) as conn:
            assert drained_by(conn, stale_fence) == drained_before
            assert store.totals(conn) == {"bundles": 175, "samples": 350}
    except BaseException:
        print(stack.logs())
        raise
    finally:
        for proc in stack.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
        stack.stop()
