"""The spike guard's bands (``GET .../spike-guard``) go on from where the last view stopped:
each view reads only the metric events after the last it read, and shows what a replay of
the whole log shows (``read_models.RunBands``)."""

from __future__ import annotations

import math

import pytest
from lrserve.service.engine.spike_guard import Band, Detector, Report
from lrserve.service.runs.read_models import downsample
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


def _whole_log(store, settings, horizon: int, max_points: int):
    """The bands as the tree before built them on every view: the whole log, replayed."""
    detector, bands = Detector(settings), {}
    for event in sorted(store.read_events("g"), key=lambda e: (e.step, e.seq)):
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
