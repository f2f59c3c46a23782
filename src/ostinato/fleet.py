"""The half of ``ostinato.runner.Runner`` that spreads loops across runners and reports.

Once a second the runner sends its statistics and heartbeat, then counts the live runners
that can run each loop it hosts: from that count come its fair share, its rank for each
loop a silent owner leaves (``standbys.rank``), and the loops it hands over when it holds
more than its share. Its state is the runner's, declared here.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

from ostinato.coordinators.protocol import Coordinator, RunnerInfo
from ostinato.errors import CoordinatorUnavailable
from ostinato.host import RUNNER_TTL
from ostinato.logs import fields
from ostinato.standbys import rank
from ostinato.stats import StatsBook, wall_offset

if TYPE_CHECKING:
    from ostinato.keeper import LoopKeeper
    from ostinato.leases import Leases

log = logging.getLogger("ostinato.runner")

#: How often statistics and the heartbeat are sent.
REPORT_EVERY = 1.0
#: How often the leases held are counted again for ``share_held``.
RECOUNT_EVERY = 0.25


class Fleet:
    """Counting the live runners, the fair share, balancing and reporting."""

    info: RunnerInfo
    coordinator: Coordinator
    stopping: bool
    wall_offset: float
    keepers: dict[str, LoopKeeper]
    leases: Leases
    calls: Counter[str]
    live_ids: set[str]
    live_runners: int
    _changed: set[StatsBook]
    _candidates: dict[str, int]
    _rivals: dict[str, list[str]]
    _members: Counter[str] | None
    _held_count: int
    _share: int
    _even: int | None
    _recount_at: float

    async def _sleep(self, seconds: float) -> None:
        raise NotImplementedError

    def members(self) -> Counter[str]:
        """How many loops hosted here each declared loop (``app:loop``) makes."""
        if self._members is None:
            self._members = Counter(keeper.family for keeper in self.keepers.values())
        return self._members

    def held(self) -> list[LoopKeeper]:
        return [keeper for keeper, lease in self.leases.held().values() if lease.valid()]

    def fair_share(self) -> int:
        """The most loops this runner takes while others are alive. Where every live runner
        can run every loop hosted here, the loops split exactly: ``n // runners`` each, and
        one more for the first ``n % runners`` runners by id, so all of them end within one
        loop of each other. Otherwise its share of each loop, split evenly among the live
        runners that can run it, summed and rounded up."""
        if self._even is not None:
            return self._even
        share = sum(n / self._candidates.get(family, 1) for family, n in self.members().items())
        return max(1, -(-round(share * 1000) // 1000))

    def rank(self, key: str, family: str, owner: str) -> int:
        """How many live runners that can run ``key`` (``owner`` aside) come before this one
        for it, by ``standbys.rank``: 0 for the first."""
        return rank(key, self.info.id, (r for r in self._rivals.get(family, ()) if r != owner))

    def share_held(self) -> int:
        """-1, 0 or 1: this runner holds fewer leases than its fair share, as many, or more
        (-1 when it runs alone). Every standby asks before each try, so the count is made
        at most every ``RECOUNT_EVERY`` (grants meanwhile add to it at once), not on every
        ask: with thousands of standbys that was quadratic."""
        if self.live_runners <= 1:
            return -1
        now = time.monotonic()
        if now >= self._recount_at:
            self._held_count, self._share = self.leases.count(), self.fair_share()
            self._recount_at = now + RECOUNT_EVERY
        return (self._held_count > self._share) - (self._held_count < self._share)

    async def balance(self) -> None:
        """Count the live runners that can run each loop, and hand over the loops held beyond
        the fair share. Runners of other apps, or that do not host a loop
        (``--only``), do not count for it."""
        self.calls["runners"] += 1
        runners = await self.coordinator.runners()
        self.live_ids = {record.id for record in runners}
        members = self.members()
        rivals: dict[str, list[str]] = {}  # the other runners that can run each loop
        others = 0
        for record in runners:
            if record.id == self.info.id:
                continue
            shares = [family for family in members if record.can_run(family)]
            others += bool(shares)
            for family in shares:
                rivals.setdefault(family, []).append(record.id)
        self._rivals = rivals
        candidates = {family: len(ids) for family, ids in rivals.items()}
        # Alone, nothing to count: every loop falls to this runner (``get(family, 1)``).
        self._candidates = {family: count + 1 for family, count in candidates.items()}
        self.live_runners = 1 + others
        self._even = None
        if len(candidates) == len(members) and all(count == others for count in candidates.values()):
            ids = sorted({record.id for record in runners} | {self.info.id})
            if len(ids) == self.live_runners:
                base, extra = divmod(len(self.keepers), self.live_runners)
                self._even = base + (ids.index(self.info.id) < extra)
        self._recount_at = 0.0  # the share may have changed
        if self.live_runners <= 1:
            return
        held = self.held()
        if len(held) <= self.fair_share():
            return
        now = time.monotonic()
        movable = [
            k for k in held if k.balance_cooldown_until <= now and self._candidates.get(k.family, 1) > 1
        ]
        # All the excess at once (a runner joining a fleet takes its share within a few
        # rounds, not one loop a second); those that most recently finished a pass first,
        # as least likely to be mid-pass.
        movable.sort(key=lambda k: (k.stats.running_since is not None, -(k.stats.last_end or 0)))
        for keeper in movable[:len(held) - self.fair_share()]:
            keeper.hand_over()

    # -- reporting ----------------------------------------------------------------------

    async def _report_forever(self) -> None:
        failing = False
        while not self.stopping:
            try:
                await self._report()
            except CoordinatorUnavailable as exc:
                if not failing:
                    log.error("cannot report to the coordinator, will retry: %s", exc,
                              extra=fields("report_failed", runner=self.info.label))
                failing = True
            else:
                if failing:
                    log.warning("reporting to the coordinator again",
                                extra=fields("report_resumed", runner=self.info.label))
                failing = False
            await self._sleep(REPORT_EVERY)

    async def _report(self) -> None:
        self.wall_offset = offset = wall_offset()
        books = []
        with contextlib.suppress(KeyError):
            while True:  # one pop at a time: a pass's thread may add a book meanwhile
                books.append(self._changed.pop())
        batch = [(book, stats) for book in books if (stats := book.pending(offset)) is not None]
        try:
            self.calls["report"] += 1
            await self.coordinator.report(self.info, RUNNER_TTL, [stats for _, stats in batch])
        except BaseException:
            self._changed.update(books)  # sent with the next report
            raise
        for book, stats in batch:
            book.sent(stats)
            if book.running_since is not None:
                self._changed.add(book)  # a pass in flight is reported every time
        if not self.stopping:
            await self.balance()

