"""Calendar schedules across DST changes, from given instants: no clock, no sleeping.

The nights used (2025): Europe/Berlin skips 02:00-03:00 on 30 March and shows
02:00-03:00 twice on 26 October; America/New_York skips 02:00-03:00 on 9 March
and shows 01:00-02:00 twice on 2 November; Australia/Lord_Howe shows 01:30-02:00
twice on 6 April and skips 02:00-02:30 on 5 October (a 30-minute shift).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ostinato
from ostinato.errors import ConfigurationError, DeclarationError, UnknownLoopError
from ostinato.schedule import Schedule

BERLIN, NEW_YORK, LORD_HOWE = "Europe/Berlin", "America/New_York", "Australia/Lord_Howe"


def starts(cron: str, zone: str, after: str, count: int) -> list[str]:
    """The next ``count`` starts after the local wall time ``after``, as ISO 8601 with offsets."""
    moment = datetime.fromisoformat(after).replace(tzinfo=ZoneInfo(zone))
    return [start.isoformat() for start in Schedule(cron, zone).starts(moment, count)]


def spacing(cron: str, zone: str, begin: str, hours: int) -> set[timedelta]:
    """The real time between consecutive starts over ``hours`` from the local time ``begin``."""
    schedule = Schedule(cron, zone)
    moment = datetime.fromisoformat(begin).replace(tzinfo=ZoneInfo(zone))
    end = moment + timedelta(hours=hours)
    found = []
    for start in schedule.starts_after(moment):
        if start > end:
            break
        found.append(start.astimezone(UTC))
    assert len(found) == len(set(found)), "a start was scheduled twice"
    return {b - a for a, b in itertools.pairwise(found)}


# -- a local time that does not exist: once, at the first instant after the skip ---------------


@pytest.mark.parametrize(
    ("cron", "zone", "after", "expected"),
    [
        ("30 2 * * *", BERLIN, "2025-03-29T12:00",
         ["2025-03-30T03:00:00+02:00", "2025-03-31T02:30:00+02:00"]),
        ("30 2 * * *", NEW_YORK, "2025-03-08T12:00",
         ["2025-03-09T03:00:00-04:00", "2025-03-10T02:30:00-04:00"]),
        ("15 2 * * *", LORD_HOWE, "2025-10-04T12:00",
         ["2025-10-05T02:30:00+11:00", "2025-10-06T02:15:00+11:00"]),
        # Every skipped match of the night shares the one start (and 03:00 is no other).
        ("*/20 2 * * *", BERLIN, "2025-03-29T12:00",
         ["2025-03-30T03:00:00+02:00", "2025-03-31T02:00:00+02:00"]),
        ("0,30 2,3 * * *", BERLIN, "2025-03-30T00:00",
         ["2025-03-30T03:00:00+02:00", "2025-03-30T03:30:00+02:00", "2025-03-31T02:00:00+02:00"]),
        ("30 * * * *", BERLIN, "2025-03-30T01:00",
         ["2025-03-30T01:30:00+01:00", "2025-03-30T03:00:00+02:00", "2025-03-30T03:30:00+02:00"]),
    ],
)
def test_a_skipped_local_time_starts_once_when_the_skip_ends(
    cron: str, zone: str, after: str, expected: list[str]
) -> None:
    """A match inside a spring-forward skip starts once, at the first valid instant after it."""
    assert starts(cron, zone, after, len(expected)) == expected


# -- a local time shown twice: once, at its first showing ---------------------------------------


@pytest.mark.parametrize(
    ("cron", "zone", "after", "expected"),
    [
        ("30 2 * * *", BERLIN, "2025-10-25T12:00",
         ["2025-10-26T02:30:00+02:00", "2025-10-27T02:30:00+01:00"]),
        ("30 1 * * *", NEW_YORK, "2025-11-01T12:00",
         ["2025-11-02T01:30:00-04:00", "2025-11-03T01:30:00-05:00"]),
        ("45 1 * * *", LORD_HOWE, "2025-04-05T12:00",
         ["2025-04-06T01:45:00+11:00", "2025-04-07T01:45:00+10:30"]),
        ("0,30 1,2 * * *", NEW_YORK, "2025-11-02T00:00",
         ["2025-11-02T01:00:00-04:00", "2025-11-02T01:30:00-04:00", "2025-11-02T02:00:00-05:00"]),
    ],
)
def test_a_repeated_local_time_starts_once_at_its_first_showing(
    cron: str, zone: str, after: str, expected: list[str]
) -> None:
    """A fixed time inside a fall-back repeat starts once, at its first showing."""
    assert starts(cron, zone, after, len(expected)) == expected


def test_a_start_asked_for_during_the_repeat_is_not_run_again() -> None:
    """Asked between the two showings of 02:30, the next start is the next day's."""
    between = datetime(2025, 10, 26, 2, 10, fold=1, tzinfo=ZoneInfo(BERLIN))  # 02:10 CET
    start = Schedule("30 2 * * *", BERLIN).next_after(between)
    assert start.isoformat() == "2025-10-27T02:30:00+01:00"


def test_a_line_repeating_within_the_day_keeps_its_pace_through_the_repeat() -> None:
    """``*/20 1 * * *`` in New York starts at both showings of 01:00-02:00, in order."""
    assert starts("*/20 1 * * *", NEW_YORK, "2025-11-02T00:00", 7) == [
        "2025-11-02T01:00:00-04:00", "2025-11-02T01:20:00-04:00", "2025-11-02T01:40:00-04:00",
        "2025-11-02T01:00:00-05:00", "2025-11-02T01:20:00-05:00", "2025-11-02T01:40:00-05:00",
        "2025-11-03T01:00:00-05:00",
    ]


# -- minute steps and wildcards through both nights ---------------------------------------------


NIGHTS = [
    (BERLIN, "2025-03-29T22:00"), (BERLIN, "2025-10-25T22:00"),
    (NEW_YORK, "2025-03-08T22:00"), (NEW_YORK, "2025-11-01T22:00"),
    (LORD_HOWE, "2025-04-05T22:00"), (LORD_HOWE, "2025-10-04T22:00"),
]


PACES = [
    ("*/15 * * * *", timedelta(minutes=15)),
    ("* * * * *", timedelta(minutes=1)),
    ("* * * * * */20", timedelta(seconds=20)),
    ("0 * * * *", timedelta(hours=1)),
]


@pytest.mark.parametrize(("cron", "step", "zone", "begin"), [
    (cron, step, zone, begin)
    for cron, step in PACES
    for zone, begin in NIGHTS
    # A 30-minute shift cannot keep an hourly line on the hour both ways: see below.
    if not (zone == LORD_HOWE and step == timedelta(hours=1))
])
def test_steps_and_wildcards_keep_their_pace_through_both_nights(
    cron: str, step: timedelta, zone: str, begin: str
) -> None:
    """Through a skip and a repeat, ``*/15``, ``*``, hourly and every-20-seconds lines start
    exactly one step apart in real time: nothing twice, nothing missing."""
    hours = 2 if step < timedelta(minutes=1) else 8
    assert spacing(cron, zone, begin, hours) == {step}


def test_an_hourly_line_on_lord_howe_starts_at_each_wall_clock_hour() -> None:
    """With a 30-minute shift, ``0 * * * *`` starts at every local full hour, each once; the
    skipped 02:00 starts when the skip ends, at 02:30."""
    assert starts("0 * * * *", LORD_HOWE, "2025-10-05T00:30", 4) == [
        "2025-10-05T01:00:00+10:30", "2025-10-05T02:30:00+11:00", "2025-10-05T03:00:00+11:00",
        "2025-10-05T04:00:00+11:00",
    ]
    assert starts("0 * * * *", LORD_HOWE, "2025-04-06T00:30", 3) == [
        "2025-04-06T01:00:00+11:00", "2025-04-06T02:00:00+10:30", "2025-04-06T03:00:00+10:30",
    ]


# -- six fields: seconds last, as croniter reads them ----------------------------------------------


def test_six_fields_give_seconds() -> None:
    """The sixth field is seconds; a skipped 02:30:15 starts at 03:00:00."""
    assert starts("30 2 * * * 15", BERLIN, "2025-03-28T12:00", 3) == [
        "2025-03-29T02:30:15+01:00", "2025-03-30T03:00:00+02:00", "2025-03-31T02:30:15+02:00",
    ]
    assert starts("30 2 * * * 15", BERLIN, "2025-10-25T12:00", 2) == [
        "2025-10-26T02:30:15+02:00", "2025-10-27T02:30:15+01:00",
    ]


def test_utc_is_the_default_and_every_start_is_aware() -> None:
    """With no zone the line is read in UTC."""
    start = Schedule("30 2 * * *").next_after(datetime(2025, 3, 30, tzinfo=UTC))
    assert start == datetime(2025, 3, 30, 2, 30, tzinfo=UTC)
    assert start.utcoffset() == timedelta(0)


@pytest.mark.parametrize(("cron", "zone", "message"), [
    ("30 2 * *", None, "not a valid cron expression"),
    ("0 0 30 2 *", None, "never starts"),
    ("0 0 1 1 * 0 2030", None, "has 7 fields"),
    ("30 2 * * *", "Europe/Berlín", "not a known time zone"),
    ("30 2 * * *", "../etc/passwd", "not a time zone name"),
])
def test_bad_lines_and_zones_say_what_to_write(cron: str, zone: str | None, message: str) -> None:
    """A bad line or zone is one ``ValueError`` that names it."""
    with pytest.raises(ValueError, match=message):
        Schedule(cron, zone)


def test_a_naive_instant_is_refused() -> None:
    """An instant without a zone is ambiguous, so it is refused."""
    with pytest.raises(ValueError, match="no time zone"):
        Schedule("* * * * *").next_after(datetime(2025, 1, 1))


# -- properties: random lines, random instants ---------------------------------------------------


@dataclass(frozen=True)
class Line:
    """A cron line and the sets of values its fields match."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int] | None  # None: any day
    weekdays: frozenset[int] | None  # cron numbering, Sunday 0; None: any

    def matches(self, wall: datetime) -> bool:
        if wall.minute not in self.minutes or wall.hour not in self.hours:
            return False
        day_ok = self.days is None or wall.day in self.days
        weekday_ok = self.weekdays is None or (wall.weekday() + 1) % 7 in self.weekdays
        if self.days is not None and self.weekdays is not None:
            return day_ok or weekday_ok  # cron's rule when both are restricted
        return day_ok and weekday_ok

    @property
    def repeating(self) -> bool:
        return any(c in self.text.split()[0] + self.text.split()[1] for c in "*/")


@st.composite
def fields(draw: st.DrawFn, top: int) -> tuple[str, frozenset[int]]:
    kind = draw(st.sampled_from(["*", "step", "one", "list", "range"]))
    if kind == "*":
        return "*", frozenset(range(top))
    if kind == "step":
        k = draw(st.integers(2, top // 2))
        return f"*/{k}", frozenset(range(0, top, k))
    if kind == "one":
        n = draw(st.integers(0, top - 1))
        return str(n), frozenset({n})
    if kind == "list":
        values = sorted(draw(st.sets(st.integers(0, top - 1), min_size=2, max_size=4)))
        return ",".join(map(str, values)), frozenset(values)
    a = draw(st.integers(0, top - 2))
    b = draw(st.integers(a + 1, top - 1))
    return f"{a}-{b}", frozenset(range(a, b + 1))


@st.composite
def lines(draw: st.DrawFn) -> Line:
    minute, minutes = draw(fields(60))
    hour, hours = draw(fields(24))
    day = draw(st.sampled_from(["*", "*", "*", "1", "6", "1-7"]))
    weekday = draw(st.sampled_from(["*", "*", "*", "0", "1-5", "6"]))
    days = None if day == "*" else frozenset(range(1, 8)) if day == "1-7" else frozenset({int(day)})
    weekdays = (None if weekday == "*" else frozenset(range(1, 6)) if weekday == "1-5"
                else frozenset({int(weekday)}))
    return Line(f"{minute} {hour} {day} * {weekday}", minutes, hours, days, weekdays)


#: The changes of 2025 in each zone, as UTC instants; instants are drawn around them.
CHANGES = {
    BERLIN: ["2025-03-30T01:00", "2025-10-26T01:00"],
    NEW_YORK: ["2025-03-09T07:00", "2025-11-02T06:00"],
    LORD_HOWE: ["2025-04-05T15:00", "2025-10-04T15:30"],
    "UTC": ["2025-06-01T00:00"],
}
WINDOW = timedelta(hours=6)


@st.composite
def instants(draw: st.DrawFn) -> tuple[str, datetime]:
    zone = draw(st.sampled_from(sorted(CHANGES)))
    change = datetime.fromisoformat(draw(st.sampled_from(CHANGES[zone]))).replace(tzinfo=UTC)
    seconds = draw(st.integers(-5 * 3600, 2 * 3600))
    return zone, change + timedelta(seconds=seconds, microseconds=draw(st.sampled_from([0, 1, 500_000])))


def expected_starts(line: Line, zone: str, after: datetime, end: datetime) -> set[datetime]:
    """Minute by minute in real time: every instant whose wall-clock reading matches, at its
    first showing (or at every showing of a line that repeats within the day)."""
    tz = ZoneInfo(zone) if zone != "UTC" else UTC
    found = set()
    moment = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while moment <= end:
        wall = moment.astimezone(tz)
        if line.matches(wall) and (wall.fold == 0 or line.repeating):
            found.add(moment)
        moment += timedelta(minutes=1)
    return found


@settings(max_examples=200, deadline=None)
@given(line=lines(), where=instants())
def test_random_lines_start_in_order_after_the_instant_and_miss_nothing(
    line: Line, where: tuple[str, datetime]
) -> None:
    """Starts strictly increase, come after ``after``, never repeat an instant, and (outside
    skipped stretches) are exactly the brute-force matches; the only other starts are at the
    end of a skip."""
    zone, after = where
    schedule = Schedule(line.text, zone)
    end = after + WINDOW
    found: list[datetime] = []
    for start in schedule.starts_after(after):
        assert start.tzinfo is not None
        assert start > after
        assert not found or start > found[-1]
        if start > end:
            break
        found.append(start.astimezone(UTC))
    expected = expected_starts(line, zone, after, end)
    assert expected <= set(found), f"missed {sorted(expected - set(found))}"
    tz = ZoneInfo(zone) if zone != "UTC" else UTC
    for extra in set(found) - expected:
        before, at = (extra - timedelta(seconds=1)).astimezone(tz), extra.astimezone(tz)
        assert at.utcoffset() > before.utcoffset(), f"{extra} is neither a match nor a skip's end"  # type: ignore[operator]


# -- declarations and app.next_starts ------------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    ({"cron": "30 2 * * *", "timezone": "Europe/Berlín"},
     r"loop 'nightly', timezone=: 'Europe/Berlín' is not a known time zone; write an IANA name"),
    ({"timezone": "Europe/Berlin"}, r"loop 'nightly', timezone=: .*give cron= too"),
    ({"every": "1h", "catchup": "6h"}, r"loop 'nightly', catchup=: .*give cron= too"),
    ({"pause": "1s", "jitter": "30s"}, r"loop 'nightly', jitter=: .*give cron= too"),
    ({"cron": "30 2 * * *", "catchup": "0s"}, r"loop 'nightly', catchup=: .*more than zero"),
    ({"cron": "30 2 * * *", "jitter": "soon"}, r"loop 'nightly', jitter=: "),
    ({"cron": "0 0 1 1 * 0 2030"}, r"loop 'nightly', cron=: .*has 7 fields"),
])
def test_bad_schedule_options_fail_at_declaration(options: dict[str, object], message: str) -> None:
    """A bad zone, or a calendar option without cron=, is one error naming the loop and option."""
    app = ostinato.App("reports")
    with pytest.raises(DeclarationError, match=message):
        app.loop(name="nightly", **options)(lambda ctx: None)  # type: ignore[call-overload]


def next_app() -> ostinato.App:
    app = ostinato.App("reports", coordinator="memory://reports")
    app.loop(name="nightly", cron="30 2 * * *", timezone=BERLIN)(lambda ctx: None)
    app.loop(name="rollup", every="90m")(lambda ctx: None)
    app.loop(name="drain", pause="1s")(lambda ctx: None)
    return app


def test_next_starts_from_python() -> None:
    """``app.next_starts`` gives aware datetimes in the loop's zone; a naive ``after`` is read
    there too; ``every=`` counts from ``after``."""
    app = next_app()
    after = datetime(2025, 3, 29, 12, tzinfo=ZoneInfo(BERLIN))
    assert [d.isoformat() for d in app.next_starts("nightly", count=2, after=after)] == [
        "2025-03-30T03:00:00+02:00", "2025-03-31T02:30:00+02:00",
    ]
    assert app.next_starts("reports:nightly", 2, datetime(2025, 3, 29, 12)) == app.next_starts(
        "nightly", 2, after)
    assert app.next_starts("rollup", 2, datetime(2025, 3, 30, tzinfo=UTC)) == [
        datetime(2025, 3, 30, 1, 30, tzinfo=UTC), datetime(2025, 3, 30, 3, tzinfo=UTC),
    ]
    assert len(app.next_starts("nightly")) == 5


def test_next_starts_refuses_what_has_no_answer() -> None:
    """A loop without a schedule, an unknown loop and a bad count are each one clear error."""
    app = next_app()
    with pytest.raises(ConfigurationError, match="loop 'reports:drain' has no schedule"):
        app.next_starts("drain")
    with pytest.raises(UnknownLoopError, match="no loop named 'nighty'"):
        app.next_starts("nighty")
    with pytest.raises(ConfigurationError, match="count must be a whole number"):
        app.next_starts("nightly", count=0)
