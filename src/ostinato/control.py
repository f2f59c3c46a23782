"""What the CLI's status, pause, resume and wake do, as library functions."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ostinato.coordinators import Coordinator, Event, LoopRecord, RunnerRecord
from ostinato.durations import format_duration
from ostinato.errors import ConfigurationError, UnknownLoopError
from ostinato.families import Count, keys_setting, partitions_setting, read_keys, refreshed_keys
from ostinato.loop import family_of

#: How long ``ostinato keys --refresh`` waits for a runner to read the key source.
REFRESH_WITHIN = 30.0


async def resolve(coordinator: Coordinator, name: str) -> str:
    """The key of loop ``name`` (``loop`` or ``app:loop``, or one partition or key of a
    loop: ``loop#3``, ``loop[acme]``); error if unknown or ambiguous."""
    return (await _lookup(coordinator, name))[0]


async def targets(coordinator: Coordinator, name: str) -> tuple[str, list[str]]:
    """What ``name`` names, and the keys of the leases it covers: one loop, one partition or
    key of a loop (``loop#3``, ``loop[acme]``), or a whole loop made of partitions or keys
    (``loop``: every listed member, and for ``keys=`` the loop that refreshes them)."""
    key, records = await _lookup(coordinator, name)
    if family_of(key) != key:
        return key, [key]
    shown = {r.key for r in await listed(coordinator, records)}
    members = sorted(k for k in shown if family_of(k) == key and k != key)
    if not members:
        return key, [key]
    return key, ([key] if key in shown else []) + members


async def _lookup(coordinator: Coordinator, name: str) -> tuple[str, list[LoopRecord]]:
    records = await coordinator.loops()
    keys = {r.key for r in records}
    families = {family_of(k) for k in keys}
    if name in keys or name in families:
        return name, records
    matches = sorted({k for k in keys | families if k.partition(":")[2] == name})
    if len(matches) == 1:
        return matches[0], records
    if not matches:
        known = ", ".join(sorted(families)) or "(none yet: start a runner first)"
        raise UnknownLoopError(f"no loop named {name!r} in {coordinator.display_url}; known: {known}")
    raise UnknownLoopError(
        f"{name!r} names loops of several apps ({', '.join(matches)}); write APP:LOOP"
    )


async def listed(coordinator: Coordinator, records: list[LoopRecord]) -> list[LoopRecord]:
    """``records`` without the members a loop no longer has: keys gone from its key list and
    partitions beyond the count in force (their rows stay until their holders let go)."""
    families = {family_of(r.key) for r in records if family_of(r.key) != r.key}
    if not families:
        return records
    allowed: dict[str, set[str] | None] = {}
    for family in families:
        keys, count = await asyncio.gather(
            coordinator.read_setting(keys_setting(family)),
            coordinator.read_setting(partitions_setting(family)),
        )
        if keys is not None:
            allowed[family] = {f"{family}[{key}]" for key in read_keys(keys.value)}
        elif (force := Count.parse(count.value if count else None)) is not None:
            allowed[family] = {f"{family}#{i}" for i in range(force.partitions)}
        else:
            allowed[family] = None
    out = []
    for record in records:
        family = family_of(record.key)
        members = allowed.get(family)
        if family == record.key or members is None or record.key in members:
            out.append(record)
    return out


def _label(key: str, keys: list[str]) -> str:
    return key if keys == [key] else f"{key} ({len(keys)} leases)"


async def pause(coordinator: Coordinator, name: str, *, resolved: bool = False) -> str:
    """Pause loop ``name``, or every member of it (``resolved``: ``name`` is already its
    ``app:loop`` key); return what was paused."""
    key, keys = await targets(coordinator, name) if not resolved else (name, [name])
    for each in keys:
        await coordinator.set_paused(each, True)
        await coordinator.publish(Event("paused", each))
    return _label(key, keys)


async def resume(coordinator: Coordinator, name: str, *, resolved: bool = False) -> str:
    key, keys = await targets(coordinator, name) if not resolved else (name, [name])
    for each in keys:
        await coordinator.set_paused(each, False)
        await coordinator.publish(Event("resumed", each))
    return _label(key, keys)


async def release(
    coordinator: Coordinator, name: str, *, resolved: bool = False
) -> tuple[str, int | None]:
    """Revoke the lease of ``name`` so another runner takes it at once, with a new fence
    (of every member, for a loop made of members: then the fence returned is ``None``)."""
    key, keys = await targets(coordinator, name) if not resolved else (name, [name])
    fences = []
    for each in keys:
        fences.append(await coordinator.revoke(each))
        await coordinator.publish(Event("revoked", each))
    return _label(key, keys), fences[0] if keys == [key] else None


async def wake(coordinator: Coordinator, name: str) -> str:
    key, keys = await targets(coordinator, name)
    for each in keys:
        await coordinator.publish(Event("wake", each))
    return _label(key, keys)


async def keys(coordinator: Coordinator, name: str, *, refresh: bool = False) -> tuple[str, list[str]]:
    """The ``keys=`` loop ``name`` names and its keys (``refresh``: read anew by its runner)."""
    setting = await coordinator.read_setting(keys_setting(name))
    family = name
    if setting is None:
        family, _ = await _lookup(coordinator, name)
        family = family_of(family)
        setting = await coordinator.read_setting(keys_setting(family))
        if setting is None:
            raise UnknownLoopError(f"{family} is not a loop declared with keys=, or no runner has "
                                   "read its key source yet")
    if refresh:
        return family, await refreshed_keys(coordinator, family, REFRESH_WITHIN)
    return family, read_keys(setting.value)


def describe(record: LoopRecord, wall_now: float) -> dict[str, Any]:
    """One loop's status as plain data (the ``--json`` form). A partition or key of a loop
    names that loop in ``family`` (``app:loop``) and itself in ``member`` (``#3``,
    ``[acme]``); ``member`` is ``None`` for any other loop."""
    family = family_of(record.key)
    return {
        "app": record.app,
        "loop": record.name,
        "family": family,
        "member": record.key[len(family):] or None,
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
    records = await listed(coordinator, await coordinator.loops())
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
    if any(r.hosts is not None and r.can_run(key) for r in runners):
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
        key, records = await _lookup(coordinator, name)
        keys = [key] if family_of(key) != key else sorted(
            r.key for r in records if family_of(r.key) == key
        ) or [key]
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


#: The order a loop's members are summed up in, most urgent first.
_STATE_ORDER = ("failing", "stalled", "no runner", "paused", "running", "idle")


def group(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any] | None, list[dict[str, Any]]]]:
    """Rows in status order, each loop made of partitions or keys as one entry: (the loop's
    own row, if it has one, and its members); any other loop is (its row, [])."""
    out: list[tuple[dict[str, Any] | None, list[dict[str, Any]]]] = []
    at: dict[str, int] = {}
    for row in rows:
        family = row.get("family") or f"{row['app']}:{row['loop']}"
        if family in at:
            _, members = out[at[family]]
            if row.get("member"):
                members.append(row)
            else:
                out[at[family]] = (row, members)
            continue
        at[family] = len(out)
        out.append((None, [row]) if row.get("member") else (row, []))
    return out


def _summary(own: dict[str, Any] | None, members: list[dict[str, Any]], now: float) -> tuple[str, ...]:
    """One line for a loop made of members: their states counted, their numbers summed."""
    first = members[0]
    kind = "partitions" if first["member"].startswith("#") else "keys"
    states: dict[str, int] = {}
    for row in members:
        states[row["state"]] = states.get(row["state"], 0) + 1
    state = ", ".join(f"{states[s]} {s}" for s in _STATE_ORDER if s in states)
    if own is not None and own["state"] in ("failing", "stalled"):
        state = f"key source {own['state']}; {state}"
    holders = {row["holder"] for row in members if row["holder"]}
    holder = next(iter(holders)) if len(holders) == 1 else f"{len(holders)} runners"

    def latest(field: str) -> float | None:
        return max((row[field] for row in members if row[field] is not None), default=None)

    starts = [row["next_start"] for row in members
              if row.get("next_start") is not None and row["state"] not in ("paused", "no runner")]
    soonest = min(starts, default=None)
    next_row = {"state": "running", "next_start": soonest,
                "next_start_iso": _local_iso(soonest, first.get("zone"))}
    return (
        f"{first['family']} ({len(members)} {kind})", state, holder, "-",
        str(sum(row["passes"] for row in members)), str(sum(row["errors"] for row in members)),
        _ago(latest("last_start"), now), _ago(latest("last_end"), now), "-",
        _secs(latest("p50")), _secs(latest("p99")), _next(next_row, now),
    )


def _line(r: dict[str, Any], now: float, indent: str = "") -> tuple[str, ...]:
    name = f"{indent}{r['member']}" if indent else f"{r['app']}:{r['loop']}"
    return (
        name, r["state"], r["holder"] or "-", str(r["fence"]),
        str(r["passes"]), str(r["errors"]), _ago(r["last_start"], now),
        _ago(r["last_end"], now), _secs(r["last_duration"]), _secs(r["p50"]),
        _secs(r["p99"]), _next(r, now),
    )


def table(rows: list[dict[str, Any]], *, expand: bool = False) -> str:
    """Status as a table for people: a loop made of partitions or keys is one line (its
    members counted by state), or that line and one per member with ``expand``."""
    if not rows:
        return "no loops yet: start a runner with  ostinato run APP"
    now = time.time()
    head = ("LOOP", "STATE", "HOLDER", "FENCE", "PASSES", "ERRORS", "LAST START", "LAST END",
            "LAST", "P50", "P99", "NEXT")
    lines: list[tuple[str, ...]] = [head]
    for own, members in group(rows):
        if not members:
            assert own is not None
            lines.append(_line(own, now))
            continue
        lines.append(_summary(own, members, now))
        if expand:
            if own is not None:
                lines.append(_line({**own, "member": "(key source)"}, now, indent="  "))
            lines.extend(_line(row, now, indent="  ") for row in members)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
