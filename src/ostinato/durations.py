"""One converter for every duration a user writes: ``"250ms"``, ``"2s"``, ``5``, ``timedelta``."""

from __future__ import annotations

import math
import re
from datetime import timedelta

Duration = str | int | float | timedelta

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$")


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
        match = _PATTERN.match(value.lower())
        if match is None:
            raise ValueError(
                f"{what} {value!r} is not a duration; write it like '250ms', '2s', '5m' or '1h'"
            )
        number, unit = match.groups()
        if unit not in _UNITS:
            raise ValueError(
                f"{what} {value!r} has an unknown unit {unit or '(none)'!r}; "
                f"use one of {', '.join(_UNITS)}"
            )
        seconds = float(number) * _UNITS[unit]
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
