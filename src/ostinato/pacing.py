"""When the next pass may start: pure decisions, no I/O, no clock of their own.

Every function takes the times it needs as arguments (monotonic seconds unless
named ``wall``), so the rules are tested without sleeping.

A decision has two parts:

* ``not_before``: the schedule (``every=``, ``pause=``, ``cron=``) and the error
  backoff. A wake-up does not shorten it: ``every="2s"`` is a promise.
* ``idle_until``: the backoff after a pass returned ``IDLE``. A wake-up ends it.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from croniter import croniter


class Outcome(enum.Enum):
    """How a pass ended."""

    WORKED = "worked"
    IDLE = "idle"
    FAILED = "failed"


@dataclass(frozen=True)
class Pacing:
    """How often a loop runs. At most one of ``every``, ``pause`` and ``cron`` is set."""

    every: float | None = None
    pause: float | None = None
    cron: str | None = None
    idle: tuple[float, float] = (0.1, 5.0)
    error_backoff: tuple[float, float] = (1.0, 60.0)

    def first_start(
        self, *, now: float, wall_now: float, last_start_wall: float | None = None
    ) -> float:
        """When the first pass of a newly acquired lease may start.

        ``last_start_wall`` is the previous holder's last start, so a hand-over
        does not add a pass that ``every=`` would not have allowed.
        """
        if self.cron is not None:
            return now + cron_delay(self.cron, wall_now)
        if self.every is not None and last_start_wall is not None:
            wait = last_start_wall + self.every - wall_now
            return now + min(max(wait, 0.0), self.every)
        return now


@dataclass(frozen=True)
class Plan:
    """When the next pass may start, and the state the decision carries forward."""

    not_before: float
    idle_until: float
    slot: float
    idle_streak: int
    error_streak: int

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
) -> Plan:
    """Decide when the pass after one that was due at ``slot`` and ended at ``end`` starts.

    ``every=`` counts start to start on a grid of slots: a slot missed because a
    pass ran long is skipped, and the next pass starts at once, never twice.
    ``pause=`` counts end to start; neither means back to back.
    """
    if pacing.every is not None:
        next_slot = slot + pacing.every
        if next_slot < end:
            next_slot = end
    elif pacing.pause is not None:
        next_slot = end + pacing.pause
    elif pacing.cron is not None:
        next_slot = end + cron_delay(pacing.cron, wall_end)
    else:
        next_slot = end

    not_before = next_slot
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
    return Plan(not_before, idle_until, next_slot, idle_streak, error_streak)


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


def cron_delay(expression: str, wall_now: float) -> float:
    """Seconds from ``wall_now`` to the next time the cron ``expression`` fires (UTC)."""
    start = datetime.fromtimestamp(wall_now, tz=UTC)
    following: float = croniter(expression, start).get_next(float)
    return max(0.0, following - wall_now)


def check_cron(expression: str) -> str | None:
    """Return why ``expression`` is not a valid cron expression, or ``None``."""
    if not isinstance(expression, str) or not croniter.is_valid(expression):
        return f"{expression!r} is not a valid cron expression (like '*/5 * * * *')"
    return None
