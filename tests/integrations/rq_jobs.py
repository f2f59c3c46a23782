"""The RQ queue of the RQ tests: ``OSTINATO_APP=tests.integrations.rq_jobs:app rq worker -w ...``."""

from __future__ import annotations

import os
from collections.abc import Mapping

from redis import Redis
from rq import Queue

import ostinato
import ostinato.rq
from tests.integrations.jobs_app import BROKER, build, twice


def made(env: Mapping[str, str]) -> tuple[ostinato.App, Queue, ostinato.rq.Attached]:
    """The app, queue and attachment a worker started with ``env`` has."""
    app, options = build(env)
    queue = Queue(env.get("JOBS_QUEUE", "jobs"), connection=Redis.from_url(env.get("JOBS_BROKER", BROKER)))
    jobs = ostinato.rq.attach(app, queue, **options)
    if env.get("JOBS_TWICE"):
        twice(jobs)
    return app, queue, jobs


app, queue, jobs = made(os.environ)
