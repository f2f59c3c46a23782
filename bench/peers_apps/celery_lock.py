"""The article's second way: ``celery beat`` enqueues a task every second; the task takes a lock.

``celery -A peers_apps.celery_lock beat`` is the clock, ``celery -A
peers_apps.celery_lock worker`` (default prefork pool, one pool process per CPU)
runs :func:`tick`. The broker is ``$PEERS_REDIS``; the queue and the lock key are
named after ``$PEERS_KEY``. The lock is ``SET key token NX PX LOCK_TTL_MS`` with
a random token, released by a Lua compare-and-delete, so a task never deletes a
lock it no longer owns. A task that finds the lock taken returns at once.
"""

from __future__ import annotations

import functools
import uuid

from celery import Celery
from redis import Redis

from peers_apps.common import CLOCK_PERIOD_S, KEY_ENV, LOCK_TTL_MS, REDIS_ENV, run_pass, setting

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_URL, _KEY = setting(REDIS_ENV), setting(KEY_ENV)
_LOCK = f"{_KEY}:lock"

app = Celery("peers", broker=_URL)
app.conf.update(
    task_default_queue=_KEY,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    beat_schedule={"tick": {"task": "peers.tick", "schedule": CLOCK_PERIOD_S}},
)


@functools.cache
def _client() -> Redis:
    """One client per (pool) process, made on first use, after the fork."""
    return Redis.from_url(_URL)


@app.task(name="peers.tick")
def tick() -> None:
    """Take the lock or return; run the pass; release the lock only if it is still ours."""
    client, token = _client(), uuid.uuid4().hex
    if not client.set(_LOCK, token, nx=True, px=LOCK_TTL_MS):
        return
    try:
        run_pass()
    finally:
        client.eval(RELEASE, 1, _LOCK, token)
