"""ostinato on the job workers: one back-to-back loop attached to Celery and to RQ.

``celery -A peers_apps.ostinato_jobs:celery worker`` or ``OSTINATO_APP=peers_apps.ostinato_jobs:app
rq worker -w ostinato.rq.Worker $PEERS_KEY``: the keeper in the workers starts the chain by
itself (nothing is seeded), and a link runs passes for up to its budget (1 s by default).
The coordinator is ``$OSTINATO_COORDINATOR``; the queue, in ``$PEERS_REDIS``, is named
after ``$PEERS_KEY``.
"""

from __future__ import annotations

from celery import Celery
from redis import Redis
from rq import Queue

import ostinato
import ostinato.celery
import ostinato.rq
from peers_apps.common import KEY_ENV, REDIS_ENV, run_pass, setting

app = ostinato.App(setting(KEY_ENV))


@app.loop
def spin(ctx: ostinato.Pass) -> object:
    return None if run_pass() else ostinato.IDLE


celery = Celery("peers", broker=setting(REDIS_ENV))
celery.conf.update(task_default_queue=setting(KEY_ENV), task_ignore_result=True,
                   broker_connection_retry_on_startup=True)
on_celery = ostinato.celery.attach(app, celery)
on_rq = ostinato.rq.attach(app, Queue(setting(KEY_ENV), connection=Redis.from_url(setting(REDIS_ENV))))
