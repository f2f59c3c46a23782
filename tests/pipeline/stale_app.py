"""The pipeline's aggregator as app ``stale``, whose pass can be held before its transaction.

While ``$PIPELINE_DATA/hold`` exists, a pass that finds pending bundles writes
``held-<pid>`` (its fence) and sleeps two seconds before its fenced transaction,
so a test can SIGSTOP the runner there, let another take the lease over, and
resume it. The pass's outcome goes to ``outcome-<pid>``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from examples.pipeline import loops
from examples.pipeline.store import Store

import ostinato

app = ostinato.App("stale", coordinator=loops.coordinator_url())
DATA = Path(os.environ.get("PIPELINE_DATA", "."))


@app.loop(partitions=1, lease="1s", pause="50ms", idle=("50ms", "200ms"))
def aggregate(ctx: ostinato.Pass) -> object:
    db = loops.store()
    slots = list(range(64))
    if not (DATA / "hold").exists():
        return loops.aggregate(ctx)
    assert isinstance(db, Store), "the held pass is written for the SQL stores"
    with loops.connection(ctx.lease_name) as conn:
        if not db.has_pending(conn, slots):
            return ostinato.IDLE
        (DATA / f"held-{os.getpid()}").write_text(str(ctx.fence))
        time.sleep(2.0)  # frozen here by the test, past the end of the lease
        pending = db.pending(conn, slots, loops.BATCH)
        try:
            with db.fenced(conn, ctx):
                folded = None if pending is None else db.drain(conn, pending, ctx.fence, 0)
        except ostinato.StaleFence as exc:
            (DATA / f"outcome-{os.getpid()}").write_text(f"StaleFence {exc}")
            raise
        drained = 0 if folded is None else sum(folded.bundles.values())
        (DATA / f"outcome-{os.getpid()}").write_text(f"committed {drained}")
    return None
