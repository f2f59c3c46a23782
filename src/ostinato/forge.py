"""How the keeper of loops on job workers (``ostinato.chains``) judges a chain and forges a
new one: whether a chain looks broken (``overdue``), when to look at a lease handed on
early (``watches_early``), when a new chain's first pass may start, and ``forge`` itself.
The judgements are plain functions of a loop's record and the time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from ostinato.app import App
from ostinato.coordinators.protocol import Coordinator, Denied, LoopRecord, RunnerInfo
from ostinato.errors import CoordinatorUnavailable
from ostinato.links import Enqueue, Link, record_of, successor
from ostinato.loop import LoopSpec
from ostinato.pacing import Slot

#: How far ahead of now a forged chain's first link may be planned, at most.
FORGE_HORIZON = 3600.0
#: A lease handed on to a link due at least this much later is asked for once at once
#: (see ``watches_early``), well before the link takes it up: no race with that link.
EARLY_WATCH = 0.25


def keeper_key(app: str, system: str) -> str:
    """The key of the keeper's own lease for ``app`` on ``system`` (``celery``, ``rq``)."""
    return f"{app}.keeper:{system}"


def overdue(record: LoopRecord | None, now: float, *, patience: float, budget: float) -> bool:
    """Whether the chain of the loop ``record`` describes looks broken at wall time ``now``.

    A loop never seen has no chain yet; a paused loop needs none. Between links the
    lease is held for the next link (see ``ostinato.links``): once the next start is
    ``patience`` behind and no link has taken the lease up, the chain is overdue. While
    a link holds it (or a runner does), the chain is suspect once nothing has happened
    for longer than a link runs (``budget``) plus ``patience``: its holder may be dead,
    and asking for the lease costs nothing when it is not. A free loop is overdue once
    its planned start, its last start and its last pass end are ``patience`` behind.
    """
    if record is None:
        return True
    if record.paused:
        return False
    marks = [t for t in (record.last_end, record.last_start, record.next_start) if t is not None]
    if record.holder is None:
        return not marks or now - max(marks) > patience
    planned, since = record.next_start, record.held_since
    if planned is not None and record.running_since is None and (since is None or since < planned):
        return now - planned > patience  # handed on, and the next link has not come
    return now - max([*marks, since if since is not None else now]) > budget + patience


def watches_early(record: LoopRecord | None, now: float) -> bool:
    """Whether the lease of the loop ``record`` describes is held for a link due at least
    ``EARLY_WATCH`` after wall time ``now``, no link having taken it up yet.

    On Redis a claim nobody released is handed to an asker only once that asker has seen
    it unchanged for its whole TTL (the link's delay plus the patience). The keeper asks
    for such a lease once, as soon as it sees it handed on: that refusal starts the
    sighting, so should the link be lost (a purged queue), the lease is the keeper's the
    moment it runs out, ``patience`` after the link was due, not a TTL later.
    """
    if record is None or record.paused or record.holder is None or record.running_since is not None:
        return False
    planned, since = record.next_start, record.held_since
    return planned is not None and (since is None or since < planned) and now < planned - EARLY_WATCH


def first_start(
    spec: LoopSpec, record: LoopRecord | None, now: float, seed: str
) -> tuple[float, Slot | None]:
    """When a newly forged chain's first pass may start (wall time), and its calendar slot.

    ``every=`` and ``cron=`` count from the loop's last recorded start, as a runner
    taking over does; a ``pause=`` (or back-to-back) loop keeps the start its last
    link planned, so a chain forged beside a live one does not add a pass.
    """
    last = None if record is None else record.last_start
    start, due = spec.pacing.first(now=now, wall_now=now, last_start_wall=last, seed=seed)
    planned = None if record is None else record.next_start
    if planned is not None and spec.pacing.every is None and spec.pacing.cron is None:
        start = max(start, min(planned, now + FORGE_HORIZON))
    return start, due


def woken_start(spec: LoopSpec, record: LoopRecord, now: float, seed: str) -> tuple[float, Slot | None]:
    """When the pass after the loop's last one may start once woken (wall time): its pacing
    counted from that pass (``every=``, ``cron=`` from its start, ``pause=`` from its end),
    without the idle backoff a wake-up ends."""
    start, due = spec.pacing.first(now=now, wall_now=now, last_start_wall=record.last_start, seed=seed)
    if spec.pacing.pause is not None and record.last_end is not None:
        start = max(start, record.last_end + spec.pacing.pause)
    return start, due


async def forge(
    store: Coordinator, owner: RunnerInfo, app: App, spec: LoopSpec, enqueue: Enqueue, patience: float,
    start: tuple[float, Slot | None] | None = None,
) -> Link | None:
    """Start a new generation of loop ``spec``'s chain: take its lease as ``owner``, hand it to
    the first link, enqueue that link (to start at ``start``, with its calendar slot, when
    given). ``None`` if the lease is held (or the loop paused).

    ``store`` asks for the lease, so a long-lived one (the keeper's) can take a claim it has
    seen expire; the lease for the first link is granted on a connection of its own, closed
    at once, so that no process keeps the liveness lock of an id it handed on.
    """
    key = f"{app.name}:{spec.name}"
    answer = await store.acquire(key, owner, spec.lease)
    if isinstance(answer, Denied):
        return None
    now = time.time()
    begin, due = start or first_start(spec, await record_of(store, key), now, key)
    delay = max(0.0, begin - now)
    heir = successor(owner)
    if not await store.release(key, owner, answer.fence):
        return None
    handing = app.connect()
    try:
        await handing.open()
        granted = await handing.acquire(key, heir, delay + patience)
    finally:
        with contextlib.suppress(CoordinatorUnavailable, TimeoutError):
            await asyncio.wait_for(handing.close(), 1.0)
    if isinstance(granted, Denied):
        return None
    link = Link(spec.name, owner=heir.id, parent=granted.fence, generation=granted.fence,
                not_before=begin, slot=begin, due=None if due is None else (due.at, due.start, due.missed))
    enqueue(link, delay)
    return link
