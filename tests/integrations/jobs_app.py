"""The app the Celery and RQ tests run on real workers, built from environment variables.

``JOBS_APP`` names the app (one per test), ``JOBS_COORDINATOR`` its coordinator,
``JOBS_BROKER`` the Redis the queue lives in, ``JOBS_RECORDS`` the file every pass
appends to, ``JOBS_MODE`` ``chain`` or ``clock``, ``JOBS_TAKES`` how long a pass
takes (seconds), ``JOBS_PAUSE``, ``JOBS_EVERY`` or ``JOBS_CRON`` its pacing, ``JOBS_LEASE`` its
lease, ``JOBS_BUDGET`` a link's budget, ``JOBS_PATIENCE`` the keeper's patience,
``JOBS_STALL`` the loop's ``stall_after``, ``JOBS_IDLE`` its idle backoff (its passes
then return ``ostinato.IDLE``), ``JOBS_METRICS_PORT`` where a worker serves its metrics;
``JOBS_TWICE=1`` makes every link enqueue its next link twice (the article's chain
that doubles).

Each pass appends ``S pid fence start`` as it starts and ``E pid fence start end`` as
it ends (``time.monotonic()``, shared by the processes of one host), each line one
``write`` to a file opened with ``O_APPEND``, so a killed pass shows as a start
without an end. A ``cron=`` pass also appends ``slot wall_start`` (``time.time()``) to
``JOBS_RECORDS.cron``: the calendar slot it stands for and when it started.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import ostinato


def build(env: Mapping[str, str]) -> tuple[ostinato.App, dict[str, Any]]:
    """The app ``env`` describes, and the options to attach it with."""
    app = ostinato.App(env.get("JOBS_APP", "jobs"), coordinator=env.get("JOBS_COORDINATOR"))
    records = env.get("JOBS_RECORDS", "")
    pass_s = float(env.get("JOBS_TAKES", "0.05"))
    pacing = (
        {"every": env["JOBS_EVERY"]} if env.get("JOBS_EVERY")
        else {"cron": env["JOBS_CRON"]} if env.get("JOBS_CRON")
        else {"pause": env.get("JOBS_PAUSE", "100ms")}
    )

    if env.get("JOBS_STALL"):
        pacing["stall_after"] = env["JOBS_STALL"]
    if env.get("JOBS_IDLE"):
        pacing["idle"] = (env["JOBS_IDLE"], env["JOBS_IDLE"])
    found = ostinato.IDLE if env.get("JOBS_IDLE") else None

    @app.loop(lease=env.get("JOBS_LEASE", "2s"), **pacing)  # type: ignore[call-overload]
    def tick(ctx: ostinato.Pass) -> object:
        fd = os.open(records, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            start = time.monotonic()
            os.write(fd, f"S {os.getpid()} {ctx.fence} {start:.6f}\n".encode())
            if ctx.scheduled_for is not None:
                slots = os.open(f"{records}.cron", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.write(slots, f"{ctx.scheduled_for.timestamp():.6f} {time.time():.6f}\n".encode())
                os.close(slots)
            time.sleep(pass_s)
            os.write(fd, f"E {os.getpid()} {ctx.fence} {start:.6f} {time.monotonic():.6f}\n".encode())
        finally:
            os.close(fd)
        return found

    options = {"mode": env.get("JOBS_MODE", "chain"), "budget": env.get("JOBS_BUDGET", "1s"),
               "patience": env.get("JOBS_PATIENCE") or None,
               "metrics_port": int(env["JOBS_METRICS_PORT"]) if env.get("JOBS_METRICS_PORT") else None}
    return app, options


def twice(jobs: Any) -> None:
    """Make every link of ``jobs`` (an ``Attached``) enqueue its next link twice."""
    once = jobs.enqueue_link

    def double(link: Any, delay: float) -> None:
        once(link, delay)
        once(link, delay)

    jobs.enqueue_link = double


BROKER = "redis://127.0.0.1:6379/7"
