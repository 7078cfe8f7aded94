"""The run-lock map holds an entry only while a thread uses it: unknown ids leave nothing behind."""

from __future__ import annotations

import gc
import threading

import pytest
from lrserve.service.errors import RunNotFound
from lrserve.service.settings import Settings


@pytest.fixture
def manager(tmp_path, open_manager):
    return open_manager(Settings(db=f"sqlite:///{tmp_path}/locks.db"))


def test_unknown_and_deleted_run_ids_leave_no_lock_behind(manager):
    for i in range(2000):
        with pytest.raises(RunNotFound):
            manager.state(f"missing-{i}")
    manager.create_run({"run_id": "gone", "schedule": {"type": "StepLR", "step_size": 2}, "base_lrs": [0.1]})
    manager.state("gone")
    manager.delete_run("gone")
    with pytest.raises(RunNotFound):
        manager.state("gone")
    gc.collect()
    assert len(manager.runs._load_locks) == 0


def test_threads_asking_together_share_one_lock(manager):
    first = manager.runs.run_lock("r")
    seen = []
    thread = threading.Thread(target=lambda: seen.append(manager.runs.run_lock("r")))
    thread.start()
    thread.join()
    assert seen[0] is first
