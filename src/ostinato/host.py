"""What a loop's keeper and a loop made of members need of the runner that hosts them, as
small protocols, so that none of these modules imports another's."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ostinato.coordinators.protocol import Coordinator, Denied, Grant, RunnerInfo
    from ostinato.loop import LocalLease, LoopSpec
    from ostinato.standbys import Standbys

#: While stopping, how long a release or the last report may wait for the coordinator:
#: a lease not released in time expires by itself, so a dead or hung coordinator
#: cannot hold up the exit.
FAREWELL = 0.4
#: A runner whose heartbeat is older than this counts as gone (for balancing only:
#: leases, not heartbeats, decide who runs a loop).
RUNNER_TTL = 5.0


class Member(Protocol):
    """A keeper, as the partitions and keys of a loop see it."""

    key: str
    lease: LocalLease | None

    def chance(self) -> None: ...

    def nudge(self) -> None: ...

    def retire(self) -> None: ...


class Gate(Protocol):
    """What a partition asks before it takes its lease and after it got one."""

    open: bool

    async def wait_open(self) -> None: ...

    async def confirm(self, granted: float) -> bool: ...


class Host(Protocol):
    """The runner, as its keepers see it."""

    app_name: str
    info: RunnerInfo
    coordinator: Coordinator
    stopping: bool
    stopped: asyncio.Event
    wall_offset: float
    started_wall: float
    live_ids: set[str]
    app_target: str | None
    standbys: Standbys

    async def acquire(self, key: str, ttl: float) -> Grant | Denied: ...

    async def give_back(self, key: str, lease: LocalLease) -> None: ...

    def lease_granted(self, key: str, lease: LocalLease) -> None: ...

    def lease_ended(self, key: str, lease: LocalLease) -> None: ...

    def share_held(self) -> int: ...

    def hurry(self, key: str) -> bool: ...

    def resume(self, keeper: Member) -> None: ...

    def hosts_changed(self) -> None: ...

    def new_member(self, spec: LoopSpec, key: str) -> Member: ...

    async def wait(self, seconds: float, *early: asyncio.Event) -> None: ...
