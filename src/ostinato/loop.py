"""A loop's declaration, checked once, and the ``Pass`` context its body receives."""

from __future__ import annotations

import difflib
import inspect
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from ostinato.coordinators.clocks import SessionBound, drift_margin
from ostinato.durations import Duration, parse_duration
from ostinato.errors import DeclarationError
from ostinato.pacing import Pacing, check_cron
from ostinato.schedule import zone_named


class _Idle:
    """The value a pass returns when it found no work."""

    _instance: _Idle | None = None

    def __new__(cls) -> _Idle:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ostinato.IDLE"

    def __reduce__(self) -> str:
        return "IDLE"


IDLE: Final = _Idle()

Body = Callable[["Pass"], Any] | Callable[["Pass"], Awaitable[Any]]
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
#: Every keyword ``App.loop`` takes, for the hint when one is misspelt.
OPTIONS: Final = (
    "name", "every", "pause", "cron", "timezone", "catchup", "jitter", "idle", "error_backoff",
    "lease", "timeout", "stall_after", "fail_after", "isolation", "max_passes", "max_memory",
    "partitions", "keys", "refresh",
)
#: The most partitions one loop may have.
MAX_PARTITIONS: Final = 100_000
#: The longest key (``keys=``), in characters.
MAX_KEY_LENGTH: Final = 200
KeySource = Callable[[], Any]


def family_of(name: str) -> str:
    """The loop a partition or key belongs to: ``app:loop#3`` and ``app:loop[acme]`` are
    members of ``app:loop``; any other name is its own family."""
    for i, char in enumerate(name):
        if char in "#[":
            return name[:i]
    return name


def member_suffix(partition: int | None = None, key: str | None = None) -> str:
    """What a member adds to its loop's name: ``#3`` for a partition, ``[acme]`` for a key."""
    if partition is not None:
        return f"#{partition}"
    if key is not None:
        return f"[{key}]"
    return ""


def check_key(value: object) -> str:
    """``value`` if it can name a loop's member (``keys=``); else ``ValueError`` saying why."""
    if not isinstance(value, str):
        raise ValueError(f"a key must be a string, not {type(value).__name__} ({value!r})")
    if not value:
        raise ValueError("a key must not be empty")
    if len(value) > MAX_KEY_LENGTH:
        raise ValueError(f"key {value[:40]!r}... is longer than {MAX_KEY_LENGTH} characters")
    if not value.isprintable():
        raise ValueError(f"key {value!r} holds a control character")
    return value


#: The deadline of a lease that was lost: no time is ever before it.
REVOKED: Final = float("-inf")


class LocalLease:
    """This runner's view of a lease: its fence and its deadline on the local monotonic clock.

    The deadline is moved only by the runner's renewals, and set to minus
    infinity the moment a renewal fails, so ``holds()`` turns false at once.
    ``bound``, given by coordinators whose standbys may take a lease once the
    holder's session ends, must hold too (see ``SessionBound``).
    """

    __slots__ = ("bound", "deadline", "fence", "margin", "renew_at", "ttl")

    def __init__(self, fence: int, ttl: float, sent_at: float, bound: SessionBound | None = None) -> None:
        self.fence = fence
        self.ttl = ttl
        self.bound = bound
        # A pass may start only while at least this much of the lease is left.
        self.margin = ttl / 10
        self.deadline = 0.0
        self.extend(sent_at)

    def extend(self, sent_at: float) -> None:
        if self.deadline == REVOKED:
            # Revoked while its renewal was out (an event said so, or its session ended):
            # a renewal that reached the server before that must not revive it.
            return
        self.deadline = sent_at + self.ttl - drift_margin(self.ttl)
        #: When the next renewal is due: a third of the way into the lease.
        self.renew_at = sent_at + self.ttl / 3

    def revoke(self) -> None:
        self.deadline = REVOKED

    def holds(self, now: float | None = None) -> bool:
        if now is None:
            now = time.monotonic()
        return now + self.margin < self.deadline and (self.bound is None or self.bound.holds(now))

    def valid(self, now: float | None = None) -> bool:
        """Whether the lease itself has time left, its session aside."""
        return (time.monotonic() if now is None else now) + self.margin < self.deadline

    def suspended(self, now: float | None = None) -> bool:
        """Whether the lease has time left but its session went unheard too long: no pass
        starts until it is heard from again (or the lease runs out)."""
        if self.bound is None:
            return False
        if now is None:
            now = time.monotonic()
        return self.valid(now) and not self.bound.holds(now)

    def effective_deadline(self) -> float:
        """The deadline that ``holds()`` keeps, the session bound included, on the scale of
        ``deadline`` (for a child process that knows only the lease's margin)."""
        if self.bound is None:
            return self.deadline
        return min(self.deadline, self.bound.until - self.bound.margin + self.margin)


class Pass:
    """What a loop's body receives on each pass.

    Built by the runner; a test of a loop body can build one by hand with
    ``Pass("aggregate")`` (fence 1, a lease that holds for an hour) or with
    ``app=`` and ``fence=`` given.
    """

    __slots__ = (
        "_lease", "app", "fence", "key", "loop", "missed", "number", "partition", "partitions",
        "scheduled_for", "started",
    )

    def __init__(
        self,
        loop: str,
        lease: LocalLease | None = None,
        number: int = 1,
        started: float | None = None,
        *,
        app: str = "",
        fence: int | None = None,
        scheduled_for: datetime | None = None,
        missed: int = 0,
        partition: int | None = None,
        partitions: int | None = None,
        key: str | None = None,
    ) -> None:
        if lease is None:
            lease = LocalLease(1 if fence is None else fence, 3600.0, time.monotonic())
        #: The loop's name, as declared.
        self.loop = loop
        #: The name of the app the loop belongs to.
        self.app = app
        #: The lease's fence: greater than every earlier holder's. Pass it to
        #: stores that can refuse writes from a stale holder (``ostinato.fenced``).
        self.fence = lease.fence
        #: Passes this holder has started so far, this one included.
        self.number = number
        #: When this pass started, on the monotonic clock.
        self.started = time.monotonic() if started is None else started
        #: On a ``cron=`` loop, the slot this pass stands for: an aware datetime in the
        #: loop's zone (for a catch-up pass, the latest slot it covers); else ``None``.
        self.scheduled_for = scheduled_for
        #: How many missed slots this catch-up pass covers (``catchup=``); 0 on time.
        self.missed = missed
        #: On a ``partitions=N`` loop, which partition this pass works on (0 to N - 1) and N.
        self.partition = partition
        self.partitions = partitions
        #: On a ``keys=`` loop, the key this pass works on.
        self.key = key
        self._lease = lease

    @property
    def lease_name(self) -> str:
        """The name of the lease this pass runs under, ``app:loop`` (``app:loop#3`` for a
        partition, ``app:loop[acme]`` for a key): what status shows and what fences are
        recorded against."""
        name = self.loop + member_suffix(self.partition, self.key)
        return f"{self.app}:{name}" if self.app else name

    def holds(self) -> bool:
        """Whether this runner still holds the loop's lease with a safety margin left.

        A long pass can call this between steps and stop early when it is false.
        """
        return self._lease.fence == self.fence and self._lease.holds()

    def __repr__(self) -> str:
        return f"<Pass {self.lease_name} fence={self.fence} number={self.number}>"


@dataclass(frozen=True)
class LoopSpec:
    """A loop as declared: its body and how it must be run."""

    name: str
    body: Body
    is_async: bool
    pacing: Pacing
    lease: float
    timeout: float | None
    stall_after: float | None
    isolation: str | None = None
    max_passes: int | None = None
    max_memory: int | None = None
    fail_after: int = 3
    #: ``partitions=N``: N members ``name#0`` .. ``name#N-1``, each with its own lease.
    partitions: int | None = None
    #: ``keys=``: the source of the key list, one member ``name[key]`` per key, re-read
    #: every ``refresh`` seconds.
    keys: KeySource | None = None
    refresh: float = 30.0

    @property
    def isolated(self) -> bool:
        return self.isolation == "process"

    @property
    def family(self) -> bool:
        """Whether the loop is made of members (partitions or keys)."""
        return self.partitions is not None or self.keys is not None


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgt]?i?b?)\s*$")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(value: str | int) -> int:
    """Bytes in ``"512MB"``, ``"1.5GiB"``, ``"800k"`` or a plain number (powers of 1024)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as '512MB', not {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{value!r} must be more than zero bytes")
        return value
    match = _SIZE.match(str(value).lower())
    if match is None:
        raise ValueError(f"{value!r} is not a size; write it like '512MB' or '2GB'")
    number, unit = match.groups()
    size = int(float(number) * _SIZE_UNITS[unit[:1]])
    if size <= 0:
        raise ValueError(f"{value!r} must be more than zero bytes")
    return size


def _duration(loop: str, field: str, value: Duration, *, positive: bool = False) -> float:
    try:
        seconds = parse_duration(value, what=field)
    except ValueError as exc:
        raise DeclarationError(loop, field, str(exc)) from None
    if positive and seconds <= 0:
        raise DeclarationError(loop, field, f"{value!r} must be more than zero")
    return seconds


def _bounds(loop: str, field: str, value: object) -> tuple[float, float]:
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise DeclarationError(loop, field, f"expected a pair (min, max), got {value!r}")
    low = _duration(loop, field, value[0], positive=True)
    high = _duration(loop, field, value[1], positive=True)
    if low > high:
        raise DeclarationError(loop, field, f"min {value[0]!r} is more than max {value[1]!r}")
    return low, high


def declare(
    body: Body,
    *,
    name: str | None = None,
    every: Duration | None = None,
    pause: Duration | None = None,
    cron: str | None = None,
    timezone: str | None = None,
    catchup: Duration | None = None,
    jitter: Duration | None = None,
    idle: tuple[Duration, Duration] = ("100ms", "5s"),
    error_backoff: tuple[Duration, Duration] = ("1s", "1m"),
    lease: Duration = "10s",
    timeout: Duration | None = None,
    stall_after: Duration | None = None,
    isolation: str | None = None,
    max_passes: int | None = None,
    max_memory: str | int | None = None,
    fail_after: int = 3,
    partitions: int | None = None,
    keys: KeySource | None = None,
    refresh: Duration | None = None,
    **unknown: Any,
) -> LoopSpec:
    """Check a declaration and build its ``LoopSpec``; raise ``DeclarationError`` if wrong."""
    loop = name if name is not None else getattr(body, "__name__", "")
    if not isinstance(loop, str) or not _NAME.match(loop):
        raise DeclarationError(
            str(loop), "name", "a loop name is letters, digits, '_', '.' or '-'"
        )
    for option in unknown:
        close = difflib.get_close_matches(option, OPTIONS, n=1)
        hint = f"did you mean {close[0]}=?" if close else f"the options are {', '.join(OPTIONS)}"
        raise DeclarationError(loop, option, f"no such option; {hint}")
    if not callable(body):
        raise DeclarationError(loop, "body", f"{body!r} is not callable")
    given = [f for f, v in (("every", every), ("pause", pause), ("cron", cron)) if v is not None]
    if len(given) > 1:
        raise DeclarationError(
            loop, given[1], f"give only one of every=, pause= and cron= (got {', '.join(given)})"
        )
    every_s = _duration(loop, "every", every, positive=True) if every is not None else None
    pause_s = _duration(loop, "pause", pause) if pause is not None else None
    if cron is not None and (problem := check_cron(cron)) is not None:
        raise DeclarationError(loop, "cron", problem)
    for field, value in (("timezone", timezone), ("catchup", catchup), ("jitter", jitter)):
        if value is not None and cron is None:
            raise DeclarationError(
                loop, field, f"applies to calendar schedules only: give cron= too, or leave {field}= out"
            )
    if timezone is not None:
        try:
            zone_named(timezone)
        except ValueError as exc:
            raise DeclarationError(loop, "timezone", str(exc)) from None
    catchup_s = _duration(loop, "catchup", catchup, positive=True) if catchup is not None else None
    jitter_s = _duration(loop, "jitter", jitter) if jitter is not None else 0.0
    lease_s = _duration(loop, "lease", lease)
    if lease_s < 0.2:
        raise DeclarationError(loop, "lease", f"{lease!r} is too short; use at least '200ms'")
    timeout_s = _duration(loop, "timeout", timeout, positive=True) if timeout is not None else None
    stall_s = (
        _duration(loop, "stall_after", stall_after, positive=True)
        if stall_after is not None
        else None
    )
    if isolation not in (None, "process"):
        raise DeclarationError(
            loop, "isolation", f"{isolation!r} is not a mode; use isolation='process' or leave it out"
        )
    if (max_passes is not None or max_memory is not None) and isolation != "process":
        field = "max_passes" if max_passes is not None else "max_memory"
        raise DeclarationError(loop, field, "recycling needs isolation='process'")
    if max_passes is not None and (
        isinstance(max_passes, bool) or not isinstance(max_passes, int) or max_passes < 1
    ):
        raise DeclarationError(loop, "max_passes", f"{max_passes!r} must be a whole number >= 1")
    if isinstance(fail_after, bool) or not isinstance(fail_after, int) or fail_after < 1:
        raise DeclarationError(loop, "fail_after", f"{fail_after!r} must be a whole number >= 1")
    if partitions is not None and (
        isinstance(partitions, bool) or not isinstance(partitions, int)
        or not 1 <= partitions <= MAX_PARTITIONS
    ):
        raise DeclarationError(
            loop, "partitions", f"{partitions!r} must be a whole number from 1 to {MAX_PARTITIONS:,}"
        )
    if keys is not None:
        if partitions is not None:
            raise DeclarationError(loop, "keys", "give partitions= or keys=, not both")
        if not callable(keys):
            raise DeclarationError(
                loop, "keys", f"{keys!r} is not callable; give a function that returns the keys"
            )
    if refresh is not None and keys is None:
        raise DeclarationError(
            loop, "refresh", "applies to keys= only: give keys= too, or leave refresh= out"
        )
    refresh_s = _duration(loop, "refresh", refresh, positive=True) if refresh is not None else 30.0
    memory_bytes = None
    if max_memory is not None:
        try:
            memory_bytes = parse_size(max_memory)
        except ValueError as exc:
            raise DeclarationError(loop, "max_memory", str(exc)) from None
    pacing = Pacing(
        every=every_s,
        pause=pause_s,
        cron=cron,
        timezone=timezone,
        catchup=catchup_s,
        jitter=jitter_s,
        idle=_bounds(loop, "idle", idle),
        error_backoff=_bounds(loop, "error_backoff", error_backoff),
    )
    return LoopSpec(
        name=loop,
        body=body,
        is_async=inspect.iscoroutinefunction(body),
        pacing=pacing,
        lease=lease_s,
        timeout=timeout_s,
        stall_after=stall_s,
        isolation=isolation,
        max_passes=max_passes,
        max_memory=memory_bytes,
        fail_after=fail_after,
        partitions=partitions,
        keys=keys,
        refresh=refresh_s,
    )
