"""The pure lease rules that keep a standby off a live holder's lease: the session bound a
holder trusts, and the sightings by which a standby judges expiry on its own clock."""

from __future__ import annotations

import asyncio

import pytest

from ostinato.coordinators.clocks import SessionBound, Sightings, drift_margin
from ostinato.loop import LocalLease


def test_a_session_bound_holds_until_window_less_margin_after_the_last_answer() -> None:
    """An answer to a statement sent at t lets passes start until t + window - margin."""
    bound = SessionBound(window=0.3, margin=0.1)
    assert not bound.holds(0.0)  # never heard from
    bound.confirm(10.0)
    assert bound.holds(10.0)
    assert bound.holds(10.199)
    assert not bound.holds(10.201)
    bound.confirm(9.0)  # an older answer arriving late moves nothing back
    assert bound.until == 10.3
    bound.reset()
    assert not bound.holds(10.0)


def test_passes_waiting_for_a_silent_session_are_woken_once_when_it_answers() -> None:
    """An async loop waiting on its session registers an event instead of polling: the next
    answer sets it (once); an answer older than the last one heard wakes no one."""
    bound = SessionBound(window=0.3, margin=0.1)
    bound.confirm(10.0)
    first, second = asyncio.Event(), asyncio.Event()
    bound.wake_when_heard(first)
    bound.wake_when_heard(second)
    bound.confirm(9.0)
    assert not first.is_set()
    assert not second.is_set()
    bound.confirm(11.0)
    assert first.is_set()
    assert second.is_set()
    first.clear()
    bound.confirm(12.0)
    assert not first.is_set()  # woken once per registration


def test_a_lease_holds_only_while_its_session_bound_does() -> None:
    """A lease with time left still stops passes once its session went quiet, and says so."""
    bound = SessionBound(window=0.3, margin=0.1)
    lease = LocalLease(fence=3, ttl=10.0, sent_at=100.0, bound=bound)
    assert not lease.holds(100.0)
    assert lease.suspended(100.0)
    bound.confirm(100.0)
    assert lease.holds(100.1)
    assert not lease.suspended(100.1)
    assert not lease.holds(100.25)
    assert lease.suspended(100.25)
    assert lease.valid(100.25)
    assert not lease.suspended(109.5)  # past the lease itself: not waiting, gone
    # A child process knows only the lease's own margin: its deadline says the same.
    assert lease.effective_deadline() == 100.3 - 0.1 + lease.margin
    unbound = LocalLease(fence=3, ttl=10.0, sent_at=100.0)
    assert unbound.holds(105.0)
    assert not unbound.suspended(105.0)
    assert unbound.effective_deadline() == unbound.deadline


def test_a_claim_may_be_taken_only_after_it_was_seen_unchanged_for_its_ttl() -> None:
    """The first sighting starts the count; a changed claim starts it again."""
    seen = Sightings()
    wait = 2.0 + drift_margin(2.0)
    assert seen.saw("k", (5, "r1"), 2.0, now=100.0) == pytest.approx(wait)
    assert seen.unchanged("k", 100.0 + wait - 0.001) is None
    assert seen.saw("k", (5, "r1"), 2.0, now=101.0) == pytest.approx(wait - 1.0)  # the same count
    assert seen.unchanged("k", 100.0 + wait + 0.001) == (5, "r1")
    assert seen.saw("k", (5, "r2"), 2.0, now=103.0) == pytest.approx(wait)  # renewed: from scratch
    assert seen.unchanged("k", 104.0) is None
    seen.forget("k")
    assert seen.unchanged("k", 1000.0) is None
