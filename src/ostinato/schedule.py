"""Calendar schedules: a cron line read on a time zone's wall clock, and the instants it starts at.

croniter matches the fields; this module turns each matching wall-clock time
into the instants it stands for, because a wall clock skips times on a
spring-forward night and shows some twice on a fall-back night:

* a matching time that does not exist (inside the skipped stretch) starts once,
  at the first instant after the skip (``30 2 * * *`` at 03:00 in Berlin); all
  such times of one night share that one start, and a match right at the end of
  the skip is the same start, not another;
* a matching time shown twice starts once, at its first showing, unless the
  line repeats within the day (its second, minute or hour field is ``*`` or a
  step, as in ``*/15 * * * *`` or ``0 * * * *``): then it starts at both showings,
  so such a schedule keeps its pace in real time through the repeated stretch.

Every start is an aware ``datetime`` in the schedule's zone; the starts are
strictly increasing and never the same instant twice.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from croniter.croniter import CroniterError

#: The ``@`` names croniter accepts, as the five fields they stand for.
ALIASES = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_DAY = timedelta(days=1)


def zone_named(name: str | None) -> tzinfo:
    """The IANA zone ``name`` (UTC when ``None``); ``ValueError`` saying what to write if unknown."""
    if name is None or name == "UTC":
        return UTC
    if not isinstance(name, str) or not name or name.startswith("/") or ".." in name:
        raise ValueError(f"{name!r} is not a time zone name; write an IANA name like 'Europe/Berlin'")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"{name!r} is not a known time zone; write an IANA name like 'Europe/Berlin' or "
            "'America/New_York'"
        ) from None


class Schedule:
    """The starts of cron line ``cron`` on the wall clock of zone ``timezone`` (UTC when ``None``).

    Five fields, or six with seconds last (as croniter reads them), or an alias
    such as ``@daily``. ``ValueError`` says what is wrong with a bad line or zone.
    """

    def __init__(self, cron: str, timezone: str | None = None) -> None:
        self.zone = zone_named(timezone)
        self.zone_name = "UTC" if timezone is None else timezone
        if not isinstance(cron, str) or not croniter.is_valid(cron):
            raise ValueError(f"{cron!r} is not a valid cron expression (like '*/5 * * * *')")
        fields = ALIASES.get(cron.strip().lower(), cron).split()
        if len(fields) > 6:
            raise ValueError(
                f"{cron!r} has {len(fields)} fields; write five (minute hour day month weekday), "
                "or six with seconds last"
            )
        self.cron = cron
        # Second (sixth field), minute and hour: a wildcard or a step means the line
        # repeats within the day, so a repeated wall-clock stretch is run through again.
        clock = [fields[0], fields[1], *fields[5:]]
        self.repeating = any("*" in field or "/" in field for field in clock)
        try:
            self.next_after(datetime(2000, 1, 1, tzinfo=UTC))
        except CroniterError:
            raise ValueError(f"{cron!r} never starts (no date matches it)") from None

    def __repr__(self) -> str:
        return f"Schedule({self.cron!r}, {self.zone_name!r})"

    def next_after(self, after: datetime) -> datetime:
        """The first start strictly after the aware instant ``after``."""
        return next(self.starts_after(after))

    def starts(self, after: datetime, count: int) -> list[datetime]:
        """The first ``count`` starts strictly after the aware instant ``after``."""
        found: list[datetime] = []
        if count > 0:
            for start in self.starts_after(after):
                found.append(start)
                if len(found) == count:
                    break
        return found

    def starts_after(self, after: datetime) -> Iterator[datetime]:
        """Every start strictly after the aware instant ``after``, in order."""
        if after.tzinfo is None:
            raise ValueError(f"{after!r} has no time zone; give an aware datetime")
        moment = after.astimezone(UTC)
        # Begin early enough on the wall clock to see every time whose instant is after
        # ``moment``: on a fall-back night those include earlier wall-clock times.
        offsets = [self._offset(moment + step) for step in (-_DAY, timedelta(0), _DAY)]
        begin = (moment + min(offsets)).replace(tzinfo=None)
        walls = croniter(self.cron, begin)
        later: list[datetime] = []  # second showings, held until the repeated stretch ends
        last: datetime | None = None
        while True:
            wall = walls.get_next(datetime)
            first, second, repeated = self._instants(wall)
            if not repeated and later:
                for held in later:
                    if held > moment and (last is None or held > last):
                        last = held
                        yield held.astimezone(self.zone)
                later.clear()
            if second is not None:
                later.append(second)
            if first > moment and (last is None or first > last):
                last = first
                yield first.astimezone(self.zone)

    def _offset(self, moment: datetime) -> timedelta:
        offset = moment.astimezone(self.zone).utcoffset()
        return offset if offset is not None else timedelta(0)

    def _instants(self, wall: datetime) -> tuple[datetime, datetime | None, bool]:
        """The UTC instant a wall-clock time starts at, its second showing if it is run
        again, and whether the time is shown twice."""
        early = wall.replace(tzinfo=self.zone).astimezone(UTC)
        late = wall.replace(tzinfo=self.zone, fold=1).astimezone(UTC)
        if early == late:
            return early, None, False
        if early < late:  # shown twice: ``early`` is its first showing
            return early, late if self.repeating else None, True
        # Skipped: ``late`` reads the time with the offset after the skip (so it lies
        # before it) and ``early`` with the one before; the skip lies between them.
        return self._skip_end(late, early), None, False

    def _skip_end(self, low: datetime, high: datetime) -> datetime:
        """The first instant in ``(low, high]`` whose offset is ``high``'s: where the skip ends."""
        target = self._offset(high)
        while high - low > timedelta(seconds=1):
            middle = low + (high - low) / 2
            middle = middle.replace(microsecond=0)
            if middle <= low:
                break
            if self._offset(middle) == target:
                high = middle
            else:
                low = middle
        return high


@functools.lru_cache(maxsize=256)
def schedule_for(cron: str, timezone: str | None) -> Schedule:
    """The ``Schedule`` of ``cron`` in ``timezone``, built once."""
    return Schedule(cron, timezone)
