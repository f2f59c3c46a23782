"""``ostinato dashboard``: the page in a real headless Chromium, its JSON API, and its history."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from ostinato.coordinators import LoopRecord
from ostinato.dashboard import Board, History
from ostinato.operate import run_sync
from tests.observe.conftest import Scripted, Stack, get, served, wait_for

LOOPS = ("obs:tick", "obs:flaky", "obs:blocker")
TOKEN = "s3cret-token"  # noqa: S105 - a token made up for the test


def record(passes: int, errors: int = 0, duration: float | None = 0.01) -> LoopRecord:
    return LoopRecord("a:b", fence=1, paused=False, holder="h:1", held_since=0.0, passes=passes,
                      errors=errors, last_duration=duration)


def test_history_gives_rates_over_the_last_minute_and_chart_points_over_the_hour() -> None:
    """Passes per minute and the error rate come from sample deltas; old samples leave the charts."""
    history = History(every=2.0)
    assert history.rates("a:b") == (None, None)
    for i in range(0, 7200, 2):  # two hours of samples, 10 passes and 1 error every 2 s
        history.add(1000.0 + i, [record(passes=5 * i, errors=i // 2)])
    per_minute, error_rate = history.rates("a:b")
    assert per_minute == pytest.approx(300.0)
    assert error_rate == pytest.approx(0.1)
    now = 1000.0 + 7198
    series = history.series("a:b", now)
    assert max(point["ago"] for point in series) <= 3600  # only the last hour is drawn
    assert len(series) in (180, 181)  # one point per 20-second slot (the oldest may be partial)
    assert all(point["per_minute"] == pytest.approx(300.0) for point in series)
    assert all(point["duration"] == pytest.approx(0.01) for point in series)


def test_history_survives_counters_that_restart() -> None:
    """A loop whose counts went down (a new coordinator) never shows negative rates."""
    history = History(every=1.0)
    history.add(0.0, [record(passes=100)])
    history.add(10.0, [record(passes=3, duration=None)])
    history.add(70.0, [record(passes=3, duration=None)])
    assert history.rates("a:b") == (0.0, None)
    assert all((p["per_minute"] or 0) >= 0 for p in history.series("a:b", 70.0))


def test_a_once_a_minute_loop_has_no_rate_until_a_minute_was_watched() -> None:
    """One cron pass seen 22 s into watching is not 2.7 a minute: no rate until a full minute
    was watched, then about one a minute; a fast loop's rate shows within seconds."""
    history = History(every=2.0)
    for t in range(0, 58, 2):  # the cron loop ran once, 10 s after the dashboard started
        history.add(float(t), [record(passes=1 if t >= 10 else 0)])
        assert history.rates("a:b")[0] is None, t
    for t in range(58, 300, 2):  # and once a minute since
        history.add(float(t), [record(passes=1 + (t - 10) // 60)])
        assert history.rates("a:b")[0] == pytest.approx(1.0, abs=0.05), t

    fast = History(every=2.0)
    for t in range(0, 8, 2):
        fast.add(float(t), [record(passes=20 * t)])
    assert fast.rates("a:b")[0] == pytest.approx(1200.0)


@pytest.mark.parametrize("passes_at", [
    lambda t: 20 * t,  # a fast loop
    lambda t: 1 + (t - 10) // 60 if t >= 10 else 0,  # a cron loop
    lambda t: int(t**1.5) % 97 + t,  # an irregular one
])
def test_the_rate_chart_ends_on_the_rate_in_the_table(passes_at: Any) -> None:
    """At every moment, the rate chart's latest point is the passes per minute of the table."""
    history = History(every=2.0)
    for t in range(0, 400, 2):
        history.add(float(t), [record(passes=passes_at(t))])
        series = history.series("a:b", float(t))
        assert series[-1]["ago"] == 0
        assert series[-1]["per_minute"] == history.rates("a:b")[0], t


@pytest.mark.slow
def test_the_api_needs_the_token_for_every_action(stack: Stack) -> None:
    """Without --token actions are refused (403); with it, only the right bearer token works."""
    stack.runner()
    wait_for(lambda: stack.reported(*LOOPS), what="reports of every loop")
    _, readonly = stack.dashboard()
    status, body = get(f"{readonly}/api/loops/obs:tick/pause", method="POST",
                       headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 403, body
    assert json.loads(get(f"{readonly}/api/loops")[1])["control"] is False

    dashboard, base = stack.dashboard("--token", TOKEN)
    assert get(f"{base}/api/loops/obs:tick/pause", method="POST")[0] == 401
    assert get(f"{base}/api/loops/obs:tick/pause", method="POST",
               headers={"Authorization": "Bearer wrong"})[0] == 401
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert get(f"{base}/api/loops/obs:nosuch/pause", method="POST", headers=good)[0] == 404
    assert get(f"{base}/api/loops/obs:tick/explode", method="POST", headers=good)[0] == 404
    status, body = get(f"{base}/api/loops/tick/pause", method="POST", headers=good)
    assert status == 200, body
    assert json.loads(body) == {"ok": True, "action": "pause", "loop": "obs:tick"}
    assert stack.status()["obs:tick"]["state"] == "paused"
    status, body = get(f"{base}/api/loops/obs:tick/release", method="POST", headers=good)
    assert status == 200, body
    assert json.loads(body)["fence"] is None  # a paused loop holds no lease
    assert get(f"{base}/api/loops/obs:tick/resume", method="POST", headers=good)[0] == 200
    wait_for(lambda: stack.status()["obs:tick"]["state"] == "running", what="the resume")

    page_status, page = get(f"{base}/")
    assert page_status == 200
    assert '<script src="static/dashboard.js"' in page
    assert get(f"{base}/static/dashboard.js")[0] == 200
    assert dashboard.stop() == 0  # SIGTERM: a clean exit


@pytest.mark.slow
@pytest.mark.browser
def test_the_page_shows_live_loops_and_charts_and_pauses_a_loop(stack: Stack, browser: Any) -> None:
    """In Chromium: rows and charts of live loops update by themselves; pause and resume work."""
    from playwright.sync_api import expect

    stack.runner()
    wait_for(lambda: stack.reported(*LOOPS), what="reports of every loop")
    _, base = stack.dashboard("--token", TOKEN, "--sample-every", "250ms")
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(f"{base}/")
        tick = page.locator('tr[data-key="obs:tick"]')
        flaky = page.locator('tr[data-key="obs:flaky"]')
        expect(page.locator("tbody tr")).to_have_count(3, timeout=10_000)
        expect(tick.locator("td.state")).to_have_text("running")
        row = stack.status()["obs:tick"]
        expect(tick.locator("td.holder")).to_have_text(row["holder"])
        expect(tick.locator("td.fence")).to_have_text(str(row["fence"]))
        expect(flaky.locator("td.error")).to_contain_text("RuntimeError: flaky pass")
        expect(page.locator("#coordinator")).to_have_text(stack.url)

        # The charts fill in without a reload: a polyline with two points or more, per chart.
        chart = 'tr[data-key="obs:tick"] svg.chart-{}'
        for kind in ("rate", "duration"):
            page.wait_for_function(
                "sel => Number(document.querySelector(sel)?.dataset.points) >= 2",
                arg=chart.format(kind), timeout=15_000,
            )
            points = page.locator(f"{chart.format(kind)} polyline").get_attribute("points")
            assert points is not None
            assert len(points.split()) >= 2
        # Rates show once the dashboard has watched for a few seconds.
        expect(tick.locator("td.per_minute")).not_to_have_text("\u2014", timeout=15_000)
        per_minute = float(tick.locator("td.per_minute").inner_text())
        assert 300 < per_minute < 1500  # every="50ms": about 1200 a minute
        assert tick.locator("td.latency .p50").inner_text().endswith("ms")
        expect(flaky.locator("td.error_rate")).not_to_have_text("\u2014")
        rate = flaky.locator("td.error_rate").inner_text()
        assert rate.endswith("%")
        assert 10 < float(rate.rstrip("%")) < 60  # a third of flaky's passes fail

        # Buttons need the token.
        pause = tick.locator('button[data-action="pause"]')
        expect(page.locator("#mode")).to_have_text("controls need the token")
        expect(pause).to_be_disabled()
        page.fill("#token", TOKEN)
        page.click("#auth button[type=submit]")
        expect(page.locator("#mode")).to_have_text("controls on")
        expect(pause).to_be_enabled()
        pause.click()
        expect(tick).to_have_attribute("data-state", "paused", timeout=10_000)
        expect(tick.locator("td.state")).to_have_text("paused")
        assert stack.status()["obs:tick"]["state"] == "paused"

        tick.locator('button[data-action="resume"]').click()
        expect(tick).to_have_attribute("data-state", "running", timeout=10_000)
        wait_for(lambda: stack.status()["obs:tick"]["state"] == "running", what="the resume")
    finally:
        page.close()
    assert errors == []


@pytest.mark.slow
@pytest.mark.browser
def test_a_page_without_a_token_is_read_only(stack: Stack, browser: Any) -> None:
    """Started without --token, the page shows the loops and no control buttons at all."""
    from playwright.sync_api import expect

    stack.runner()
    wait_for(lambda: stack.reported(*LOOPS), what="reports of every loop")
    _, base = stack.dashboard()
    page = browser.new_page()
    try:
        page.goto(f"{base}/")
        expect(page.locator("tbody tr")).to_have_count(3, timeout=10_000)
        expect(page.locator("#mode")).to_contain_text("read-only")
        expect(page.locator("#auth")).to_be_hidden()
        expect(page.locator("td.actions").first).to_be_hidden()
    finally:
        page.close()


class Resting(LoopRecord):
    """A loop in a state this page has never heard of."""

    def state(self, wall_now: float) -> str:
        return "resting"


#: The cron loop's next start: 02:30 on Lord Howe Island, a day ahead (shown in its own zone).
NIGHTLY = (datetime.now(ZoneInfo("Australia/Lord_Howe")) + timedelta(days=1)).replace(
    hour=2, minute=30, second=0, microsecond=0)


def long_fenced_loops(started: float) -> list[LoopRecord]:
    """Loops as a Redis coordinator of a busy fleet shows them: fences of 16 digits, long
    holder names, a long error, a fast loop, a once-a-minute cron loop, a state unknown here."""
    fence = 1733512345678901
    return [
        LoopRecord("billing:reconcile_invoices", fence=fence, paused=False,
                   holder="worker-7f9c6d8b5-x2x4q:4194301", held_since=started, passes=123456789,
                   errors=4321, last_duration=1.25, last_outcome="failed",
                   last_error="TimeoutError: the ledger service did not answer within 30 seconds"
                              " while reconciling invoice batch 2024-12-06/0042\nTraceback ...",
                   last_error_at=started - 5, p50=0.0123, p99=12.5),
        LoopRecord("shop:tick", fence=fence + 1, paused=False, holder="web-2:31337",
                   held_since=started, passes=int((time.time() - started) * 20), errors=0,
                   last_duration=0.002, last_outcome="worked", p50=0.002, p99=0.004),
        LoopRecord("shop:nightly_report", fence=fence + 2, paused=False, holder="web-2:31337",
                   held_since=started, passes=1 if time.time() - started > 1 else 0,
                   last_duration=4.0, last_outcome="worked", p50=4.0, p99=4.0,
                   next_start=NIGHTLY.timestamp(), zone="Australia/Lord_Howe"),
        LoopRecord("shop:archive", fence=fence + 3, paused=True, holder=None, held_since=None,
                   passes=99999, errors=12),
        Resting("shop:resting", fence=fence + 4, paused=False, holder="web-3:2718",
                held_since=started, passes=5),
    ]


@pytest.mark.browser
def test_the_page_fits_1400_px_with_long_fences_and_tells_rates_honestly(
    browser: Any, tmp_path: Path,
) -> None:
    """At 1,400 px with 16-digit fences and the buttons shown: no horizontal scroll; an empty
    last error is not red; a cron loop reads no rate yet; the rate column and chart agree; an
    unknown state is drawn plainly. A screenshot is saved as dashboard-1400.png."""
    from playwright.sync_api import expect

    started = time.time()
    board = Board("memory://scripted", token=TOKEN, every=0.25,
                  coordinator=Scripted(lambda now: long_fenced_loops(started)))
    with served(board) as base:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        try:
            page.goto(f"{base}/")
            page.fill("#token", TOKEN)
            page.click("#auth button[type=submit]")
            expect(page.locator("#mode")).to_have_text("controls on")
            row = 'tr[data-key="{}"]'.format
            tick, cron = page.locator(row("shop:tick")), page.locator(row("shop:nightly_report"))
            # The fast loop's rate shows once the dashboard has watched a few seconds.
            expect(tick.locator("td.per_minute")).not_to_have_text("—", timeout=20_000)
            page.screenshot(path=str(tmp_path / "dashboard-1400.png"), full_page=True)

            widths = page.evaluate("""() => ({
                page: document.documentElement.scrollWidth, window: window.innerWidth,
                main: document.querySelector("main").scrollWidth,
                mainBox: document.querySelector("main").clientWidth,
                table: document.querySelector("table").getBoundingClientRect().right,
            })""")
            assert widths["page"] <= widths["window"] == 1400, widths
            assert widths["main"] <= widths["mainBox"], widths
            assert widths["table"] <= widths["window"], widths
            for key in ("billing:reconcile_invoices", "shop:tick"):
                fence = page.locator(row(key)).locator("td.fence")
                assert fence.inner_text().strip() in {"1733512345678901", "1733512345678902"}
                assert fence.evaluate("td => td.scrollWidth <= td.clientWidth")  # not clipped
            buttons = page.locator("td.actions button")
            assert buttons.count() == 15
            for index in range(buttons.count()):
                box = buttons.nth(index).bounding_box()
                assert box is not None
                assert box["x"] + box["width"] <= 1400

            def color(locator: Any) -> str:
                """The colour the element's text is drawn in (that of its first innermost child)."""
                return str(locator.evaluate("""el => {
                    while (el.firstElementChild) el = el.firstElementChild;
                    return getComputedStyle(el).color;
                }"""))

            red = color(page.locator(row("billing:reconcile_invoices")).locator("td.error"))
            assert red == "rgb(192, 57, 43)"
            empty = tick.locator("td.error")
            assert empty.inner_text().strip() in {"-", "—"}
            assert color(empty) != red
            assert color(empty) == color(page.locator("#coordinator"))  # muted, like other asides

            # One pass of a once-a-minute loop, seen in the first seconds, is no rate yet.
            assert cron.locator("td.per_minute").inner_text() == "—"
            assert cron.locator("td.state .next").inner_text() == "next 02:30:00"  # the loop's zone
            assert "Australia/Lord_Howe" in (cron.locator("td.state").get_attribute("title") or "")
            assert cron.locator("svg.chart-rate + .chart-label").inner_text() == "—"
            help_text = page.locator("th.rate-help").first.get_attribute("title") or ""
            assert "10 passes" in help_text
            assert help_text == page.locator("#rate-help").inner_text()
            api = {loop["key"]: loop for loop in json.loads(get(f"{base}/api/loops")[1])["loops"]}
            assert api["shop:nightly_report"]["per_minute"] is None
            # The column and the number beside its chart are one measure.
            assert tick.locator("td.per_minute").inner_text() == \
                tick.locator("svg.chart-rate + .chart-label").inner_text()

            resting = page.locator(row("shop:resting"))
            expect(resting.locator("td.state")).to_have_text("resting")
            assert color(resting.locator("td.state")) == color(page.locator("body"))
        finally:
            page.close()
    assert errors == []


def many_members(started: float) -> list[LoopRecord]:
    """A loop of 2,000 keys (3 of them failing), one of 4 partitions, and a plain loop."""
    keyed = [
        LoopRecord(f"shop:sync[tenant-{i:04d}]", fence=i + 1, paused=False, holder=f"web-{i % 3}:1",
                   held_since=started, passes=10, errors=5 if i < 3 else 0,
                   last_outcome="failed" if i < 3 else "worked", fail_streak=5 if i < 3 else 0,
                   fail_after=3, last_error="ValueError: bad tenant" if i < 3 else None,
                   last_error_at=started if i < 3 else None)
        for i in range(2000)
    ]
    shards = [LoopRecord(f"shop:drain#{i}", fence=7, paused=False, holder="web-0:1",
                         held_since=started, passes=3, last_outcome="worked") for i in range(4)]
    plain = [LoopRecord("shop:tick", fence=1, paused=False, holder="web-0:1", held_since=started,
                        passes=1, last_outcome="worked")]
    return sorted([*keyed, *shards, *plain], key=lambda r: r.key)  # as coordinators list them


def test_the_api_sends_a_loop_of_members_as_one_entry_until_it_is_expanded() -> None:
    started = time.time()
    board = Board("memory://scripted", coordinator=Scripted(lambda now: many_members(started)))
    run_sync(board.sample())  # (in a thread of its own if the browser's event loop runs here)
    closed = board.snapshot()["loops"]
    assert [row["key"] for row in closed] == ["shop:drain", "shop:sync", "shop:tick"]
    sync = closed[1]
    assert sync["group"] == {"kind": "keys", "count": 2000, "shown": 500,
                             "states": {"failing": 3, "running": 1997}}
    assert (sync["state"], sync["summary"], sync["passes"]) == ("failing", "3 failing, 1997 running", 20000)
    assert sync["holder"] == "3 runners"
    opened = board.snapshot(["shop:drain"])["loops"]
    assert [row["key"] for row in opened][:6] == ["shop:drain", *(f"shop:drain#{i}" for i in range(4)),
                                                   "shop:sync"]
    assert {row.get("parent") for row in opened[1:5]} == {"shop:drain"}


@pytest.mark.browser
def test_the_page_shows_a_loop_of_2000_keys_as_one_row_that_expands(browser: Any) -> None:
    from playwright.sync_api import expect

    started = time.time()
    board = Board("memory://scripted", every=0.25,
                  coordinator=Scripted(lambda now: many_members(started)))
    with served(board) as base:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        try:
            page.goto(f"{base}/")
            sync = page.locator('tr[data-key="shop:sync"]')
            expect(sync.locator("td.loop")).to_contain_text("shop:sync (2000 keys)")
            expect(sync.locator("td.state")).to_have_text("3 failing, 1997 running")
            expect(page.locator("#loops tbody tr")).to_have_count(3)
            sync.locator("button.expand").click()
            expect(page.locator("#loops tbody tr")).to_have_count(3 + 500)
            expect(sync.locator("td.loop")).to_contain_text("first 500 shown")
            member = page.locator('tr[data-key="shop:sync[tenant-0001]"]')
            expect(member.locator("td.loop")).to_have_text("[tenant-0001]")
            expect(member.locator("td.state")).to_have_text("failing")
            sync.locator("button.expand").click()
            expect(page.locator("#loops tbody tr")).to_have_count(3)
            assert errors == []
        finally:
            page.close()
