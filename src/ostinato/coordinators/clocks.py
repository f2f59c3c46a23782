"""How a holder and a standby judge a claim on a lease by their own monotonic clocks, so that
no wall clock (theirs or the server's) can hand a live holder's lease to another runner:
the margin cut for drift, the holder's trust in a session its leases are bound to
(``SessionBound``) and a standby's record of claims it has seen unchanged
(``Sightings``).
"""

from __future__ import annotations

from typing import Protocol


def drift_margin(ttl: float) -> float:
    """How much sooner than the coordinator a holder assumes its lease ends.

    Clocks tick at slightly different rates, so the local deadline is cut short
    by 1% of the TTL plus 2 ms.
    """
    return ttl * 0.01 + 0.002


class Sightings:
    """Claims a standby has seen, and since when, on its own monotonic clock.

    A standby takes a claim that was never released only once it has seen it
    unchanged for the claim's whole TTL (cut 1% short for drift, the other way):
    the holder's last renewal was answered after it left, and the holder trusts
    a renewal for at most the TTL from when it left, so by then the holder has
    stopped. The server's wall clock has no say, so a step of it hands no live
    holder's lease to a standby. ``claim`` is whatever every renewal changes
    (PostgreSQL: fence and expiry; Redis: fence and renewal count).
    """

    def __init__(self) -> None:
        self._seen: dict[str, tuple[tuple[object, ...], float, float]] = {}

    def saw(self, key: str, claim: tuple[object, ...], ttl: float, now: float) -> float:
        """Note ``claim`` on ``key`` as seen at ``now`` (a time after the server answered);
        return how much longer it must stay unchanged before it may be taken."""
        seen = self._seen.get(key)
        if seen is None or seen[0] != claim:
            seen = self._seen[key] = (claim, ttl, now)
        return max(0.0, seen[2] + seen[1] + drift_margin(seen[1]) - now)

    def unchanged(self, key: str, now: float) -> tuple[object, ...] | None:
        """The claim on ``key`` seen unchanged for its whole TTL by ``now``, if any: the
        caller may take it if the coordinator still holds that same claim."""
        seen = self._seen.get(key)
        if seen is None or now < seen[2] + seen[1] + drift_margin(seen[1]):
            return None
        return seen[0]

    def forget(self, key: str) -> None:
        self._seen.pop(key, None)


class Silence:
    """Owners' activity counts as this host has read them, and since when each has stayed
    unchanged, on this host's monotonic clock.

    An owner's count moves with every grant and every renewal it makes, in the same atomic
    step. Its claims were therefore last renewed before the count was first seen, and a
    holder trusts a renewal for at most its TTL from when it left: once the count has
    stayed unchanged for a claim's TTL (cut 1% short for drift, as ``Sightings``), that
    claim's holder has stopped, and the claim may be taken if the count is still the same.
    One read a second of a few owners' counts stands in for a sighting of each of their
    thousands of claims.
    """

    #: Owners not read for this long are forgotten.
    FORGET_AFTER = 300.0

    def __init__(self) -> None:
        self._seen: dict[str, tuple[object, float, float]] = {}

    def saw(self, owner: str, count: object, now: float) -> float:
        """Note ``count`` as ``owner``'s at ``now`` (a time after the server answered); return
        for how long it has been seen unchanged."""
        seen = self._seen.get(owner)
        since = now if seen is None or seen[0] != count else seen[1]
        self._seen[owner] = (count, since, now)
        return now - since

    def proof(self, owner: str | None, now: float) -> tuple[object, float] | None:
        """``owner``'s count and the longest claim TTL its silence covers by ``now``: a claim
        of ``owner`` with a TTL no longer may be taken while the count is still that."""
        seen = self._seen.get(owner) if owner is not None else None
        if seen is None:
            return None
        longest = (now - seen[1] - 0.002) / 1.01  # the inverse of ``drift_margin``
        return (seen[0], longest) if longest > 0 else None

    def prune(self, now: float) -> None:
        for owner, seen in list(self._seen.items()):
            if now - seen[2] > self.FORGET_AFTER:
                del self._seen[owner]


class Settable(Protocol):
    """What ``SessionBound.wake_when_heard`` sets: an ``asyncio.Event`` or the like."""

    def set(self) -> None: ...


class SessionBound:
    """How long this runner may still start passes under leases that a standby could take
    the moment the coordinator's server ends this runner's session.

    Some coordinators let a standby take a lease before it expires once the holder's
    session has ended (PostgreSQL: its advisory lock was freed). The server may end a
    session the holder cannot hear about (a network cut, then a keepalive, a proxy or an
    operator), so such a holder trusts its leases only while it keeps hearing from that
    session: an answer to a statement sent at ``sent`` moves ``heard`` there, and passes
    start only while ``now + margin < heard + window``. A standby waits longer than
    ``window`` after the session ended, so a cut-off holder has stopped starting passes
    by then. The coordinator may shrink ``window`` at any time, and grows it only once
    what lets it grow is confirmed.
    """

    __slots__ = ("_waiting", "heard", "margin", "window")

    def __init__(self, window: float, margin: float) -> None:
        self.window = window
        self.margin = margin
        self.heard = float("-inf")
        self._waiting: set[Settable] = set()

    @property
    def until(self) -> float:
        return self.heard + self.window

    def confirm(self, sent: float) -> None:
        """The session answered a statement sent at ``sent`` (local monotonic time)."""
        if sent > self.heard:
            self.heard = sent
            if self._waiting:
                waiting, self._waiting = self._waiting, set()
                for event in waiting:
                    event.set()

    def wake_when_heard(self, event: Settable) -> None:
        """Set ``event`` (on the coordinator's event loop) the next time the session is heard
        from: a loop whose passes wait for it need not poll."""
        self._waiting.add(event)

    def reset(self) -> None:
        """The session ended, or its state is unknown: nothing it said counts any more."""
        self.heard = float("-inf")

    def holds(self, now: float) -> bool:
        return now + self.margin < self.heard + self.window
