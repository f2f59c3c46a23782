"""What the CLI's status, pause, resume and wake do, as library functions."""

from __future__ import annotations

import contextlib
import time
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ostinato.coordinators import Coordinator, Event, LoopRecord, RunnerRecord
from ostinato.durations import format_duration
from ostinato.errors import ConfigurationError, UnknownLoopError


async def resolve(coordinator: Coordinator, name: str) -> str:
    """The key of loop ``name`` (``loop`` or ``app:loop``); error if unknown or ambiguous."""
    records = await coordinator.loops()
    keys = [r.key for r in records]
    if name in keys:
        return name
    matches = [r.key for r in records if r.name == name]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        known = ", ".join(keys) or "(none yet: start a runner first)"
        raise UnknownLoopError(f"no loop named {name!r} in {coordinator.display_url}; known: {known}")
    raise UnknownLoopError(
        f"{name!r} names loops of several apps ({', '.join(matches)}); write APP:LOOP"
    )


async def pause(coordinator: Coordinator, name: str, *, resolved: bool = False) -> str:
    """Pause loop ``name`` (``resolved``: ``name`` is already its ``app:loop`` key)."""
    key = name if resolved else await resolve(coordinator, name)
    await coordinator.set_paused(key, True)
    await coordinator.publish(Event("paused", key))
    return key


async def resume(coordinator: Coordinator, name: str, *, resolved: bool = False) -> str:
    key = name if resolved else await resolve(coordinator, name)
    await coordinator.set_paused(key, False)
    await coordinator.publish(Event("resumed", key))
    return key


async def release(
    coordinator: Coordinator, name: str, *, resolved: bool = False
) -> tuple[str, int | None]:
    """Revoke the lease of ``name`` so another runner takes it at once, with a new fence."""
    key = name if resolved else await resolve(coordinator, name)
    fence = await coordinator.revoke(key)
    await coordinator.publish(Event("revoked", key))
    return key, fence


async def wake(coordinator: Coordinator, name: str) -> str:
    key = await resolve(coordinator, name)
    await coordinator.publish(Event("wake", key))
    return key


def describe(record: LoopRecord, wall_now: float) -> dict[str, Any]:
    """One loop's status as plain data (the ``--json`` form)."""
    return {
        "app": record.app,
        "loop": record.name,
        "state": record.state(wall_now),
        "holder": record.holder,
        "fence": record.fence,
        "passes": record.passes,
        "errors": record.errors,
        "last_start": record.last_start,
        "last_end": record.last_end,
        "last_duration": record.last_duration,
        "last_error": record.last_error,
        "last_error_at": record.last_error_at,
        "p50": record.p50,
        "p99": record.p99,
        "stall_after": record.stall_after,
        "fail_streak": record.fail_streak,
        "fail_after": record.fail_after,
        "next_start": record.next_start,
        "next_start_iso": _local_iso(record.next_start, record.zone),
        "zone": record.zone,
    }


def _local_iso(wall: float | None, zone: str | None) -> str | None:
    """``wall`` as ISO 8601 in ``zone`` (UTC when none, or when the zone is unknown here)."""
    if wall is None:
        return None
    tz: tzinfo = UTC
    if zone:
        with contextlib.suppress(ZoneInfoNotFoundError, ValueError):
            tz = ZoneInfo(zone)
    return datetime.fromtimestamp(wall, tz).isoformat(timespec="seconds")


async def status(coordinator: Coordinator) -> list[dict[str, Any]]:
    """Every loop's status row; ``declared``: whether a live runner hosts it (``None``:
    a runner too old to say is alive), ``last_seen``: the last time it was held or ran."""
    now = time.time()
    records = await coordinator.loops()
    runners = await coordinator.runners()
    rows = []
    for record in records:
        row = describe(record, now)
        row["declared"] = _declared(record.key, runners)
        seen = [t for t in (record.last_end, record.last_start, record.running_since) if t]
        row["last_seen"] = now if record.holder is not None else max(seen, default=None)
        rows.append(row)
    return rows


def _declared(key: str, runners: list[RunnerRecord]) -> bool | None:
    """Whether a live runner hosts ``key``; ``None`` when one that does not say might."""
    if any(r.hosts is not None and key in r.hosts for r in runners):
        return True
    if any(r.hosts is None for r in runners):
        return None
    return False


async def forget(coordinator: Coordinator, name: str) -> list[str]:
    """Forget loop ``name``, or every loop of an app with ``app:*``; return their keys.

    Refused, with nothing forgotten, while any of them is held: stop its runners (or
    drop the loop from their app) first.
    """
    if name.endswith(":*"):
        app = name[:-2]
        keys = [r.key for r in await coordinator.loops() if r.app == app]
        if not keys:
            raise UnknownLoopError(f"no loops of app {app!r} in {coordinator.display_url}")
    else:
        keys = [await resolve(coordinator, name)]
    held = {r.key: r.holder for r in await coordinator.loops() if r.key in keys and r.holder}
    if held:
        raise ConfigurationError(
            "cannot forget a loop a runner holds: "
            + ", ".join(f"{key} (held by {holder})" for key, holder in sorted(held.items()))
            + "; stop its runners, or remove the loop from their app and redeploy, then forget it"
        )
    refused = [key for key in keys if not await coordinator.forget(key)]
    if refused:
        raise ConfigurationError(
            f"{', '.join(refused)} was taken by a runner meanwhile; stop its runners first"
        )
    return keys


def _ago(wall: float | None, now: float) -> str:
    return "-" if wall is None else f"{format_duration(max(0.0, now - wall))} ago"


def _secs(value: float | None) -> str:
    return "-" if value is None else format_duration(value)


def _next(row: dict[str, Any], now: float) -> str:
    """When the next pass is planned: ``in 4.2s``, and past a minute the local time too."""
    wall = row.get("next_start")
    if wall is None or row["state"] in ("paused", "no runner"):
        return "-"
    wait = wall - now
    if wait <= 0:
        return "due"
    if wait < 60 or not row.get("next_start_iso"):
        return f"in {format_duration(wait)}"
    local = datetime.fromisoformat(row["next_start_iso"])
    return f"in {format_duration(wait)} ({local.strftime('%a %H:%M %Z')})"


def table(rows: list[dict[str, Any]]) -> str:
    """Status as a table for people."""
    if not rows:
        return "no loops yet: start a runner with  ostinato run APP"
    now = time.time()
    head = ("LOOP", "STATE", "HOLDER", "FENCE", "PASSES", "ERRORS", "LAST START", "LAST END",
            "LAST", "P50", "P99", "NEXT")
    lines = [head]
    for r in rows:
        lines.append((
            f"{r['app']}:{r['loop']}", r["state"], r["holder"] or "-", str(r["fence"]),
            str(r["passes"]), str(r["errors"]), _ago(r["last_start"], now),
            _ago(r["last_end"], now), _secs(r["last_duration"]), _secs(r["p50"]),
            _secs(r["p99"]), _next(r, now),
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
