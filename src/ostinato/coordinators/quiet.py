"""The arithmetic of the PostgreSQL fast path: how long a standby waits once a holder's
session ended (its *quiet*), and how long the holder trusts a session it has not heard
from (its *window*).

A holder's session answers a statement sent at local time t: the session, and every
advisory lock it holds, was alive after t. The holder starts passes only until
``t + window - BOUND_MARGIN``. A standby that finds the lock free waits ``quiet`` on its
own clock before it takes the lease, and the holder writes the quiet it needs into each
lease row, so ``window_for(quiet) + drift_margin(window) < quiet`` keeps a cut-off holder
stopped, by at least ``BOUND_MARGIN + SLACK``, before any standby starts.

The window must outlast a round trip, or the holder could never start a pass: the
holder measures its round trips and asks for a quiet that fits them (``quiet_for``),
raised in a row only by a write the server confirmed, and lowered on the holder's side
before the write that lowers it is sent. On a fast network the quiet is ``MIN_QUIET``.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter, deque
from collections.abc import Iterator

from ostinato.coordinators.clocks import drift_margin

#: A holder hears from its session at least this often while it holds locks.
BEAT = 0.05
#: A pass starts only while at least this much of the window is left.
BOUND_MARGIN = 0.1
#: Added between the holder's window and the standby's quiet, beyond clock drift.
SLACK = 0.045
#: The quiet on a fast network: a window of 0.3 s.
MIN_QUIET = 0.35
#: A quiet past this buys nothing: the lease expires on the standby's clock first.
MAX_QUIET = 30.0
#: Round trips remembered, the slowest of which sets the quiet asked for.
RTT_SAMPLES = 20


def window_for(quiet: float) -> float:
    """The longest window whose end, on a clock 1% slow, still comes ``SLACK`` before
    ``quiet`` on the standby's."""
    return (quiet - SLACK - drift_margin(0.0)) / 1.01


def quiet_for(rtt: float) -> float:
    """The quiet whose window leaves a pass time to start when each answer takes ``rtt``:
    two round trips and a beat before the margin, with ``SLACK`` to spare."""
    window = BOUND_MARGIN + 2 * rtt + BEAT + SLACK
    quiet = window * 1.01 + drift_margin(0.0) + SLACK
    return min(MAX_QUIET, max(MIN_QUIET, math.ceil(quiet * 100) / 100))


class QuietBook:
    """The quiet each held row carries, and the quiet of writes in flight: the window
    is set by the smallest of them, so no row ever promises a standby less."""

    def __init__(self) -> None:
        self.rows: dict[str, float] = {}
        self._writing: Counter[float] = Counter()
        self._rtts: deque[float] = deque(maxlen=RTT_SAMPLES)

    def took(self, rtt: float) -> None:
        """A round trip on the session took ``rtt`` seconds."""
        self._rtts.append(rtt)

    def wanted(self) -> float:
        """The quiet to write into rows now."""
        return quiet_for(max(self._rtts, default=0.0))

    @contextlib.contextmanager
    def writing(self, quiet: float) -> Iterator[None]:
        """A write of ``quiet`` into rows is in flight: it may land even if no answer does."""
        self._writing[quiet] += 1
        try:
            yield
        finally:
            self._writing[quiet] -= 1
            if not self._writing[quiet]:
                del self._writing[quiet]

    def window(self) -> float:
        promised = [*self.rows.values(), *self._writing]
        return window_for(min(promised, default=MIN_QUIET))
