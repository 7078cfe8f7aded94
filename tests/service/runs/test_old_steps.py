"""Steps below the snapshot a process loaded a run from: replayed once, then served from memory.

A second process (here a second ``RunManager`` on the same database, with the default
settings) that loads a run finds its latest snapshot and holds the steps from there on. A
read of older steps replays them from the snapshot at or below them; the replay goes on to
the first step held and is kept, so the next reads of those steps, in a thread or on the
event loop, replay nothing (figure 5's PostgreSQL x2 final reads stalled on one worker
replaying 2,500 steps for every read). A replay that would have to go much further than
the read asks keeps nothing: a read's work stays bounded by what it asks for.
"""

from __future__ import annotations

import pytest
from lrserve.service.runs.manager import RunManager
from lrserve.service.settings import Settings

from tests.conftest import BACKENDS
from tests.service.runs.test_value_log import bits

SCHEDULE = {"type": "SequentialLR", "milestones": [100], "schedulers": [
    {"type": "LinearLR", "start_factor": 0.1, "total_iters": 100},
    {"type": "CosineAnnealingLR", "T_max": 100_000}]}


@pytest.fixture(params=BACKENDS)
def two(request, database_url, open_manager) -> tuple[RunManager, RunManager]:
    """The process that made the run's steps final, and one that loads it afterwards."""
    settings = Settings(db=database_url(request.param))  # the defaults: a snapshot every 1,000 steps
    return open_manager(settings), open_manager(settings)


def replays_counted(manager: RunManager, monkeypatch) -> list[int | None]:
    """Every snapshot a replay of ``manager``'s starts from (its ``max_step``)."""
    starts: list[int | None] = []
    load = manager.store.load_snapshot

    def counted(run_id: str, *, max_step: int | None = None):
        starts.append(max_step)
        return load(run_id, max_step=max_step)

    monkeypatch.setattr(manager.store, "load_snapshot", counted)
    return starts


def make_final(manager: RunManager, *horizons: int) -> None:
    manager.create_run({"run_id": "r", "base_lrs": [0.1, 0.2], "schedule": SCHEDULE})
    step = 0
    for horizon in horizons:  # each in one commit: one snapshot, at its horizon
        manager.window("r", step, horizon - step)
        step = horizon


def test_steps_below_the_loaded_snapshot_are_replayed_once(two, monkeypatch):
    first, second = two
    make_final(first, 2500)  # one commit of 2,500 steps (bench.hot_path.prepare_runs): one snapshot, at 2500
    expected = first.values_between("r", 0, 2500)
    assert second.state("r").first_step == 2500
    starts = replays_counted(second, monkeypatch)
    for step in range(2000, 2500, 37):  # what figure 5's final load asks, in any order
        assert bits(second.window("r", step, 9).values) == bits(expected[step : step + 10])
    assert len(starts) == 1  # the first read replayed 0..2499; the rest were copies
    window = second.cached_window("r", 1234, 99)  # the event loop's path: held, no thread needed
    assert window is not None and bits(window.values) == bits(expected[1234:1334])
    assert bits(second.values_between("r", 0, 2500)) == bits(expected)
    assert len(starts) == 1


def test_a_replay_keeps_nothing_where_going_on_would_cost_much_more_than_the_read(two, monkeypatch):
    first, second = two
    make_final(first, 2500, 5000)  # snapshots at 2500 and 5000; the second process holds 5000..
    expected = first.values_between("r", 0, 5000)
    assert second.state("r").first_step == 5000
    starts = replays_counted(second, monkeypatch)
    assert bits(second.values_between("r", 100, 110)) == bits(expected[100:111])
    assert second.state("r").replayed is None  # going on to 4999 would be 5,000 steps for 11 read
    assert bits(second.values_between("r", 4000, 4010)) == bits(expected[4000:4011])
    kept = second.state("r").replayed
    assert kept is not None and kept.first == 2500  # from the snapshot at 2500 up to the steps held
    assert bits(second.values_between("r", 1500, 1600)) == bits(expected[1500:1601])
    kept = second.state("r").replayed
    assert kept is not None and kept.first == 0 and len(kept.values) == 5000  # joined below the kept ones
    assert starts == [100, 4000, 1500]
    assert bits(second.values_between("r", 0, 5000)) == bits(expected)
    assert len(starts) == 3


def test_a_read_past_the_horizon_keeps_nothing_and_leaves_the_kept_steps_as_they_were(two):
    """``values_between`` is for final steps; a caller asking past the horizon gets a replay of
    its own (as before) and the steps kept are not touched (before: kept shifted by one step)."""
    first, second = two
    make_final(first, 2500, 5000)
    expected = first.values_between("r", 0, 5000)
    assert bits(second.values_between("r", 4000, 4010)) == bits(expected[4000:4011])
    kept = second.state("r").replayed
    second.values_between("r", 4990, 5001)
    assert second.state("r").replayed is kept
    assert bits(second.values_between("r", 2500, 4999)) == bits(expected[2500:5000])
