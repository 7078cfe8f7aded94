"""The spike guard's bands (``GET .../spike-guard``) go on from where the last view stopped:
each view reads only the metric events after the last it read, and shows what a replay of
the whole log shows (``read_models.RunBands``)."""

from __future__ import annotations

import math

import pytest
from lrserve.service.engine.spike_guard import BandReplay, Report
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
    replay = BandReplay(settings)
    for event in sorted(store.read_events("g"), key=lambda e: (e.step, e.seq)):
        if event.kind is EventKind.METRIC and event.step is not None and event.step <= horizon:
            for r in event.payload.get("reports", ()):
                if r.get("name") == settings.monitor:
                    replay.judge(event.step, Report.from_payload(r))
    return {rank: band.picked(downsample(range(len(band.steps)), max_points))
            for rank, band in sorted(replay.bands.items())}


def test_each_view_reads_the_events_after_the_last_and_shows_the_whole_logs(url, open_manager, monkeypatch):
    manager = open_manager(Settings(db=url))
    manager.create_run({"run_id": "g", "schedule": GUARD, "base_lrs": [0.1], "world_size": 2})
    store = manager.store
    read_from = []
    reading = store.read_events_of
    monkeypatch.setattr(store, "read_events_of", lambda run_id, kinds, *, after_seq=0, step=None: (
        read_from.append(after_seq), reading(run_id, kinds, after_seq=after_seq, step=step))[1])
    shown = []
    for step in range(1, 121):
        manager.window("g", step, 0)  # both ranks step, then log: each report applies at the next step
        manager.record_metrics("g", [{"step": step, "name": "loss", "value": _loss(step, rank), "rank": rank}
                                     for rank in range(2)])
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
