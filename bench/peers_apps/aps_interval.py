"""APScheduler 3: a ``BlockingScheduler`` in a process of its own runs the pass on an interval trigger.

``python -m peers_apps.aps_interval``: one job, ``interval`` trigger of
``$PEERS_APS_INTERVAL`` seconds (default ``APS_INTERVAL_S``, 1 ms),
``max_instances=1`` (a fire while the pass still runs is skipped) and
``coalesce=True`` (missed fires collapse into one), on the default thread pool
executor and memory job store. APScheduler's per-fire log lines (INFO, and a
WARNING for every skipped fire) are turned off, as anyone running it this fast
would.
"""

from __future__ import annotations

import logging
import os

from apscheduler.schedulers.blocking import BlockingScheduler

from peers_apps.common import APS_INTERVAL_ENV, APS_INTERVAL_S, run_pass


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    interval = float(os.environ.get(APS_INTERVAL_ENV, APS_INTERVAL_S))
    scheduler = BlockingScheduler()
    scheduler.add_job(run_pass, "interval", seconds=interval, max_instances=1, coalesce=True)
    scheduler.start()


if __name__ == "__main__":
    main()
