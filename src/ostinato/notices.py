"""The notice of a loop going into trouble or out of it, as stall hooks and alerts get it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Stall:
    """A loop in trouble, or out of it (``recovered``).

    ``reason`` is ``"stalled"`` (its holder has finished no pass for ``stalled_for``
    seconds) or ``"failing"`` (its last ``failed_passes`` passes all failed, for
    ``stalled_for`` seconds since the first of them ended).
    """

    loop: str
    holder: str
    fence: int
    last_pass_end: float | None
    stalled_for: float
    recovered: bool = False
    reason: str = "stalled"
    failed_passes: int = 0
    last_error: str | None = None


StallHook = Callable[[Stall], object]
