"""Per-loop pass statistics, kept in memory and reported to the coordinator in batches."""

from __future__ import annotations

import bisect
import time
from array import array
from collections.abc import Callable

from ostinato.coordinators.protocol import LoopStats

#: Pass durations kept for the p50/p99 shown in status (4 bytes each: 10,000 loops keep
#: 20 MB of them at most).
SAMPLE = 512
#: The percentiles are worked out again once this share of the sample is new (or a pass
#: took longer than the p99): sorting 512 durations takes 0.2 ms, and a runner of 10,000
#: idle loops reports some 400 of them a second.
RESORT = 16
#: Upper bounds (seconds) of the pass-duration histogram exported as metrics.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
           30.0, 60.0, 300.0)


class Recent:
    """The last ``SAMPLE`` pass durations, in a ring of 32-bit floats (a deque of floats
    would take 32 bytes per duration)."""

    __slots__ = ("_next", "_values")

    def __init__(self) -> None:
        self._values = array("f")
        self._next = 0

    def append(self, value: float) -> None:
        if len(self._values) < SAMPLE:
            self._values.append(value)
        else:
            self._values[self._next] = value
            self._next = (self._next + 1) % SAMPLE

    def __len__(self) -> int:
        return len(self._values)

    def sorted(self) -> list[float]:
        return sorted(self._values)


class StatsBook:
    """Counts and timings of one loop's passes in this runner.

    Written by the thread or task that runs the passes and read by the
    reporter; counts only grow, and a report sends the difference since the
    last one that reached the coordinator, so a failed report loses nothing.
    """

    def __init__(self, key: str, stall_after: float | None, fail_after: int | None = None) -> None:
        self.key = key
        self.stall_after = stall_after
        self.fail_after = fail_after
        #: Failed passes in a row, up to the last one.
        self.fail_streak = 0
        #: When the next pass is planned to start (wall seconds), and the schedule's zone.
        self.next_start: float | None = None
        self.zone: str | None = None
        #: Called (from whichever thread ran the pass) when the fail streak reaches
        #: ``fail_after`` and when a pass ends one that had: failing starts or ends now.
        self.on_failing: Callable[[], object] | None = None
        self.passes = 0
        self.errors = 0
        self.last_start: float | None = None
        self.last_end: float | None = None
        #: When the last pass that did not fail ended.
        self.last_ok_end: float | None = None
        self.last_duration: float | None = None
        self.last_outcome: str | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.running_since: float | None = None
        self.durations = Recent()
        #: p50 and p99 of ``durations`` as last worked out, and passes since then.
        self._p50: float | None = None
        self._p99 = -1.0
        self._unsorted = 0
        #: Passes by outcome ("worked", "idle", "failed"), since the runner started.
        self.outcomes = {"worked": 0, "idle": 0, "failed": 0}
        #: Pass durations: counts per bucket of ``BUCKETS`` (the last is +Inf), and their sum.
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.duration_sum = 0.0
        self._sent_passes = 0
        self._sent_errors = 0
        self._sent_end: float | None = None
        self._sent_next: float | None = None
        #: Where the book puts itself when it has something new to report (the runner's
        #: set of changed books), so a report need not look at every loop.
        self.changed: set[StatsBook] | None = None

    def touch(self) -> None:
        """Note that there is something new to report (``set.add`` is atomic, so a pass's
        thread may call it)."""
        if self.changed is not None:
            self.changed.add(self)

    def started(self, start: float) -> None:
        self.last_start = self.running_since = start
        self.touch()

    def finished(self, start: float, end: float, outcome: str) -> None:
        took = end - start
        self.running_since = None
        self.last_end = end
        self.last_duration = took
        self.last_outcome = outcome
        self.durations.append(took)
        self._unsorted += 1
        if took > self._p99:
            self._unsorted = SAMPLE  # a slow pass shows in the p99 at once
        self.outcomes[outcome] += 1
        self.buckets[bisect.bisect_left(BUCKETS, took)] += 1
        self.duration_sum += took
        was = self.fail_streak
        if outcome == "failed":
            self.fail_streak += 1
        else:
            self.fail_streak = 0
            self.last_ok_end = end
        limit = self.fail_after
        if limit and self.on_failing is not None and (
            self.fail_streak == limit or (was >= limit and self.fail_streak == 0)
        ):
            self.on_failing()
        self.passes += 1
        self.touch()

    def failed(self, at: float, error: str) -> None:
        self.errors += 1
        self.last_error = error
        self.last_error_at = at
        self.touch()

    def pending(self, wall_offset: float) -> LoopStats | None:
        """What to report now, or ``None`` when nothing changed."""
        passes, errors = self.passes, self.errors
        if (
            passes == self._sent_passes
            and errors == self._sent_errors
            and self.last_end == self._sent_end
            and self.next_start == self._sent_next
            and self.running_since is None
        ):
            return None

        def wall(mono: float | None) -> float | None:
            return None if mono is None else mono + wall_offset

        p50, p99 = self.percentiles()
        return LoopStats(
            key=self.key,
            passes=passes - self._sent_passes,
            errors=errors - self._sent_errors,
            last_start=wall(self.last_start),
            last_end=wall(self.last_end),
            last_duration=self.last_duration,
            last_outcome=self.last_outcome,
            last_error=self.last_error,
            last_error_at=wall(self.last_error_at),
            p50=p50,
            p99=p99,
            running_since=wall(self.running_since),
            stall_after=self.stall_after,
            fail_streak=self.fail_streak,
            fail_after=self.fail_after,
            next_start=self.next_start,
            zone=self.zone,
        )

    def percentiles(self) -> tuple[float | None, float | None]:
        """p50 and p99 of the last passes: worked out again when a slow pass or a
        ``RESORT``-th of the sample came since the last time, else as they were."""
        size = len(self.durations)
        if not size:
            return None, None
        if self._unsorted * RESORT >= size:
            ordered = self.durations.sorted()
            self._p50 = ordered[size // 2]
            self._p99 = ordered[min(size - 1, int(size * 0.99))]
            self._unsorted = 0
        return self._p50, self._p99

    def sent(self, stats: LoopStats) -> None:
        self._sent_passes += stats.passes
        self._sent_errors += stats.errors
        self._sent_end = None if stats.last_end is None else self.last_end
        self._sent_next = stats.next_start


def wall_offset() -> float:
    """Add to a monotonic time to get the wall-clock time (for display only)."""
    return time.time() - time.monotonic()
