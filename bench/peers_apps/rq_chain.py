"""The article's first way: an RQ job that runs the pass and then enqueues the next copy of itself.

Run with ``rq worker --url $PEERS_REDIS $PEERS_KEY`` (the default ``Worker``:
each job runs in a forked work horse), started by enqueueing :func:`link` once.
As in the article, the next link is enqueued in a ``finally`` so an exception in
the body does not break the chain; a killed worker still does.
"""

from __future__ import annotations

from rq import Queue, get_current_job

from peers_apps.common import run_pass


def link() -> None:
    """One link of the chain: a pass, then the next link, on the queue this one came from."""
    try:
        run_pass()
    finally:
        job = get_current_job()
        if job is None:
            raise RuntimeError("link() runs inside an RQ worker")
        Queue(job.origin, connection=job.connection).enqueue(link)
