"""One converter for every duration a user writes: ``"250ms"``, ``"1m30s"``, ``5``, ``timedelta``."""

from __future__ import annotations

import math
import re
from datetime import timedelta

Duration = str | int | float | timedelta

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*")
_NUMBER = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*$")


def parse_duration(value: Duration, *, what: str = "duration") -> float:
    """Return ``value`` in seconds, or raise ``ValueError`` saying what is wrong with it.

    ``what`` names the value in the message. Zero is allowed; negative, infinite
    and NaN durations are not.
    """
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a duration such as '250ms' or '2s', not {value!r}")
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_text(value, what)
    else:
        raise ValueError(
            f"{what} must be a string like '2s', a number of seconds or a timedelta, "
            f"not {type(value).__name__}"
        )
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"{what} {value!r} must be a finite number of seconds")
    if seconds < 0:
        raise ValueError(f"{what} {value!r} is negative; durations must be zero or more")
    return seconds


def _parse_text(value: str, what: str) -> float:
    """Seconds in ``"250ms"``, ``"2s"`` or a compound such as ``"1h15m"``, largest unit first."""
    text = value.lower()
    if _NUMBER.match(text):
        number = text.strip()
        raise ValueError(
            f"{what} {value!r} has no unit; write {number + 's'!r} for seconds "
            f"(or {number + 'ms'!r}, {number + 'm'!r}, {number + 'h'!r}), or pass the number itself"
        )
    seconds, at, previous = 0.0, 0, float("inf")
    while at < len(text):
        match = _PART.match(text, at)
        if match is None or match.end() == at:
            raise ValueError(
                f"{what} {value!r} is not a duration; write it like '250ms', '2s', '1m30s' or '1h'"
            )
        number, unit = match.groups()
        if unit not in _UNITS:
            raise ValueError(
                f"{what} {value!r} has an unknown unit {unit or '(none)'!r}; "
                f"use one of {', '.join(_UNITS)}"
            )
        if _UNITS[unit] >= previous:
            raise ValueError(
                f"{what} {value!r} repeats a unit or puts a smaller one first; "
                "write the largest unit first, once each, like '1h15m' or '1m30s'"
            )
        previous = _UNITS[unit]
        seconds += float(number) * _UNITS[unit]
        at = match.end()
    if at == 0:
        raise ValueError(f"{what} {value!r} is empty; write it like '250ms', '2s' or '1h'")
    return seconds


def format_duration(seconds: float) -> str:
    """Render seconds for people: ``0.0042`` -> ``"4.2ms"``, ``90`` -> ``"1m30s"``."""
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f}µs"
    if seconds < 1:
        return f"{seconds * 1000:.3g}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
