"""The spike guard's bands (``GET .../spike-guard``) go on from where the last view stopped:
each view reads only the metric events after the last it read, and shows what a replay of
the whole log shows (``read_models.RunBands``)."""

from __future__ import annotations

import math
import threading
import time

import pytest
from lrserve.service.engine.spike_guard import Band, Detector, Report
from lrserve.service.errors import StoreUnavailable
from lrserve.service.runs import read_models
from lrserve.service.runs.read_models import RunBands, downsample, shared_points
from lrserve.service.settings import Settings
from lrserve.service.store.events import EventKind

from tests.conftest import BACKENDS

GUARD = {"type": "SpikeGuard", "schedule": {"type": "CosineAnnealingLR", "T_max": 500}, "warmup_reports": 10}
SPIKES = {(40, 1), (90, 0)}


@pytest.fixture(params=BACKENDS)
def url(request, database_url):
    return database_url(request.param)


def _loss(step: int, rank: int) -> float:
    value = 3.0 * math.exp(-step / 200) + 0.2 + 0.02 * math.sin(1.3 * step + rank)
    return value * 5 if (step, rank) in SPIKES else value


def _whole_log(store, settings, horizon: int, max_points: int, run_id: str = "g"):
    """The bands as the tree before built them on every view: the whole log, replayed."""
    detector, bands = Detector(settings), {}
    for event in sorted(store.read_events(run_id), key=lambda e: (e.step, e.seq)):
        if event.kind is EventKind.METRIC and event.step is not None and event.step <= horizon:
            for r in event.payload.get("reports", ()):
                if r.get("name") == settings.monitor:
                    report = Report.from_payload(r)
                    verdict = detector.judge(report)
                    if verdict is None:
                        continue
                    band = bands.setdefault(report.rank, Band())
                    for series, value in zip((band.steps, band.values, band.baseline, band.upper),
                                             (report.step, report.value, verdict.baseline, verdict.upper),
                                             strict=True):
                        series.append(value)
                    if verdict.spike:
                        detector.spike_at(verdict, event.step)
    return {rank: band.picked(downsample(range(len(band.steps)), max_points))
            for rank, band in sorted(bands.items())}


def test_each_view_reads_the_events_after_the_last_and_shows_the_whole_logs(url, open_manager, monkeypatch):
    manager = open_manager(Settings(db=url))
    manager.create_run({"run_id": "g", "schedule": GUARD, "base_lrs": [0.1], "world_size": 2})
    store = manager.store
    read_from = []
    reading = store.read_events_of

    def spied(run_id, kinds, **how):
        if list(kinds) == [EventKind.METRIC] and "above_step" not in how:  # a view's, not a load's
            read_from.append(how.get("after_seq", 0))
        return reading(run_id, kinds, **how)

    monkeypatch.setattr(store, "read_events_of", spied)
    shown = []
    for step in range(1, 121):
        manager.window("g", step, 0)  # the step taken, then the ranks log it: it applies at the next
        manager.record_metrics("g", [{"step": step, "name": "loss", "value": _loss(step, rank), "rank": rank}
                                     for rank in range(2)])
        if step == 25:  # one placed far ahead: judged at step 45, after the ones read later (26-44)
            manager.record_metrics("g", [{"step": 45, "name": "loss", "value": 0.01, "rank": 1}])
        if step % 30 == 0:  # a view with the last reports still above the horizon
            shown.append(manager.spike_guard("g", 50))
    assert read_from[0] == 0 and all(0 < a < b for a, b in zip(read_from[1:], read_from[2:], strict=False))
    view = shown[-1]
    assert [(s.step, s.rank) for s in view.spikes] == sorted(SPIKES)  # what the engine found
    assert view.bands == _whole_log(store, view.settings, view.horizon, 50)
    for early in shown[:-1]:
        assert early.bands == _whole_log(store, early.settings, early.horizon, 50)
    assert max(len(b.steps) for b in view.bands.values()) == 50
    again = open_manager(Settings(db=url)).spike_guard("g", 50)  # another process: from the start
    assert again.bands == view.bands


def test_a_run_created_again_is_replayed_from_its_start(url, open_manager):
    manager = open_manager(Settings(db=url))
    for value in (1.0, 2.0):
        manager.create_run({"run_id": "g", "schedule": GUARD, "base_lrs": [0.1]})
        for step in range(1, 4):
            manager.window("g", step, 0)
            manager.record_metrics("g", [{"step": step, "name": "loss", "value": value, "rank": 0}])
        assert manager.spike_guard("g", 10).bands[0].values == [value, value]  # the third above the horizon
        manager.delete_run("g")


LEAST_BUDGET = 10_000  # the least work budget the settings allow


def _replayed(manager, run_id: str, max_points: int, seconds: float = 120):
    """The run's view once its bands are shown: views until the replay handed to the background
    is done (each answered at once meanwhile)."""
    deadline = time.monotonic() + seconds
    while (view := manager.spike_guard(run_id, max_points)).bands_through is None:
        assert view.bands == {}
        assert time.monotonic() < deadline, "the background replay did not end"
        time.sleep(0.02)
    return view


def _metric_reads(store, monkeypatch, hold: threading.Event | None = None) -> list[str]:
    """The threads of every read of the run's metric events from now on (a view's or a
    replay's); ``hold``: the background replay's wait for it first."""
    threads: list[str] = []
    reading = store.read_events_of

    def spied(run_id, kinds, **how):
        if list(kinds) == [EventKind.METRIC] and "above_step" not in how:
            name = threading.current_thread().name
            threads.append(name)
            if hold is not None and name.startswith("lrserve-bands"):
                assert hold.wait(60)
        return reading(run_id, kinds, **how)

    monkeypatch.setattr(store, "read_events_of", spied)
    return threads


def test_a_view_whose_reports_cost_more_than_the_budget_is_replayed_in_the_background(
        url, open_manager, monkeypatch):
    """Reading and judging 400 reports costs more than the least budget: the view answers at
    once without bands, the background thread replays them, views meanwhile answer at once
    too; then the bands are the whole log's, and a view with a few new reports is its own."""
    manager = open_manager(Settings(db=url, work_budget=LEAST_BUDGET))
    manager.create_run({"run_id": "g", "schedule": GUARD, "base_lrs": [0.1], "world_size": 2})
    for step in range(1, 201):  # each rank's report its own event, as ranks send them
        manager.window("g", step, 0)
        for rank in range(2):
            report = {"step": step, "name": "loss", "value": _loss(step, rank), "rank": rank}
            manager.record_metrics("g", [report])
    store, hold = manager.store, threading.Event()
    threads = _metric_reads(store, monkeypatch, hold)
    try:
        first = manager.spike_guard("g", 50)
        assert (first.bands, first.bands_through, first.horizon) == ({}, None, 200)
        assert [(s.step, s.rank) for s in first.spikes] == sorted(SPIKES)  # the engine's, shown as ever
        assert manager.spike_guard("g", 50).bands_through is None  # meanwhile: at once, waiting for nothing
    finally:
        hold.set()
    view = _replayed(manager, "g", 50)
    assert view.bands == _whole_log(store, view.settings, 200, 50) and view.bands_through == 200
    assert threads and all(name.startswith("lrserve-bands") for name in threads)  # no view read any
    for step in range(201, 211):
        manager.window("g", step, 0)
        manager.record_metrics("g", [{"step": step, "name": "loss", "value": 0.3, "rank": 0}])
    threads.clear()
    view = manager.spike_guard("g", 50)  # ten new reports: within the budget, read by the view
    assert view.bands_through == 210 and view.bands == _whole_log(store, view.settings, 210, 50)
    assert threads == [threading.current_thread().name]


def test_the_first_view_of_a_long_run_in_a_new_process_is_replayed_in_the_background_by_default(
        database_url, open_manager):
    """The default budget: a run of 16,000 reports, viewed first by another process (a server
    restarted), is replayed in the background, and its bands are the whole log's."""
    url = database_url("sqlite")
    manager = open_manager(Settings(db=url))
    manager.create_run({"run_id": "g", "schedule": GUARD, "base_lrs": [0.1]})
    steps = 16_000
    for first in range(1, steps + 1, 1000):  # a request of 1,000 records: 1,000 events
        manager.record_metrics("g", [{"step": step, "name": "loss", "value": _loss(step, 0), "rank": 0}
                                     for step in range(first, first + 1000)])
    for step in (10_000, steps):
        manager.window("g", step, 0)
    restarted = open_manager(Settings(db=url))
    first_view = restarted.spike_guard("g", 500)
    assert (first_view.bands, first_view.bands_through) == ({}, None)
    view = _replayed(restarted, "g", 500)
    assert view.bands_through == view.horizon >= steps - 1
    assert view.bands == _whole_log(restarted.store, view.settings, view.horizon, 500)


def test_the_points_a_view_shows_are_priced_and_shared_out(url, open_manager):
    """26 ranks' bands of 100 points each cost more than the least budget: each shows 96
    (10,000 units // 4 units a point // 26 ranks); of 50 points each, within it, 50."""
    manager = open_manager(Settings(db=url, work_budget=LEAST_BUDGET))
    manager.create_run({"run_id": "g", "schedule": GUARD, "base_lrs": [0.1], "world_size": 26})
    for step in range(1, 101):
        manager.record_metrics("g", [{"step": step, "name": "loss", "value": _loss(step, rank), "rank": rank}
                                     for rank in range(26)])
    manager.window("g", 101, 0)
    assert manager.spike_guard("g", 100).bands_through is None  # 2,600 reports: replayed in the background
    view = _replayed(manager, "g", 100)
    assert shared_points(26, LEAST_BUDGET) == 96
    assert len(view.bands) == 26 and {len(band.steps) for band in view.bands.values()} == {96}
    assert view.bands == _whole_log(manager.store, view.settings, 101, 96)
    view = manager.spike_guard("g", 50)
    assert {len(band.steps) for band in view.bands.values()} == {50}


def _guarded_run(manager, run_id: str = "g", steps: int = 200, ranks: int = 2) -> None:
    """A guarded run whose every step each rank reported (one event each), all final."""
    manager.create_run({"run_id": run_id, "schedule": GUARD, "base_lrs": [0.1], "world_size": ranks})
    for step in range(1, steps + 1):
        manager.window(run_id, step, 0)
        for rank in range(ranks):
            report = {"step": step, "name": "loss", "value": _loss(step, rank), "rank": rank}
            manager.record_metrics(run_id, [report])
    manager.window(run_id, steps + 1, 0)


def _small_bands(manager, most: int) -> RunBands:
    """The manager's views kept in ``most`` points (the default's 200,000, made small)."""
    bands = manager.reads.bands = RunBands(manager.store, manager.settings.work_budget,
                                           manager.reads._replays, most=most)
    return bands


def _until_replayed(manager, run_id: str, seconds: float = 120) -> None:
    while run_id in manager.reads.bands._replaying:
        assert seconds > 0, "the background replay did not end"
        time.sleep(0.01)
        seconds -= 0.01


def test_a_run_of_more_points_than_are_kept_is_thinned_and_shown(url, open_manager):
    """The bands of 400 reports with 200 points kept per process: the run's are thinned to at
    most a quarter of that, 50 (every 16th report of each rank and its latest: at every 8th,
    52), shown after the background replay, and the same again at the next view (the first
    version of this change: more than the bound, never kept, and so never shown after a
    background replay, each view starting another)."""
    manager = open_manager(Settings(db=url, work_budget=LEAST_BUDGET))
    _guarded_run(manager)
    _small_bands(manager, most=200)
    view = _replayed(manager, "g", 1000)
    for rank, band in view.bands.items():
        assert band.steps == [*range(1, 201, 16), 200], rank
    assert manager.spike_guard("g", 1000).bands == view.bands  # kept: within the budget, nothing new


def test_four_long_runs_are_kept_together(url, open_manager):
    """Four runs of 400 points each with 800 kept per process: each thinned to 200 at most, all
    four kept after their replays, so their next views read nothing again."""
    manager = open_manager(Settings(db=url, work_budget=LEAST_BUDGET))
    for run_id in "abcd":
        _guarded_run(manager, run_id)
    bands = _small_bands(manager, most=800)
    shown = {}
    for run_id in "abcd":
        shown[run_id] = _replayed(manager, run_id, 50).bands
    assert all(bands._kept.get(run_id) is not None for run_id in "abcd")
    assert sum(bands._kept.get(run_id).points for run_id in "abcd") <= 800
    for run_id in "abcd":
        view = manager.spike_guard(run_id, 50)
        assert view.bands_through == 201 and view.bands == shown[run_id]


def test_what_was_kept_stays_when_a_view_cannot_weigh_the_new_reports(url, open_manager, monkeypatch):
    """A view whose weighing fails (the database down for a moment) is a 503 and changes
    nothing kept: the next view goes on from the last one (before: the kept replay dropped, and
    the whole log replayed again)."""
    manager = open_manager(Settings(db=url, work_budget=LEAST_BUDGET))
    _guarded_run(manager, steps=100)  # 200 reports: within the budget, read by the view
    first = manager.spike_guard("g", 50)
    store, weighing = manager.store, manager.store.weigh_events_of

    def down(*args, **how):
        raise StoreUnavailable("the database is down")

    monkeypatch.setattr(store, "weigh_events_of", down)
    manager.window("g", 102, 0)
    manager.record_metrics("g", [{"step": 102, "name": "loss", "value": 0.3, "rank": 0}])
    manager.window("g", 103, 0)
    with pytest.raises(StoreUnavailable):
        manager.spike_guard("g", 50)
    monkeypatch.setattr(store, "weigh_events_of", weighing)
    read_from, reading = [], store.read_events_of

    def spied(run_id, kinds, **how):
        read_from.append(how.get("after_seq"))
        return reading(run_id, kinds, **how)

    monkeypatch.setattr(store, "read_events_of", spied)
    view = manager.spike_guard("g", 50)
    assert read_from and read_from[0] > 0  # from the last one read, not 0: nothing kept was lost
    assert view.bands == _whole_log(store, view.settings, 103, 50) and view.bands != first.bands


def test_a_failed_replay_is_the_next_views_error_and_the_one_after_starts_again(
        url, open_manager, monkeypatch):
    manager = open_manager(Settings(db=url, work_budget=LEAST_BUDGET))
    _guarded_run(manager)
    store, reading = manager.store, manager.store.read_events_of
    failures = [StoreUnavailable("the database is down")]

    def failing(run_id, kinds, **how):
        if threading.current_thread().name.startswith("lrserve-bands") and failures:
            raise failures.pop()
        return reading(run_id, kinds, **how)

    monkeypatch.setattr(store, "read_events_of", failing)
    assert manager.spike_guard("g", 50).bands_through is None
    _until_replayed(manager, "g")
    with pytest.raises(StoreUnavailable, match="the database is down"):
        manager.spike_guard("g", 50)
    view = _replayed(manager, "g", 50)  # the view after starts it again: no failure left
    assert view.bands == _whole_log(store, view.settings, 201, 50)


@pytest.mark.parametrize("how", ["deleted", "closed"])
def test_a_replay_stops_when_its_run_is_deleted_or_the_server_stops(url, open_manager, monkeypatch, how):
    """A replay under way reads no more once its run is deleted here, or once the manager
    closes (a server stopping: it does not wait for a long run's whole replay)."""
    manager = open_manager(Settings(db=url, work_budget=LEAST_BUDGET))
    _guarded_run(manager, steps=400)
    monkeypatch.setattr(read_models, "READ_PIECE", 10)
    hold = threading.Event()
    threads = _metric_reads(manager.store, monkeypatch, hold)
    try:
        assert manager.spike_guard("g", 50).bands_through is None
        deadline = time.monotonic() + 60
        while not threads:
            assert time.monotonic() < deadline, "the replay never began"
            time.sleep(0.01)
        if how == "deleted":
            manager.delete_run("g")
        else:
            manager.reads.bands.close()
    finally:
        hold.set()
    manager.reads._replays.shutdown(wait=True)
    assert len(threads) == 1  # the piece held, then no more: ~80 pieces left unread
    bands = manager.reads.bands
    assert "g" not in bands._replaying and bands._kept.get("g") is None and "g" not in bands._failed


def test_a_background_replay_judges_at_each_snapshot_holding_few_reports(url, open_manager, monkeypatch):
    """A replay of 800 reports in 10-event pieces of a run snapshotted every 50 steps judges
    what applies up to each snapshot's step once the events up to its seq are read: it never
    holds much more than a snapshot's reports waiting (before: the whole run's, 800), and its
    bands are the whole log's."""
    manager = open_manager(Settings(db=url, work_budget=LEAST_BUDGET, snapshot_every=50))
    _guarded_run(manager, steps=400)
    monkeypatch.setattr(read_models, "READ_PIECE", 10)
    waiting, judging = [], RunBands._judge

    def judge(kept, horizon, stop=None):
        waiting.append(len(kept.ahead))
        judging(kept, horizon, stop)

    monkeypatch.setattr(RunBands, "_judge", staticmethod(judge))
    view = _replayed(manager, "g", 50)
    assert view.bands == _whole_log(manager.store, view.settings, 401, 50)
    assert len(waiting) >= 8 and max(waiting) <= 2 * 50 + 10 + 2  # a snapshot's steps, a piece, the last
