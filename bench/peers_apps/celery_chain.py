"""The article's first way on Celery: a task that runs the pass and then sends the next copy of itself.

``celery -A peers_apps.celery_chain worker`` (default prefork pool), started by
sending :func:`link` once. As in the article, the next link is sent in a
``finally``, so an exception in the body does not break the chain; a killed
worker still does.
"""

from __future__ import annotations

from celery import Celery

from peers_apps.common import KEY_ENV, REDIS_ENV, run_pass, setting

app = Celery("peers", broker=setting(REDIS_ENV))
app.conf.update(task_default_queue=setting(KEY_ENV), task_ignore_result=True,
                broker_connection_retry_on_startup=True)


@app.task(name="peers.link")
def link() -> None:
    """One link: a pass, then the next link."""
    try:
        run_pass()
    finally:
        link.apply_async()
