"""The contract every coordinator keeps.

A coordinator is the shared store that holds each loop's lease. Loops are named
by a *key*, ``"app:loop"``. Every backend implements the same rules, written
into the docstrings below, and is checked by one contract suite
(``tests/contract``).

A lease has an owner (the runner's id), an expiry and a fence. The expiry is
judged by the coordinator's own clock (the server's for Redis and PostgreSQL,
the host's monotonic clock for SQLite), never by a runner's wall clock. Every
grant bumps the loop's fence, so a fence is strictly greater than every fence
granted before it for that loop.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import functools
import json
import os
import socket
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from ostinato.coordinators.clocks import SessionBound


@dataclass(frozen=True)
class RunnerInfo:
    """Who asks: one runner process."""

    id: str
    host: str
    pid: int
    #: The loops (``app:loop``) this runner can run: balancing counts a runner only for
    #: the loops it hosts.
    hosts: tuple[str, ...] = ()

    @classmethod
    def here(cls, hosts: tuple[str, ...] = ()) -> RunnerInfo:
        return cls(id=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(), hosts=hosts)

    @property
    def label(self) -> str:
        return f"{self.host}:{self.pid}"


@dataclass(frozen=True)
class Grant:
    """A lease was granted with this fence.

    ``last_start`` is the wall-clock time of the loop's last recorded pass
    start (any holder), so pacing can carry on across a hand-over. ``sent`` is
    the monotonic time the granting request left, when the coordinator knows it
    better than its caller (the request waited for a connection): the lease's
    local deadline counts from it. ``bound``, when set, must also hold for a pass
    to start (see ``SessionBound``).
    """

    fence: int
    last_start: float | None = None
    sent: float | None = None
    bound: SessionBound | None = None


@dataclass(frozen=True)
class Denied:
    """The lease was not granted: another runner holds it, or the loop is paused.

    ``holder`` is the holder's label, ``owner`` its runner id where the coordinator tells
    it (standbys of a loop whose owner is active need not ask again: see ``silence``).
    """

    holder: str | None
    expires_in: float | None
    paused: bool = False
    owner: str | None = None


@dataclass(frozen=True)
class Setting:
    """A value every runner must agree on (a loop's key list, its partition count), with the
    fence of the lease it was written under: a write under an older fence is refused."""

    value: str
    fence: int


class Renewal(enum.Enum):
    HELD = "held"
    LOST = "lost"
    PAUSED = "paused"


@dataclass(frozen=True)
class Event:
    """A notice between processes. ``kind`` is one of ``KINDS``, or a local one.

    ``changed``: a setting of the loop ``key`` changed (its key list, its partition
    count): runners read it again now rather than at their next regular look.

    Two kinds never cross processes; a coordinator tells its own runner:

    * ``dropped``: the connection a lease depended on dropped, so the lease may be gone
      (the server restarted) and its passes stop until it is granted again;
    * ``unconfirmed``: the session holding the lease went unheard too long (see
      ``SessionBound``), so the pass in flight stops if it can; the lease is kept, and
      passes start again once the session answers;
    * ``missed`` (no key): the events connection came back after a loss, so events may
      have been missed meanwhile: every quiet standby asks again.
    """

    kind: str
    key: str

    KINDS = ("wake", "released", "paused", "resumed", "revoked", "changed")


@dataclass
class LoopStats:
    """What a runner reports of one loop since its last report (counts are deltas)."""

    key: str
    passes: int = 0
    errors: int = 0
    last_start: float | None = None
    last_end: float | None = None
    last_duration: float | None = None
    last_outcome: str | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    p50: float | None = None
    p99: float | None = None
    running_since: float | None = None
    stall_after: float | None = None
    #: Failed passes in a row, up to the last one (absolute, not a delta).
    fail_streak: int | None = None
    fail_after: int | None = None
    #: When the next pass is planned to start (wall seconds), and the zone its schedule
    #: is written in (``None``: UTC).
    next_start: float | None = None
    zone: str | None = None


#: How far behind a runner's reports may be (it sends one a second): status calls a loop
#: stalled only once its last reported pass end is older than ``stall_after`` plus this.
#: The holder's own verdict (alerts, metrics, /healthz) has no such lag.
REPORT_LAG = 2.0


@dataclass(frozen=True)
class LoopRecord:
    """What the coordinator knows of one loop, for status."""

    key: str
    fence: int
    paused: bool
    holder: str | None
    held_since: float | None
    passes: int = 0
    errors: int = 0
    last_start: float | None = None
    last_end: float | None = None
    last_duration: float | None = None
    last_outcome: str | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    p50: float | None = None
    p99: float | None = None
    running_since: float | None = None
    stall_after: float | None = None
    fail_streak: int | None = None
    fail_after: int | None = None
    next_start: float | None = None
    zone: str | None = None
    extra: Mapping[str, object] = field(default_factory=dict)

    @property
    def app(self) -> str:
        return self.key.partition(":")[0]

    @property
    def name(self) -> str:
        return self.key.partition(":")[2]

    @property
    def failing(self) -> bool:
        """Whether the last ``fail_after`` passes all failed."""
        return bool(self.fail_after and (self.fail_streak or 0) >= self.fail_after)

    def state(self, wall_now: float) -> str:
        """``paused``, ``no runner``, ``failing``, ``stalled``, ``idle`` or ``running``.

        ``failing`` comes before ``stalled``: a pass that fails at its timeout ends a
        stall only to start the next one, and reads as failing throughout.
        """
        if self.paused:
            return "paused"
        if self.holder is None:
            return "no runner"
        if self.failing:
            return "failing"
        if self.stall_after is not None:
            since = max(t for t in (self.last_end, self.held_since, 0.0) if t is not None)
            if wall_now - since > self.stall_after + REPORT_LAG:
                return "stalled"
        if self.last_outcome == "idle" and self.running_since is None:
            return "idle"
        return "running"


@dataclass(frozen=True)
class RunnerRecord:
    """A live runner, as registered by its heartbeat."""

    id: str
    label: str
    seen: float
    #: The loops it can run (``None``: not said, by a runner of an older version: any).
    hosts: frozenset[str] | None = None

    def can_run(self, key: str) -> bool:
        """Whether it hosts loop ``key``, or the loop a partition or key of it belongs to."""
        if self.hosts is None or key in self.hosts:
            return True
        for i, char in enumerate(key):
            if char in "#[":
                return key[:i] in self.hosts
        return False


#: The stored fields of a loop's statistics, besides the counts, in every coordinator.
STAT_FIELDS = (
    "last_start", "last_end", "last_duration", "last_outcome", "last_error",
    "last_error_at", "p50", "p99", "running_since", "stall_after", "fail_streak",
    "fail_after", "next_start", "zone",
)


def hosts_text(runner: RunnerInfo) -> str:
    """``runner.hosts`` as stored: one JSON list."""
    return _hosts_json(runner.hosts)


def hosts_from(text: str | None) -> frozenset[str] | None:
    if not text:
        return None
    return _hosts_set(text)


# A runner's loops are written with every report and read with every count of the fleet,
# each second, and change only when it restarts: at 10,000 loops a runner spent 6 % of
# its CPU writing and reading the same lists. Both ways are remembered.
@functools.lru_cache(maxsize=8)
def _hosts_json(hosts: tuple[str, ...]) -> str:
    return json.dumps(list(hosts))


@functools.lru_cache(maxsize=16)
def _hosts_set(text: str) -> frozenset[str]:
    return frozenset(json.loads(text))


def stats_fields(stats: LoopStats) -> dict[str, object]:
    """The fields of a report that replace the stored ones (the counts add up instead)."""
    out: dict[str, object] = {}
    for name in (
        "last_start", "last_end", "last_duration", "last_outcome", "last_error",
        "last_error_at", "p50", "p99", "stall_after", "fail_streak", "fail_after", "next_start",
        "zone",
    ):
        value = getattr(stats, name)
        if value is not None:
            out[name] = value
    out["running_since"] = stats.running_since
    return out


class Coordinator(abc.ABC):
    """The shared store of leases. Implementations are safe for use from one event loop.

    Calls that cannot reach the store raise ``CoordinatorUnavailable``.
    """

    #: The URL with any password replaced by ``***``.
    display_url: str = ""

    async def open(self) -> None:  # noqa: B027 - most backends connect lazily
        """Connect, and create the schema if it is missing. Idempotent."""

    async def close(self) -> None:  # noqa: B027
        """Disconnect. Leases still held are left to expire."""

    @abc.abstractmethod
    async def acquire(
        self, key: str, runner: RunnerInfo, ttl: float
    ) -> Grant | Denied:
        """Grant ``runner`` the lease of ``key`` for ``ttl`` seconds, with a new fence.

        The lease is granted when:

        * it is unclaimed (never held, or released);
        * its claim has expired: on the coordinator's monotonic clock (SQLite), or, where
          the coordinator has only a wall clock (Redis, PostgreSQL), once this
          coordinator has seen the claim unchanged for its TTL (``Sightings``);
        * it is claimed by ``runner`` itself (a re-grant, with a new fence);
        * its holder is known to be dead (a backend-specific shortcut, such as a
          lock the kernel or the server frees when the holder's process or
          connection ends).

        It is refused with ``Denied`` when the loop is paused, or claimed by
        another runner whose claim has not expired; ``Denied.expires_in`` then
        says when that claim runs out, if known.
        """

    async def acquire_many(
        self, runner: RunnerInfo, requests: Mapping[str, float]
    ) -> dict[str, Grant | Denied]:
        """``acquire`` for each key of ``requests`` (key -> ttl), answered per key, by the
        rules of ``acquire``. A coordinator that can grant many leases in one round trip or
        one transaction does so; this default asks for each on its own, all at once. A
        failure to reach the coordinator raises for the whole batch."""
        keys = list(requests)
        answers = await asyncio.gather(*(self.acquire(key, runner, requests[key]) for key in keys))
        return dict(zip(keys, answers, strict=True))

    @abc.abstractmethod
    async def renew(
        self, runner: RunnerInfo, leases: Mapping[str, tuple[int, float]]
    ) -> dict[str, Renewal]:
        """Extend each lease in ``leases`` (key -> (fence, ttl)) by its ttl from now.

        A lease is extended only if ``runner`` still owns it with that same fence
        (checked atomically with the extension): then ``HELD``. If the loop was
        paused, the lease is released and the answer is ``PAUSED``. Otherwise
        nothing is changed and the answer is ``LOST``.
        """

    @abc.abstractmethod
    async def release(self, key: str, runner: RunnerInfo, fence: int) -> bool:
        """Give the lease up now, only if ``runner`` owns it with ``fence``.

        The fence counter is kept: the next grant is still greater. Returns
        whether a lease was released.
        """

    async def release_many(self, runner: RunnerInfo, leases: Mapping[str, int]) -> set[str]:
        """``release`` for each key of ``leases`` (key -> fence), by the rules of ``release``;
        the keys released. A coordinator that can give many leases back in one round trip
        does (a runner stopping with thousands of loops); this default gives each back on its
        own, all at once."""
        keys = list(leases)
        answers = await asyncio.gather(*(self.release(key, runner, leases[key]) for key in keys))
        return {key for key, released in zip(keys, answers, strict=True) if released}

    async def hand_over(
        self, key: str, holder: RunnerInfo, fence: int, heir: RunnerInfo, ttl: float
    ) -> Grant | None:
        """Pass the lease of ``key`` from ``holder`` (who owns it with ``fence``) to ``heir`` for
        ``ttl`` seconds, with the very next fence; ``None`` if ``holder`` no longer owns it so,
        the loop is paused (the lease is then given up) or another runner took it in between.

        A coordinator that can do this in one step does, so the lease is never seen free
        between the two owners (status would read ``no runner``); this default gives the
        lease back and asks for it again.
        """
        if not await self.release(key, holder, fence):
            return None
        answer = await self.acquire(key, heir, ttl)
        if isinstance(answer, Denied):
            return None
        if answer.fence != fence + 1:  # another runner held it in between
            await self.release(key, heir, answer.fence)
            return None
        return answer

    async def silence(self, owners: Collection[str]) -> dict[str, float] | None:
        """For each of ``owners`` (runner ids), for how long this coordinator has seen it make
        no grant and no renewal, in seconds of this host's monotonic clock (0 the first time
        it looks); ``None`` if this coordinator does not count them.

        Every grant and every renewal call moves its owner's activity count in the same
        atomic step, and the count is read here, so a standby refused by an owner that is
        not silent need not ask again: its lease is renewed. Once an owner has been silent
        for a claim's TTL, its claims may be taken (on Redis and PostgreSQL the acquire
        checks that the count is still the one seen), so a runner looks at many owners'
        counts once a second instead of asking for each of thousands of leases every third
        of a TTL. Where this answers ``None``, standbys ask on their own.
        """
        return None

    @abc.abstractmethod
    async def revoke(self, key: str) -> int | None:
        """Drop the lease of ``key`` whoever holds it (an operator's hand-over).

        Returns the fence it had, or ``None`` when no unexpired lease was held.
        The fence counter is kept, so the next grant is greater; the old
        holder's next renewal answers ``LOST``.
        """

    @abc.abstractmethod
    async def forget(self, key: str) -> bool:
        """Drop what is known of loop ``key`` (statistics, pause) from status, unless a
        lease on it is held: then return False and change nothing.

        The fence counter is kept, so a runner that declares the loop again later gets
        a greater fence than every holder before. A report or a lease brings the loop
        back into status.
        """

    @abc.abstractmethod
    async def report(self, runner: RunnerInfo, ttl: float, stats: Sequence[LoopStats]) -> None:
        """Record that ``runner`` is alive for ``ttl`` more seconds and store ``stats``.

        Counts in ``stats`` are added to the stored ones; other fields replace them.
        """

    @abc.abstractmethod
    async def runners(self) -> list[RunnerRecord]:
        """The runners whose last report has not expired."""

    @abc.abstractmethod
    async def set_paused(self, key: str, paused: bool) -> None:
        """Pause or resume ``key``. Pausing a loop no runner has seen yet is allowed."""

    @abc.abstractmethod
    async def loops(self) -> list[LoopRecord]:
        """Every loop the coordinator knows of, sorted by key."""

    @abc.abstractmethod
    async def publish(self, event: Event) -> None:
        """Deliver ``event`` to every runner subscribed to this coordinator, on any host."""

    async def publish_many(self, events: Sequence[Event]) -> None:
        """``publish`` each of ``events``, in order; in one round trip where the coordinator
        can."""
        for event in events:
            await self.publish(event)

    @abc.abstractmethod
    async def subscribe(self, runner: RunnerInfo, callback: Callable[[Event], None]) -> None:
        """Call ``callback`` on the current event loop for each event published from now on.

        The coordinator may also call it with ``released`` events it infers
        itself (a holder it saw die).
        """

    @abc.abstractmethod
    async def read_setting(self, name: str) -> Setting | None:
        """The setting stored under ``name``, or ``None``."""

    @abc.abstractmethod
    async def write_setting(self, name: str, value: str, fence: int) -> bool:
        """Store ``value`` under ``name``, unless the stored setting has a greater fence
        (it was written under a newer lease): then change nothing and return False. An
        equal fence overwrites. Checked atomically with the write."""
