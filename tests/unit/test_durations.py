"""Durations: every form a user may write, and clear refusals."""

from __future__ import annotations

from datetime import timedelta

import pytest

from ostinato.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("given", "seconds"),
    [("250ms", 0.25), ("2s", 2.0), ("5m", 300.0), ("1h", 3600.0), ("1.5s", 1.5), (" 3 s ", 3.0),
     ("1d", 86400.0), ("1m30s", 90.0), ("1h15m", 4500.0), ("1h 15m 30s", 4530.0),
     ("2s500ms", 2.5), (7, 7.0), (0.5, 0.5), (0, 0.0), (timedelta(minutes=2), 120.0), ("0ms", 0.0)],
)
def test_accepted_forms(given: object, seconds: float) -> None:
    """Strings with units, plain numbers of seconds and timedeltas all convert."""
    assert parse_duration(given) == pytest.approx(seconds)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "words"),
    [("2x", "unknown unit 'x'"), ("fast", "not a duration"), ("-1s", "not a duration"),
     (-3, "negative"), (float("nan"), "finite"), (float("inf"), "finite"), (True, "not True"),
     ([1], "not list"), ("5", "no unit; write '5s' for seconds"), ("30", "'30s'"),
     ("30s1m", "largest unit first"), ("1m1m", "largest unit first"), ("", "empty"),
     ("1m30", "unknown unit '(none)'"), ("1m 30x", "unknown unit 'x'")],
)
def test_refusals_say_what_is_wrong(given: object, words: str) -> None:
    """Each bad duration is refused with a message naming the problem."""
    with pytest.raises(ValueError, match="every") as info:
        parse_duration(given, what="every")  # type: ignore[arg-type]
    assert words in str(info.value)


def test_format_for_people() -> None:
    """Durations print in the unit a person would pick."""
    assert format_duration(0.0000042) == "4µs"
    assert format_duration(0.0042) == "4.2ms"
    assert format_duration(2.5) == "2.5s"
    assert format_duration(90) == "1m30s"
    assert format_duration(7260) == "2h01m"
