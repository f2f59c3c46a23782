"""What passes did, and the checks every multi-runner test makes on it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass


@dataclass(frozen=True)
class PassRecord:
    """One pass as its body recorded it (times on the host's monotonic clock, in seconds)."""

    pid: int
    fence: int
    start: float
    end: float | None  # None: the pass never finished (its process died in it)


def overlaps(records: list[PassRecord], *, unfinished_end: dict[int, float] | None = None
             ) -> list[tuple[PassRecord, PassRecord]]:
    """Pairs of passes that ran at the same time.

    A pass that never finished is taken to have run until ``unfinished_end[pid]``
    (when its process was killed), or forever.
    """
    ends = unfinished_end or {}

    def end(r: PassRecord) -> float:
        return r.end if r.end is not None else ends.get(r.pid, float("inf"))

    ordered = sorted(records, key=lambda r: r.start)
    found = []
    latest: PassRecord | None = None
    for record in ordered:
        if latest is not None and record.start < end(latest):
            found.append((latest, record))
        if latest is None or end(record) > end(latest):
            latest = record
    return found


def fences_only_grow(records: list[PassRecord]) -> bool:
    """In start order, fences never go down, and each holder change brings a greater fence."""
    ordered = sorted(records, key=lambda r: r.start)
    for before, after in itertools.pairwise(ordered):
        if after.fence < before.fence:
            return False
        if after.pid != before.pid and after.fence == before.fence:
            return False
    return True
