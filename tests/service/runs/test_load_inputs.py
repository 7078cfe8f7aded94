"""Loading a run reads its operator actions and the inputs placed above its snapshot, not its
whole log (``replay.apply_stored_inputs``), and serves what a process that never stopped
serves: actions placed far ahead before the snapshot, a new schedule that watches another
metric, metrics and spike-guard reports placed ahead of the horizon."""

from __future__ import annotations

import pytest
from lrserve.service.settings import Settings

from tests.conftest import BACKENDS

PLATEAU = {"type": "ReduceLROnPlateau", "mode": "min", "factor": 0.5, "patience": 1, "monitor": "loss"}
GUARD = {"type": "SpikeGuard", "schedule": {"type": "StepLR", "step_size": 4}, "warmup_reports": 3}


@pytest.fixture(params=BACKENDS)
def url(request, database_url):
    return database_url(request.param)


def _story(manager, until: int) -> None:
    """Steps 1..until of the two runs: plateau metrics, actions placed ahead, guard reports."""
    for step in range(1, until + 1):
        if step == 2:
            manager.control("p", {"action": "scale", "factor": 0.25}, 30)  # far ahead, before every snapshot
            manager.control("p", {"action": "replace_schedule", "schedule": {**PLATEAU, "monitor": "acc",
                                                                             "mode": "max"}}, 22)
        manager.step_run("p", step, {"loss": 1.0, "acc": step / 100}, 0, 0)
        manager.window("g", step, 0)
        manager.record_metrics("g", [{"step": step, "name": "loss", "value": 9.0 if step == 11 else 1.0,
                                      "rank": 0}])  # applies at the next step: ahead of the horizon


def test_a_run_loaded_from_its_inputs_serves_what_a_process_that_never_stopped_serves(url, open_manager,
                                                                                      monkeypatch):
    settings = Settings(db=url, snapshot_every=5)
    first = open_manager(settings)
    first.create_run({"run_id": "p", "schedule": PLATEAU, "base_lrs": [0.1]})
    first.create_run({"run_id": "g", "schedule": GUARD, "base_lrs": [0.1]})
    _story(first, 12)
    restarted = open_manager(settings)  # another process: nothing in memory
    store = restarted.store

    def whole(*_args, **_kwargs):
        raise AssertionError("a load read the whole log")

    read = []
    reading = store.read_events_of
    monkeypatch.setattr(store, "read_events", whole)
    monkeypatch.setattr(store, "read_events_of", lambda run_id, kinds, **how: (
        read.extend(reading(run_id, kinds, **how)), reading(run_id, kinds, **how))[1])
    for run in ("p", "g"):
        restarted.state(run)  # loaded from the snapshot at step 10
    assert {e.step for e in read if e.kind.value == "metric"} == {11, 12, 13}  # above it, only
    later = {}
    for manager in (restarted, first):  # steps 1-9 replayed from step 0 (they read from there)
        later[manager] = [manager.window(run, 1, 35).values for run in ("p", "g")]
    assert later[restarted] == later[first]
    lrs = [values[0][0] for values in later[first][0]]
    assert lrs[29] == pytest.approx(lrs[28] * 0.25)  # step 30: the action placed before the snapshots acted
