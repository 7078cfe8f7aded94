"""Lock scope: one run's torch work holds no lock another run's commit needs.

On SQLite every commit of every run needs the file's one write slot; a window's values are
computed before the slot is taken, so another run's step goes through while they are.
"""

from __future__ import annotations

import threading

import pytest
from lrserve.service.settings import Settings

STEP_LR = {"type": "StepLR", "step_size": 10}


@pytest.fixture
def manager(tmp_path, open_manager):
    return open_manager(Settings(db=f"sqlite:///{tmp_path}/scope.db"))


def test_another_runs_step_does_not_wait_behind_a_window_being_computed(manager):
    for run_id in ("big", "other"):
        manager.create_run({"run_id": run_id, "schedule": STEP_LR, "base_lrs": [0.1]})
    engine = manager.state("big").engine
    computing, release = threading.Event(), threading.Event()
    advance = engine.advance

    def slow_advance(*args):  # the big window's torch work, held until we say so
        computing.set()
        assert release.wait(30)
        return advance(*args)

    engine.advance = slow_advance
    big = threading.Thread(target=manager.window, args=("big", 0, 500))
    big.start()
    try:
        assert computing.wait(30)
        stepped = []
        other = threading.Thread(target=lambda: stepped.append(manager.step_run("other", 1, {}, 0, 5)))
        other.start()
        other.join(20)  # before the fix: blocked on the write slot until ``release`` (a deadlock here)
        assert stepped and stepped[0].values[0][0] == (0.1,)
        assert manager.store.read_run("other").horizon == 6
    finally:
        release.set()
        big.join(30)
    assert manager.store.read_run("big").horizon == 500


def test_a_commit_that_finds_the_run_moved_meanwhile_computes_again(manager, open_manager):
    """Another process (a replica) commits while this one computes outside the write slot:
    the values computed ahead are dropped and computed again from the stored log."""
    plateau = {"type": "ReduceLROnPlateau", "patience": 0}
    manager.create_run({"run_id": "r", "schedule": plateau, "base_lrs": [1.0]})
    engine = manager.state("r").engine
    computing, release = threading.Event(), threading.Event()
    advance = engine.advance

    def slow_advance(*args):
        computing.set()
        assert release.wait(30)
        return advance(*args)

    engine.advance = slow_advance
    windows = []
    here = threading.Thread(target=lambda: windows.append(manager.window("r", 0, 3)))
    here.start()
    replica = open_manager(manager.settings)
    try:
        assert computing.wait(30)
        replica.step_run("r", 1, {"val_loss": 1.0}, 0, 0)
        replica.step_run("r", 2, {"val_loss": 2.0}, 0, 0)  # a reduction at step 2, decided there
    finally:
        release.set()
        here.join(30)
    assert [v[0][0] for v in windows[0].values] == [1.0, 1.0, 0.1, 0.1]
    assert manager.store.read_run("r").horizon == 3
