"""Pacing decisions, computed from given times: no sleeping."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ostinato.pacing import Outcome, Pacing, check_cron, cron_delay, error_delay, idle_delay, plan_next


def plan(pacing: Pacing, *, slot: float, end: float, outcome: Outcome = Outcome.WORKED,
         idle_streak: int = 0, error_streak: int = 0, rand: float = 1.0):  # type: ignore[no-untyped-def]
    return plan_next(pacing, slot=slot, end=end, wall_end=1_700_000_000.0 + end, outcome=outcome,
                     idle_streak=idle_streak, error_streak=error_streak, rand=lambda: rand)


def test_back_to_back_starts_at_the_end() -> None:
    """With no pacing the next pass starts as soon as one ends."""
    p = plan(Pacing(), slot=10.0, end=10.3)
    assert p.start_at() == 10.3


def test_every_counts_start_to_start_without_drift() -> None:
    """every= keeps to a grid of slots: a short pass waits for the next slot."""
    p = plan(Pacing(every=2.0), slot=10.0, end=10.5)
    assert p.start_at() == 12.0
    p2 = plan(Pacing(every=2.0), slot=p.slot, end=12.7)
    assert p2.start_at() == 14.0


def test_every_skips_missed_slots_instead_of_queueing() -> None:
    """A pass that overran several slots is followed by one pass at once, not a burst."""
    p = plan(Pacing(every=2.0), slot=10.0, end=17.1)
    assert p.start_at() == 17.1
    following = plan(Pacing(every=2.0), slot=p.slot, end=17.2)
    assert following.start_at() == 19.1


def test_pause_counts_end_to_start() -> None:
    """pause= waits that long after each pass ends."""
    assert plan(Pacing(pause=0.25), slot=0.0, end=3.0).start_at() == 3.25


def test_idle_backoff_doubles_up_to_its_bound_and_wake_can_end_it() -> None:
    """After IDLE passes the wait doubles to the max; it lives in idle_until, which a wake ends."""
    pacing = Pacing(idle=(0.1, 0.5))
    waits = []
    streak = 0
    for _ in range(5):
        p = plan(pacing, slot=0.0, end=100.0, outcome=Outcome.IDLE, idle_streak=streak)
        streak = p.idle_streak
        waits.append(round(p.idle_until - 100.0, 6))
        assert p.not_before == 100.0
    assert waits == [0.1, 0.2, 0.4, 0.5, 0.5]


def test_work_resets_the_idle_streak() -> None:
    """A pass that found work starts the idle backoff over."""
    p = plan(Pacing(idle=(0.1, 5.0)), slot=0.0, end=1.0, outcome=Outcome.WORKED, idle_streak=4)
    assert p.idle_streak == 0
    assert p.start_at() == 1.0


def test_error_backoff_is_jittered_bounded_and_not_ended_by_wake() -> None:
    """Failures back off exponentially with jitter, capped, in not_before (a wake does not end it)."""
    pacing = Pacing(error_backoff=(1.0, 8.0))
    high = plan(pacing, slot=0.0, end=0.0, outcome=Outcome.FAILED, error_streak=5, rand=1.0)
    low = plan(pacing, slot=0.0, end=0.0, outcome=Outcome.FAILED, error_streak=5, rand=0.0)
    assert high.not_before == 8.0
    assert low.not_before == 4.0
    assert high.error_streak == 6
    assert high.idle_until == 0.0


def test_error_delay_grows() -> None:
    """Each failure in a row waits longer, up to the bound."""
    delays = [error_delay((1.0, 60.0), n, lambda: 1.0) for n in range(1, 9)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60]
    assert idle_delay((1.0, 60.0), 0) == 0


def test_every_waits_for_the_error_backoff_too() -> None:
    """The later of the schedule and the error backoff wins."""
    p = plan(Pacing(every=0.5, error_backoff=(3.0, 3.0)), slot=0.0, end=0.1,
             outcome=Outcome.FAILED, rand=1.0)
    assert p.start_at() == pytest.approx(3.1)


def test_cron_delay_to_next_fire() -> None:
    """A cron schedule waits until its next firing time (UTC)."""
    at = datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC).timestamp()
    assert cron_delay("* * * * *", at) == pytest.approx(30.0)
    assert cron_delay("0 13 * * *", at) == pytest.approx(3570.0)
    p = plan(Pacing(cron="*/5 * * * *"), slot=0.0, end=10.0)
    assert p.start_at() > 10.0


def test_first_start_continues_the_previous_holders_pace() -> None:
    """A new holder of an every= loop waits out what is left of the last holder's slot."""
    pacing = Pacing(every=60.0)
    assert pacing.first_start(now=5.0, wall_now=1000.0, last_start_wall=990.0) == 55.0
    assert pacing.first_start(now=5.0, wall_now=1000.0, last_start_wall=900.0) == 5.0
    assert pacing.first_start(now=5.0, wall_now=1000.0, last_start_wall=5000.0) == 65.0
    assert pacing.first_start(now=5.0, wall_now=1000.0) == 5.0
    assert Pacing(pause=1.0).first_start(now=5.0, wall_now=1000.0, last_start_wall=999.0) == 5.0


@pytest.mark.parametrize("expression", ["* * *", "61 * * * *", "bogus", ""])
def test_bad_cron_is_explained(expression: str) -> None:
    """An invalid cron expression gets a message with an example of a good one."""
    problem = check_cron(expression)
    assert problem is not None
    assert "*/5 * * * *" in problem
