"""The pass statistics a runner keeps per loop: p50/p99 over the last passes only."""

from __future__ import annotations

import pytest

from ostinato.stats import SAMPLE, Recent, StatsBook


def test_recent_durations_keep_only_the_last_sample() -> None:
    recent = Recent()
    for i in range(SAMPLE + 10):
        recent.append(float(i))
    assert len(recent) == SAMPLE
    assert recent.sorted() == [float(i) for i in range(10, SAMPLE + 10)]


def test_p50_and_p99_come_from_the_last_passes_not_the_first() -> None:
    book = StatsBook("app:loop", stall_after=None)
    for _ in range(SAMPLE):
        book.finished(0.0, 5.0, "worked")  # slow passes, long ago
    for _ in range(SAMPLE):
        book.finished(0.0, 0.25, "worked")
    stats = book.pending(0.0)
    assert stats is not None
    assert stats.p50 == pytest.approx(0.25)
    assert stats.p99 == pytest.approx(0.25)
    assert stats.passes == 2 * SAMPLE
