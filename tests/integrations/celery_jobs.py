"""The Celery app of the Celery tests: ``celery -A tests.integrations.celery_jobs:celery worker``."""

from __future__ import annotations

import os
from collections.abc import Mapping

from celery import Celery

import ostinato
import ostinato.celery
from tests.integrations.jobs_app import BROKER, build, twice


def made(env: Mapping[str, str]) -> tuple[ostinato.App, Celery, ostinato.celery.Attached]:
    """The app, Celery app and attachment a worker started with ``env`` has."""
    app, options = build(env)
    celery = Celery("jobs", broker=env.get("JOBS_BROKER", BROKER))
    # The test's own queue, as the default one: what `celery purge` empties.
    celery.conf.update(broker_connection_retry_on_startup=True,
                       task_default_queue=env.get("JOBS_QUEUE", "celery"))
    jobs = ostinato.celery.attach(app, celery, **options)
    if env.get("JOBS_TWICE"):
        twice(jobs)
    return app, celery, jobs


app, celery, jobs = made(os.environ)
