"""The article's third way: a ``while True`` loop in a process of its own, optionally with a lease.

``python -m peers_apps.plain_loop``: the bare loop, no coordination at all (the
floor for the cost of a pass). After a pass that found no work it sleeps
``IDLE_SLEEP_S``.

``python -m peers_apps.plain_loop lease``: before every pass the loop takes
(``SET key token NX PX``) or renews (Lua: ``PEXPIRE`` only while the value is
still its token) a Redis lease of ``LOCK_TTL_MS`` on ``$PEERS_REDIS``, key named
after ``$PEERS_KEY``, and runs the pass only while it holds it; a copy that does
not hold it asks again every ``STANDBY_POLL_S``.
"""

from __future__ import annotations

import sys
import time
import uuid

from redis import Redis

from peers_apps.common import (
    IDLE_SLEEP_S,
    KEY_ENV,
    LOCK_TTL_MS,
    REDIS_ENV,
    STANDBY_POLL_S,
    run_pass,
    setting,
)

RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def bare() -> None:
    while True:
        if not run_pass():
            time.sleep(IDLE_SLEEP_S)


def leased() -> None:
    client = Redis.from_url(setting(REDIS_ENV))
    key, token = f"{setting(KEY_ENV)}:lease", uuid.uuid4().hex
    renew = client.register_script(RENEW)
    held = False
    while True:
        if held:
            held = bool(renew(keys=[key], args=[token, LOCK_TTL_MS]))
        else:
            held = bool(client.set(key, token, nx=True, px=LOCK_TTL_MS))
        if not held:
            time.sleep(STANDBY_POLL_S)
        elif not run_pass():
            time.sleep(IDLE_SLEEP_S)


if __name__ == "__main__":
    leased() if sys.argv[1:] == ["lease"] else bare()
