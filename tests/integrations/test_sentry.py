"""Sentry: pass errors with their tags, the runner's own errors, throttled cron check-ins."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sentry_sdk
from sentry_sdk.envelope import Envelope
from sentry_sdk.integrations.dedupe import DedupeIntegration
from sentry_sdk.transport import Transport

import ostinato
from ostinato.loop import Pass, declare
from ostinato.sentry import OstinatoIntegration, Throttle, monitor_config, monitor_slug
from tests.runner.test_runner import until

HOLDER = f"{socket.gethostname()}:{os.getpid()}"


class Recorder(Transport):
    """Keeps what would be sent to Sentry: events and check-ins, as dicts."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.lock = threading.Lock()
        self.items: list[tuple[str, dict[str, Any]]] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        with self.lock:
            for item in envelope.items:
                if item.type in ("event", "check_in") and item.payload.json is not None:
                    self.items.append((item.type, item.payload.json))

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self.lock:
            return [payload for type_, payload in self.items if type_ == kind]


@pytest.fixture
def sentry() -> Iterator[Recorder]:
    recorder = Recorder()
    # Without Sentry's own de-duplication, so that a failed pass reported twice would show.
    sentry_sdk.init(dsn="https://key@sentry.invalid/1", transport=recorder,
                    integrations=[OstinatoIntegration()], disabled_integrations=[DedupeIntegration()])
    try:
        yield recorder
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.get_global_scope().set_client(None)


def new_app() -> ostinato.App:
    return ostinato.App(f"s{uuid.uuid4().hex[:8]}", coordinator=f"memory://{uuid.uuid4().hex}",
                        grace="2s")


async def test_an_exception_in_a_pass_is_reported_once_with_loop_fence_pass_and_holder(
    sentry: Recorder,
) -> None:
    """A failed pass is one Sentry event carrying the loop, fence, pass number and holder."""
    app = new_app()

    @app.loop(pause="1ms", error_backoff=("1ms", "2ms"))
    def flaky(ctx: Pass) -> None:
        if ctx.number == 2:
            raise ValueError("pass two fails")
        sentry_sdk.add_breadcrumb(message=f"pass {ctx.number}")

    async with app.running():
        await until(lambda: app._runner is not None and app._runner.keepers[
            f"{app.name}:flaky"].stats.passes >= 4)
    errors = [e for e in sentry.of("event") if e.get("exception")]
    assert len(errors) == 1, [e.get("logger") for e in errors]
    event = errors[0]
    assert event["exception"]["values"][-1]["type"] == "ValueError"
    assert event["tags"]["ostinato.loop"] == f"{app.name}:flaky"
    assert event["tags"]["ostinato.pass"] == 2
    assert event["tags"]["ostinato.fence"] == 1
    assert event["tags"]["ostinato.holder"] == HOLDER


async def test_the_runners_own_errors_carry_the_loop_tag(sentry: Recorder) -> None:
    """An async pass over its timeout is the runner's ERROR line: reported, tagged with the loop."""
    app = new_app()

    @app.loop(pause="1ms", timeout="50ms", error_backoff=("1ms", "2ms"))
    async def slow(ctx: Pass) -> None:
        await asyncio.sleep(10)

    async with app.running():
        await until(lambda: any("timeout" in str(e.get("logentry", {})) for e in sentry.of("event")))
    event = next(e for e in sentry.of("event") if "timeout" in str(e.get("logentry", {})))
    assert event["level"] == "error"
    assert event["logger"] == "ostinato.loop"
    assert event["tags"]["ostinato.loop"] == f"{app.name}:slow"
    assert event["tags"]["ostinato.event"] == "pass_timed_out"
    assert event["tags"]["ostinato.holder"] == HOLDER


async def test_a_fast_loop_sends_one_check_in_pair_a_minute_and_a_failure_at_once(
    sentry: Recorder,
) -> None:
    """Hundreds of passes send one in_progress/ok pair; the first failure after it is sent at once."""
    app = new_app()
    fail = threading.Event()

    @app.loop(timeout="2m", stall_after="5m")
    def fast(ctx: Pass) -> None:
        if fail.is_set():
            raise RuntimeError("broken now")

    key = f"{app.name}:fast"
    async with app.running():
        await until(lambda: app._runner is not None and app._runner.keepers[key].stats.passes >= 500)
        assert [c["status"] for c in sentry.of("check_in")] == ["in_progress", "ok"]
        failed_at = time.monotonic()
        fail.set()
        await until(lambda: len(sentry.of("check_in")) >= 3)
        assert time.monotonic() - failed_at < 2.0
        await until(lambda: app._runner is not None and app._runner.keepers[key].stats.errors >= 3)
    checkins = sentry.of("check_in")
    assert [c["status"] for c in checkins] == ["in_progress", "ok", "error"]
    assert {c["monitor_slug"] for c in checkins} == {monitor_slug(key)}
    assert checkins[1]["check_in_id"] == checkins[0]["check_in_id"]
    assert checkins[0]["monitor_config"] == {
        "schedule": {"type": "interval", "value": 1, "unit": "minute"},
        "checkin_margin": 5, "max_runtime": 2, "failure_issue_threshold": 3,
    }


def test_the_throttle_sends_a_pair_a_minute_and_the_first_failure_after_an_ok_at_once() -> None:
    """Given times: one pair a minute, a failure after an ok at once, then a minute's quiet."""
    throttle = Throttle(60.0)
    assert throttle.starts(0.0)
    assert throttle.ended(0.1, reported=True, failed=False) == "ok"
    assert not throttle.starts(1.0)
    assert throttle.ended(1.1, reported=False, failed=False) is None
    assert not throttle.starts(2.0)
    assert throttle.ended(2.1, reported=False, failed=True) == "error"  # at once
    assert not throttle.starts(3.0)
    assert throttle.ended(3.1, reported=False, failed=True) is None  # still failing: quiet
    assert not throttle.starts(61.0)  # a minute after the error, not after the ok
    assert throttle.starts(62.2)
    assert throttle.ended(62.3, reported=True, failed=True) == "error"
    assert throttle.starts(122.3)
    assert throttle.ended(122.4, reported=True, failed=False) == "ok"


def test_monitor_config_follows_the_schedule() -> None:
    """cron= in its zone (no seconds field), every= in whole minutes, margins from the loop."""
    nightly = declare(lambda ctx: None, name="n", cron="30 2 * * *", timezone="Europe/Berlin",
                      timeout="90s")
    assert monitor_config(nightly) == {
        "schedule": {"type": "crontab", "value": "30 2 * * *"}, "timezone": "Europe/Berlin",
        "checkin_margin": 3, "max_runtime": 2, "failure_issue_threshold": 3,
    }
    seconds = declare(lambda ctx: None, name="s", cron="*/5 * * * * 15")
    assert monitor_config(seconds)["schedule"] == {"type": "crontab", "value": "*/5 * * * *"}
    assert monitor_config(seconds)["timezone"] == "UTC"
    slow = declare(lambda ctx: None, name="e", every="90s", fail_after=5, stall_after="10m")
    assert monitor_config(slow) == {
        "schedule": {"type": "interval", "value": 2, "unit": "minute"},
        "checkin_margin": 10, "max_runtime": 10, "failure_issue_threshold": 5,
    }


def test_monitor_slugs_are_what_sentry_accepts() -> None:
    """Lower case, letters, digits, '-' and '_', at most 50 characters, long names kept apart."""
    assert monitor_slug("Billing:sync[ACME Corp]") == "billing-sync-acme-corp"
    long_a, long_b = "app:" + "x" * 80 + "a", "app:" + "x" * 80 + "b"
    assert len(monitor_slug(long_a)) == 50
    assert monitor_slug(long_a) != monitor_slug(long_b)


def test_bad_checkin_every_is_refused() -> None:
    """A throttle period that is not a positive number is one clear error."""
    with pytest.raises(ValueError, match="checkin_every must be a number of seconds > 0"):
        OstinatoIntegration(checkin_every=0)
