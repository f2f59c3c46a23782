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


def sample_percentiles(durations: list[float]) -> tuple[float, float]:
    ordered = sorted(durations[-SAMPLE:])
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def test_percentiles_follow_the_sample_within_a_sixteenth_of_it() -> None:
    """They are not sorted afresh for every report: within a sixteenth of the sample of
    the last time they may lag, never further."""
    from ostinato.stats import RESORT

    book = StatsBook("app:loop", stall_after=None)
    seen: list[float] = []
    for i in range(4 * SAMPLE):
        took = 0.001 * (1 + (i * 7919) % 100) if i < 2 * SAMPLE else 0.5 + 0.001 * (i % 3)
        book.finished(0.0, took, "worked")
        seen.append(took)
        p50, p99 = book.percentiles()
        if i % 32 and i != 4 * SAMPLE - 1:
            continue
        lagging = [sample_percentiles(seen[: len(seen) - back])
                   for back in range(max(1, len(seen[-SAMPLE:]) // RESORT + 1))]
        assert (p50, p99) in [(pytest.approx(a, rel=1e-6), pytest.approx(b, rel=1e-6)) for a, b in lagging]
    assert book.percentiles() == (pytest.approx(0.501, rel=1e-6), pytest.approx(0.502, rel=1e-6))


def test_a_pass_slower_than_the_p99_shows_at_once() -> None:
    book = StatsBook("app:loop", stall_after=None)
    for _ in range(SAMPLE):
        book.finished(0.0, 0.01, "worked")
    assert book.percentiles() == (pytest.approx(0.01), pytest.approx(0.01))
    for _ in range(6):
        book.finished(0.0, 3.0, "worked")
        book.percentiles()
    assert book.percentiles() == (pytest.approx(0.01), pytest.approx(3.0))


def test_percentiles_are_not_sorted_again_for_every_report(monkeypatch: pytest.MonkeyPatch) -> None:
    book = StatsBook("app:loop", stall_after=None)
    for i in range(SAMPLE):
        book.finished(0.0, 0.01 + 0.0001 * (i % 10), "worked")
    sorts = []
    real = Recent.sorted
    monkeypatch.setattr(Recent, "sorted", lambda self: sorts.append(1) or real(self))
    for _ in range(SAMPLE):
        book.finished(0.0, 0.01, "worked")
        assert book.pending(0.0) is not None
        book.sent(book.pending(0.0))  # type: ignore[arg-type]
    assert 0 < len(sorts) <= 2 * 16
