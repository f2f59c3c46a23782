"""The checker on hand-made histories: each guarantee it checks can fail, and does when broken."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.chaos import records
from tests.chaos.checker import Report, check, percentile
from tests.chaos.records import Fault, History, LogLine, PassRecord, RunnerLife
from tests.chaos.store import FencedStore, Write, create, read_writes

TTL = 1.0


def run(pid: int, fence: int, start: float, end: float, *, loop: str = "a", step: float = 0.1,
        seq0: int = 0) -> list[PassRecord]:
    """Back-to-back passes of ``loop`` by ``pid`` from ``start`` to ``end``, one every ``step``."""
    out, t, seq = [], start, seq0
    while t + step / 2 <= end:
        out.append(PassRecord(loop, pid, seq, fence, t, t + step / 2, "accepted"))
        t += step
        seq += 1
    return out


def history(
    passes: Sequence[PassRecord], *, writes: Sequence[Write] = (), logs: Sequence[LogLine] = (),
    faults: Sequence[Fault] = (), runners: Sequence[RunnerLife] = (), loops: Sequence[str] = ("a",),
    teardown: float | None = None,
) -> History:
    pids = sorted({p.pid for p in passes})
    return History(
        ttl=TTL, loops=list(loops), passes=sorted(passes, key=lambda r: r.start),
        writes=list(writes), logs=list(logs), faults=list(faults),
        runners=list(runners) or [RunnerLife(n, pid, 0.0) for n, pid in enumerate(pids)],
        warm=0.0,
        teardown=teardown if teardown is not None else max(p.end or p.start for p in passes) + 0.05,
    )


def released(pid: int, fence: int, t: float, loop: str = "a") -> LogLine:
    return LogLine(pid, t, "info", "lease_released", loop, fence)


def test_a_clean_history_with_a_graceful_handover_is_ok() -> None:
    """One holder, then a release and another holder: no violation, one handover, tiny gaps."""
    report = check(history(run(1, 1, 0, 3) + run(2, 2, 3.02, 6), logs=[released(1, 1, 3.0)]))
    assert report.ok, report.problems
    assert (report.handovers, report.spurious_failovers, report.overlaps) == (1, 0, 0)
    assert report.max_gap < 0.15
    assert report.passes == 60


def test_a_planted_overlap_is_caught() -> None:
    """A second holder starting while the first still runs, with no pause to excuse it, fails."""
    passes = [*run(1, 1, 0, 3), PassRecord("a", 1, 99, 1, 3.0, 3.6, "accepted"), *run(2, 2, 3.2, 6)]
    report = check(history(passes, logs=[released(1, 1, 3.6)]))
    assert report.overlaps >= 1
    assert not report.ok
    assert any("overlap: a pid 1 fence 1" in p for p in report.problems)


def paused_overlap(stop: tuple[float, float], old_end: float, seen: float | None = None) -> Report:
    """Holder 1 is stopped inside a pass; holder 2 takes over at 1.5; the old pass ends at
    ``old_end``. ``seen``: when every thread of holder 1 was seen stopped."""
    passes = [*run(1, 1, 0, 0.5), PassRecord("a", 1, 50, 1, 0.5, old_end, "refused"),
              *run(2, 2, 1.5, 4)]
    detail = {} if seen is None else {"seen": seen}
    fault = Fault("stop_long", stop[0], stop[1], target=1, paused=True, detail=detail)
    return check(history(passes, faults=[fault]))


def test_an_overlap_after_a_long_pause_ending_within_a_renewal_interval_is_allowed() -> None:
    """The stopped holder's pass, paused for 2 TTL and ending 0.1 s after SIGCONT, is excused."""
    report = paused_overlap((0.52, 2.52), 2.62)
    assert report.ok, report.problems
    assert (report.overlaps, report.allowed_overlaps) == (0, 1)


def test_a_pass_begun_between_sigstop_and_the_stop_taking_effect_is_excused() -> None:
    """SIGSTOP sent at 0.4999 takes effect by 0.5003; the pass begun at 0.5 is frozen with
    its process, and its overlap is excused as any frozen pass's. Seen stopped only before
    the pass began, it is not."""
    report = paused_overlap((0.4999, 2.52), 2.62, seen=0.5003)
    assert (report.overlaps, report.allowed_overlaps) == (0, 1), report.problems
    assert paused_overlap((0.4999, 2.52), 2.62, seen=0.4999).overlaps >= 1


@pytest.mark.parametrize(
    ("stop", "old_end"),
    [((0.52, 0.82), 2.62), ((0.52, 2.52), 3.2)],
    ids=["pause-shorter-than-ttl", "ends-too-long-after-continue"],
)
def test_an_overlap_is_not_excused_by_a_short_pause_or_a_late_end(
    stop: tuple[float, float], old_end: float,
) -> None:
    """A pause under the TTL, or an old pass running on past TTL/3 after SIGCONT, is a violation."""
    report = paused_overlap(stop, old_end)
    assert report.overlaps >= 1
    assert report.allowed_overlaps == 0


def self_stop_overlap(other_start: float) -> Report:
    """Holder 1 stops itself in a pass of loop ``z`` (it records 0.5000, the nemesis sees it
    stopped at 0.5010, it continues at 2.5); its pass of loop ``a`` began at ``other_start``
    and ends after the continue; holder 2 takes ``a`` over at 1.5."""
    passes = [
        *run(1, 1, 0, 0.5), PassRecord("a", 1, 50, 1, other_start, 2.55, "refused"),
        PassRecord("z", 1, 51, 1, 0.499, 2.52, "refused", paused_at=0.5000), *run(2, 2, 1.5, 4),
    ]
    fault = Fault("pause_write", 0.5010, 2.5, target=1, paused=True)
    return check(history(passes, faults=[fault], loops=("a", "z")))


def test_a_pass_that_began_as_its_process_stopped_itself_is_frozen_with_it() -> None:
    """A pass another thread began between the self-stop's own record and the stop being
    seen was frozen by the stop: its overlap is excused like any frozen pass's."""
    report = self_stop_overlap(0.5005)
    assert report.overlaps == 0, report.problems
    assert report.allowed_overlaps == 1


def test_a_pass_that_began_after_its_process_was_seen_stopped_is_not_excused() -> None:
    """A pass can only have started before its process was seen stopped; one recorded
    as starting after (after the continue, here) is an overlap like any other."""
    report = self_stop_overlap(2.51)
    assert report.overlaps >= 1
    assert report.allowed_overlaps == 0


def write(n: int, fence: int, accepted: bool, t: float, pid: int = 1) -> Write:
    return Write(n, "a", fence, pid, n, accepted, t)


def test_a_stale_write_accepted_is_caught_and_a_refused_one_is_only_counted() -> None:
    """Fence 1 accepted after fence 2 was: stale_accepted; refused instead: stale_refused, still ok."""
    passes = run(1, 1, 0, 1) + run(2, 2, 1.0, 2)
    bad = check(history(passes, logs=[released(1, 1, 1.0)],
                        writes=[write(1, 1, True, 0.5), write(2, 2, True, 1.1), write(3, 1, True, 1.2)]))
    assert (bad.stale_accepted, bad.ok) == (1, False)
    good = check(history(passes, logs=[released(1, 1, 1.0)],
                         writes=[write(1, 1, True, 0.5), write(2, 2, True, 1.1), write(3, 1, False, 1.2)]))
    assert (good.stale_accepted, good.stale_refused, good.ok) == (0, 1, True)


def test_a_write_let_in_before_the_new_holder_wrote_is_counted_as_superseded() -> None:
    """The store cannot refuse a fence it has not seen beaten yet; the checker says so, no more."""
    passes = run(1, 1, 0, 1) + run(2, 2, 1.0, 2)
    report = check(history(passes, logs=[released(1, 1, 1.0)],
                           writes=[write(1, 1, True, 1.05), write(2, 2, True, 1.1)]))
    assert (report.superseded_accepted, report.stale_accepted, report.ok) == (1, 0, True)


def test_a_wrongly_refused_current_fence_is_a_store_error() -> None:
    """A store that refuses the highest fence is broken too."""
    report = check(history(run(1, 1, 0, 1), writes=[write(1, 1, False, 0.5)]))
    assert (report.store_errors, report.ok) == (1, False)


@pytest.mark.parametrize(
    ("passes", "logs"),
    [
        (run(1, 2, 0, 1) + run(2, 1, 1.0, 2), []),
        (run(1, 1, 0, 1) + run(2, 1, 1.0, 2), []),
        (run(1, 1, 0, 1), [LogLine(1, 0.0, "info", "lease_acquired", "a", 1),
                           LogLine(2, 0.5, "info", "lease_acquired", "a", 1)]),
    ],
    ids=["fence-goes-back", "fence-shared-by-two-processes", "fence-granted-twice"],
)
def test_fence_violations(passes: list[PassRecord], logs: list[LogLine]) -> None:
    """A fence that goes back, is used by two processes, or is granted twice fails the run."""
    report = check(history(passes, logs=[*logs, released(1, 1, 1.0), released(1, 2, 1.0)]))
    assert report.fence_violations >= 1
    assert not report.ok


def takeover(faults: Sequence[Fault] = (), runners: Sequence[RunnerLife] = ()) -> Report:
    """Holder 1 loses the loop to holder 2 at 2.0 without releasing it."""
    return check(history(run(1, 1, 0, 2) + run(2, 2, 2.0, 6), faults=faults, runners=runners))


def test_a_takeover_from_a_healthy_holder_is_spurious() -> None:
    """No fault, no release, holder alive: a spurious failover."""
    report = takeover()
    assert (report.handovers, report.spurious_failovers, report.ok) == (1, 1, False)


def test_a_harmless_fault_does_not_excuse_a_takeover() -> None:
    """A SIGSTOP of 0.3 TTL must not move the loop: still spurious."""
    report = takeover([Fault("stop_short", 1.8, 2.1, target=1, disruptive=False, paused=True)])
    assert report.spurious_failovers == 1


@pytest.mark.parametrize(
    ("faults", "runners"),
    [
        ([Fault("blackhole", 1.5, 4.5, target=1)], []),
        ([], [RunnerLife(0, 1, 0.0, exited=1.9, code=-9, sent="KILL"), RunnerLife(1, 2, 0.0)]),
    ],
    ids=["during-a-disruptive-fault", "holder-died"],
)
def test_an_explained_takeover_is_not_spurious(faults: list[Fault], runners: list[RunnerLife]) -> None:
    """A takeover during (or just after) a disruptive fault, or from a dead holder, is fine."""
    report = takeover(faults, runners)
    assert report.spurious_failovers == 0


def test_a_long_gap_with_nothing_logged_is_a_silent_stop() -> None:
    """3 s without a pass ending and no word about it: a silent stop; with a warning: not."""
    passes = run(1, 1, 0, 2) + run(1, 1, 5, 6)
    silent = check(history(passes))
    assert (silent.silent_stops, silent.ok) == (1, False)
    assert silent.max_gap == pytest.approx(3.1, abs=0.01)
    assert silent.max_gap_loop == "a"
    logged = check(history(passes, logs=[LogLine(1, 2.1, "warning", "lease_lost", "a", 1)]))
    assert (logged.silent_stops, logged.ok) == (0, True)


def test_a_loop_that_stops_for_good_is_caught_up_to_the_teardown() -> None:
    """The stretch from the last pass to the teardown counts, and a loop that never ran fails."""
    report = check(history(run(1, 1, 0, 2), loops=["a", "b"], teardown=6.0))
    assert report.silent_stops == 1
    assert report.never_ran == 1
    assert report.max_gap > 3.9


def test_failover_and_detection_are_measured_from_the_fault() -> None:
    """A kill -9 at 2.0 and a new holder at 2.3: failover 0.3 s; a stopped holder: detection."""
    killed = check(history(
        run(1, 1, 0, 2) + run(2, 2, 2.3, 4),
        faults=[Fault("kill9", 2.0, 2.0, target=1)],
        runners=[RunnerLife(0, 1, 0.0, exited=2.0, code=-9, sent="KILL"), RunnerLife(1, 2, 0.0)],
    ))
    assert killed.ok, killed.problems
    assert killed.failover_s == [pytest.approx(0.3, abs=0.01)]
    assert killed.detection_s == []
    cut_off = check(history(
        run(1, 1, 0, 2.8) + run(2, 2, 3.0, 5), faults=[Fault("blackhole", 2.0, 5.0, target=1)],
    ))
    assert cut_off.failover_s == [pytest.approx(1.0, abs=0.01)]
    assert cut_off.detection_s == [pytest.approx(0.75, abs=0.01)]


def test_the_handover_margin_says_whether_the_old_holder_stopped_before_the_new_one_started() -> None:
    """Margin: the new holder's first pass start less the old holder's last pass end under
    the old fence. Cut off at 2.0, a holder that stopped at 2.35 leaves +0.65 s before the
    new holder starts at 3.0; one that went on until 3.25 overlapped it by 0.25 s."""
    stopped = check(history(run(1, 1, 0, 2.4) + run(2, 2, 3.0, 5),
                            faults=[Fault("partition", 2.0, 5.0, target=1)]))
    assert stopped.handover_margins == [pytest.approx(0.65)]
    assert (stopped.stopped_first, stopped.overlaps) == (1, 0)
    went_on = check(history(run(1, 1, 0, 3.3) + run(2, 2, 3.0, 5),
                            faults=[Fault("cut_terminate", 2.0, 5.0, target=1)]))
    assert went_on.handover_margins == [pytest.approx(-0.25)]
    assert (went_on.stopped_first, went_on.ok) == (0, False)
    assert went_on.overlaps >= 1
    out = went_on.to_dict()
    assert (out["moved"], out["stopped_first"]) == (1, 0)
    assert out["margin_min"] == out["margin_p50"] == pytest.approx(-0.25)


def test_a_killed_holders_last_pass_ends_at_its_death_and_a_regrant_to_it_is_no_move() -> None:
    """A pass cut short by kill -9 ends when its process died; a loop granted again to the
    same runner under a new fence (after a server restart) did not move, so has no margin."""
    killed = check(history(
        [*run(1, 1, 0, 2.0), PassRecord("a", 1, 99, 1, 2.0), *run(2, 2, 2.3, 4)],
        faults=[Fault("host_kill9", 2.02, 2.02, target=1)],
        runners=[RunnerLife(0, 1, 0.0, exited=2.02, code=-9, sent="KILL"), RunnerLife(1, 2, 0.0)],
    ))
    assert killed.handover_margins == [pytest.approx(0.28)]
    assert killed.stopped_first == 1
    regranted = check(history(run(1, 1, 0, 2.0) + run(1, 2, 2.1, 4),
                              faults=[Fault("server_restart", 2.0, 2.05)]))
    assert regranted.failover_s == [pytest.approx(0.1)]
    assert (regranted.handover_margins, regranted.margin_min, regranted.margin(50)) == ([], None, None)


def test_a_loop_nobody_resumes_after_its_holder_died_is_caught() -> None:
    """A kill -9 of the only holder, and no other runner ever takes the loop."""
    report = check(history(
        run(1, 1, 0, 2), faults=[Fault("kill9", 2.0, 2.0, target=1)],
        runners=[RunnerLife(0, 1, 0.0, exited=2.0, code=-9, sent="KILL")], teardown=3.0,
    ))
    assert report.not_resumed == 1
    assert not report.ok


@pytest.mark.parametrize(
    ("life", "bad"),
    [
        (RunnerLife(0, 1, 0.0, exited=5.0, code=0, sent="TERM"), 0),
        (RunnerLife(0, 1, 0.0, exited=5.0, code=-9, sent="KILL"), 0),
        (RunnerLife(0, 1, 0.0, exited=5.0, code=1, sent="TERM"), 1),
        (RunnerLife(0, 1, 0.0, exited=5.0, code=-11), 1),
    ],
    ids=["term-exit-0", "killed", "term-exit-1", "crashed-unasked"],
)
def test_runner_exits(life: RunnerLife, bad: int) -> None:
    """SIGTERM must end in exit 0, and no runner may die unasked."""
    report = check(history(run(1, 1, 0, 2), runners=[life]))
    assert report.bad_exits == bad


def test_percentiles_are_nearest_rank() -> None:
    """p50 and p99 of a few samples are samples themselves; none of nothing."""
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(n) for n in range(1, 101)], 99) == 99.0


def test_records_are_read_back_from_a_run_directory(tmp_path: Path) -> None:
    """Pass lines (one cut short by a kill), the store's log, JSON logs and events load as records."""
    for sub in ("passes", "logs"):
        (tmp_path / sub).mkdir()
    (tmp_path / "passes" / "7.log").write_text(
        "S 1 loop00 7 3 1000000000\nP 1 loop00 7 3 1500000000\n"
        "E 1 loop00 7 3 1000000000 2500000000 refused\nS 2 loop00 7 3 3000000000\nE 2 loo"
    )
    create(tmp_path / "fenced.db")
    store = FencedStore(tmp_path / "fenced.db")
    assert store.write("loop00", 3, 7, 1, 2_000_000_000)
    assert not store.write("loop00", 2, 8, 1, 2_100_000_000)
    offset = 1_000_000.0
    (tmp_path / "logs" / "runner-0.log").write_text(
        json.dumps({"time": "1970-01-12T13:46:41.500Z", "level": "warning", "event": "lease_lost",
                    "loop": "chaos:loop00", "fence": 3, "message": "lost"}) + "\nnot json\n"
        # an hour ahead on a runner whose wall clock jumped
        + json.dumps({"time": "1970-01-12T14:46:42.000Z", "level": "info", "message": "late"}) + "\n"
    )
    (tmp_path / "meta.json").write_text(json.dumps({"ttl": 1.0, "loops": 1, "wall_offset": offset}))
    (tmp_path / "events.jsonl").write_text("\n".join(json.dumps(e) for e in [
        {"kind": "runner_started", "n": 0, "pid": 7, "t": 0.5},
        {"kind": "phase", "name": "warm", "t": 0.9},
        {"kind": "fault", "fault": "clock_jump", "start": 1.2, "end": 1.2, "target": 7,
         "disruptive": False, "paused": False, "detail": {"shift": 3600.0}},
        {"kind": "signal", "pid": 7, "sig": "KILL"},
        {"kind": "runner_exited", "n": 0, "pid": 7, "t": 3.5, "code": -9},
        {"kind": "phase", "name": "teardown", "t": 4.0},
    ]) + "\n")
    loaded = records.load(tmp_path)
    assert loaded.passes == [
        PassRecord("loop00", 7, 1, 3, 1.0, 2.5, "refused", paused_at=1.5),
        PassRecord("loop00", 7, 2, 3, 3.0),
    ]
    assert [(w.fence, w.accepted) for w in read_writes(tmp_path / "fenced.db")] == [(3, True), (2, False)]
    assert [(line.loop, line.event) for line in loaded.logs] == [("loop00", "lease_lost"), (None, None)]
    assert [line.t for line in loaded.logs] == pytest.approx([1.5, 2.0])
    assert loaded.unparsed_log_lines == 1
    assert loaded.runners == [RunnerLife(0, 7, 0.5, exited=3.5, code=-9, sent="KILL")]
    assert (loaded.warm, loaded.teardown, loaded.faults[0].kind) == (0.9, 4.0, "clock_jump")
