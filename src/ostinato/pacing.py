"""When the next pass may start: pure decisions, no I/O, no clock of their own.

Every function takes the times it needs as arguments (monotonic seconds unless
named ``wall``), so the rules are tested without sleeping.

A decision has two parts:

* ``not_before``: the schedule (``every=``, ``pause=``, ``cron=``) and the error
  backoff. A wake-up does not shorten it: ``every="2s"`` is a promise.
* ``idle_until``: the backoff after a pass returned ``IDLE``. A wake-up ends it.

A ``cron=`` loop also carries its ``Slot``: the calendar time a pass stands for
(see ``schedule``), how many missed slots a catch-up pass covers, and the
start delayed by the slot's jitter.
"""

from __future__ import annotations

import enum
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from ostinato.schedule import Schedule, schedule_for

#: A catch-up pass counts at most this many missed slots (``Slot.missed``), so that a
#: schedule of every second with a long window is not walked slot by slot for long.
MISSED_LIMIT = 10_000


class Outcome(enum.Enum):
    """How a pass ended."""

    WORKED = "worked"
    IDLE = "idle"
    FAILED = "failed"


@dataclass(frozen=True)
class Pacing:
    """How often a loop runs. At most one of ``every``, ``pause`` and ``cron`` is set.

    ``timezone``, ``catchup`` (seconds) and ``jitter`` (seconds) apply to ``cron`` only.
    """

    every: float | None = None
    pause: float | None = None
    cron: str | None = None
    idle: tuple[float, float] = (0.1, 5.0)
    error_backoff: tuple[float, float] = (1.0, 60.0)
    timezone: str | None = None
    catchup: float | None = None
    jitter: float = 0.0

    @property
    def schedule(self) -> Schedule | None:
        """The calendar schedule of a ``cron=`` loop, else ``None``."""
        return None if self.cron is None else schedule_for(self.cron, self.timezone)

    def first_start(
        self, *, now: float, wall_now: float, last_start_wall: float | None = None, seed: str = ""
    ) -> float:
        """When the first pass of a newly acquired lease may start.

        ``last_start_wall`` is the previous holder's last start, so a hand-over
        does not add a pass that ``every=`` would not have allowed.
        """
        return self.first(now=now, wall_now=wall_now, last_start_wall=last_start_wall, seed=seed)[0]

    def first(
        self, *, now: float, wall_now: float, last_start_wall: float | None = None, seed: str = ""
    ) -> tuple[float, Slot | None]:
        """``first_start``, with the slot the first pass stands for on a ``cron=`` loop.

        ``seed`` (the lease name) decides each slot's jitter.
        """
        if self.cron is not None:
            due = next_slot(self, wall_now=wall_now, last=last_start_wall, seed=seed)
            return now + max(0.0, due.start - wall_now), due
        if self.every is not None and last_start_wall is not None:
            wait = last_start_wall + self.every - wall_now
            return now + min(max(wait, 0.0), self.every), None
        return now, None


@dataclass(frozen=True)
class Slot:
    """A calendar start of a ``cron=`` loop, in wall-clock seconds.

    ``at`` is the slot the pass stands for and ``start`` when it starts (``at``
    plus its jitter, or at once for a catch-up); ``missed`` is how many missed
    slots a catch-up pass covers (0 for a pass on time).
    """

    at: float
    start: float
    missed: int = 0


def jitter_delay(seed: str, at: float, jitter: float) -> float:
    """How long the start of slot ``at`` is delayed, from 0 up to ``jitter``.

    Drawn from a hash of ``seed`` (the lease name) and the slot, so every runner
    draws the same delay for a slot and a hand-over does not draw it again.
    """
    if jitter <= 0:
        return 0.0
    digest = hashlib.blake2b(f"{seed}@{round(at)}".encode(), digest_size=8).digest()
    return jitter * int.from_bytes(digest, "big") / 2**64


def next_slot(pacing: Pacing, *, wall_now: float, last: float | None, seed: str = "") -> Slot:
    """The next calendar start of a ``cron=`` loop at wall-clock time ``wall_now``.

    ``last`` is the last slot that ran, or the last start of the loop as recorded
    by the coordinator (a slot is never after its start); ``None`` if unknown.
    With ``catchup``, the slots after ``last`` whose start has passed, back to
    ``catchup`` seconds ago, are one catch-up pass due at once, standing for the
    latest of them. Otherwise (and when none was missed) it is the first slot
    whose start, jitter included, is still ahead.
    """
    schedule = pacing.schedule
    if schedule is None:
        raise ValueError("next_slot needs a cron= loop")
    if pacing.catchup is not None and last is not None:
        since = max(last, wall_now - pacing.catchup)
        missed, latest = _passed(pacing, schedule, since, wall_now, seed)
        if missed >= MISSED_LIMIT:
            # Too many to walk: the catch-up still stands for the latest one.
            for back in (60.0, 3600.0, 86400.0):
                _, latest = _passed(pacing, schedule, max(since, wall_now - back), wall_now, seed)
                if latest is not None:
                    break
        if latest is not None:
            return Slot(latest, wall_now, missed)
    since = wall_now - pacing.jitter
    if last is not None:
        since = max(since, last)
    for slot in schedule.starts_after(_instant(since)):
        at = slot.timestamp()
        start = at + jitter_delay(seed, at, pacing.jitter)
        if start > wall_now:
            return Slot(at, start)
    raise AssertionError("unreachable: a schedule's starts never end")  # pragma: no cover


def upcoming(pacing: Pacing, after: datetime, count: int) -> list[datetime]:
    """The next ``count`` scheduled starts strictly after the aware instant ``after``.

    For ``cron=``, the slots in the loop's zone (each start is delayed by its
    jitter, if any); for ``every=``, ``after`` plus whole multiples of it.
    ``ValueError`` for a loop that has no schedule.
    """
    if (schedule := pacing.schedule) is not None:
        return schedule.starts(after, count)
    if pacing.every is not None:
        return [after + timedelta(seconds=pacing.every * k) for k in range(1, count + 1)]
    how = f"pause={pacing.pause:g}s after each pass" if pacing.pause is not None else "back to back"
    raise ValueError(
        f"has no schedule: it runs {how}, so its starts depend on its passes; "
        "only cron= and every= loops have start times"
    )


def _passed(
    pacing: Pacing, schedule: Schedule, since: float, wall_now: float, seed: str
) -> tuple[int, float | None]:
    """How many slots after ``since`` have a start (jitter included) up to ``wall_now``
    (at most ``MISSED_LIMIT``), and the latest of them."""
    missed, latest = 0, None
    for slot in schedule.starts_after(_instant(since)):
        at = slot.timestamp()
        if at > wall_now or at + jitter_delay(seed, at, pacing.jitter) > wall_now:
            break
        missed, latest = missed + 1, at
        if missed >= MISSED_LIMIT:
            break
    return missed, latest


def _instant(wall: float) -> datetime:
    return datetime.fromtimestamp(wall, tz=UTC)


@dataclass(frozen=True)
class Plan:
    """When the next pass may start, and the state the decision carries forward."""

    not_before: float
    idle_until: float
    slot: float
    idle_streak: int
    error_streak: int
    #: The calendar slot of the next pass, on a ``cron=`` loop.
    due: Slot | None = None

    def start_at(self) -> float:
        return max(self.not_before, self.idle_until)


def plan_next(
    pacing: Pacing,
    *,
    slot: float,
    end: float,
    wall_end: float,
    outcome: Outcome,
    idle_streak: int,
    error_streak: int,
    rand: Callable[[], float] = random.random,
    due: Slot | None = None,
    seed: str = "",
) -> Plan:
    """Decide when the pass after one that was due at ``slot`` and ended at ``end`` starts.

    ``every=`` counts start to start on a grid of slots: a slot missed because a
    pass ran long is skipped, and the next pass starts at once, never twice.
    ``pause=`` counts end to start; neither means back to back. ``cron=`` goes to
    the slot after ``due``, the one the pass stood for (see ``next_slot``).
    """
    upcoming = None
    if pacing.every is not None:
        following = slot + pacing.every
        if following < end:
            following = end
    elif pacing.pause is not None:
        following = end + pacing.pause
    elif pacing.cron is not None:
        upcoming = next_slot(pacing, wall_now=wall_end, last=None if due is None else due.at, seed=seed)
        following = end + max(0.0, upcoming.start - wall_end)
    else:
        following = end

    not_before = following
    idle_until = end
    if outcome is Outcome.FAILED:
        error_streak += 1
        idle_streak = 0
        not_before = max(not_before, end + error_delay(pacing.error_backoff, error_streak, rand))
    elif outcome is Outcome.IDLE:
        idle_streak += 1
        error_streak = 0
        idle_until = end + idle_delay(pacing.idle, idle_streak)
    else:
        idle_streak = error_streak = 0
    return Plan(not_before, idle_until, following, idle_streak, error_streak, upcoming)


def idle_delay(bounds: tuple[float, float], streak: int) -> float:
    """Doubling wait after ``streak`` idle passes in a row, from ``bounds[0]`` to ``bounds[1]``."""
    low, high = bounds
    if streak <= 0:
        return 0.0
    return min(high, low * 2.0 ** min(streak - 1, 62))


def error_delay(bounds: tuple[float, float], streak: int, rand: Callable[[], float]) -> float:
    """Jittered, bounded wait after ``streak`` failed passes in a row.

    The wait doubles from ``bounds[0]`` up to ``bounds[1]``, then is drawn from
    its upper half so that many failing loops do not retry in step.
    """
    base = idle_delay(bounds, streak)
    return base * (0.5 + 0.5 * rand())


def cron_delay(expression: str, wall_now: float, timezone: str | None = None) -> float:
    """Seconds from ``wall_now`` to the next start of the cron ``expression`` (UTC by default)."""
    following = schedule_for(expression, timezone).next_after(_instant(wall_now)).timestamp()
    return max(0.0, following - wall_now)


def check_cron(expression: str) -> str | None:
    """Return why ``expression`` is not a valid cron expression, or ``None``."""
    try:
        schedule_for(expression, None)
    except ValueError as exc:
        return str(exc)
    except TypeError:
        return f"{expression!r} is not a valid cron expression (like '*/5 * * * *')"
    return None
