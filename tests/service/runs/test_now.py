"""``RunManager.now``: a small commit done at once on the calling thread (the event loop), or
refused before anything changed whenever it would wait — for a lock another thread holds,
the SQLite write slot another connection (process) holds, a run not loaded, too much work,
a snapshot due — or the database is PostgreSQL. A refused call leaves the run as it was
and goes through in a worker thread as before.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator

import pytest
from lrserve.service.runs.manager import RunManager
from lrserve.service.settings import Settings
from lrserve.service.store import open_store

from tests.specs import plateau_on_any_rise

PLATEAU = plateau_on_any_rise()


@pytest.fixture
def settings(database_url) -> Settings:
    return Settings(db=database_url("sqlite"), snapshot_every=200, max_jump=500, max_ahead=500)


@pytest.fixture
def managers(settings) -> Iterator[list[RunManager]]:
    stores = [open_store(settings.db) for _ in range(2)]
    managers = [RunManager(store, settings) for store in stores]
    managers[0].create_run({"run_id": "r", "schedule": PLATEAU, "base_lrs": [0.1, 0.2]})
    managers[0].window("r", 0, 0)
    yield managers
    for store in stores:
        store.close()


def step(manager: RunManager, k: int, ahead: int = 0):
    return manager.now(lambda: manager.step_run("r", k, {"val_loss": 1.0 / k}, 0, ahead))


def unchanged(manager: RunManager, horizon: int) -> None:
    state = manager.loaded("r")
    assert state is not None and not state.evicted
    assert state.horizon == state.engine.step == horizon and not state.take_computed()
    assert manager.store.read_run("r").horizon == horizon


def test_a_small_commit_goes_through_at_once_and_durably(managers):
    a, b = managers
    for k in range(1, 6):
        window = step(a, k)
        assert window is not None and window.start == k
    assert b.store.read_run("r").horizon == 5
    assert b.window("r", 0, 5).values == a.window("r", 0, 5).values
    assert [e.kind.value for e in b.store.read_events("r")] == ["created"] + ["metric"] * 5


def test_a_write_slot_held_by_another_thread_is_not_waited_for(managers):
    a, _ = managers
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with a.store.lock_run("r"):
            holding.set()
            release.wait(30)

    other = threading.Thread(target=hold)
    other.start()
    try:
        assert holding.wait(30)
        began = time.monotonic()
        assert step(a, 1) is None
        assert time.monotonic() - began < 5  # not the 30 s busy timeout
    finally:
        release.set()
        other.join(30)
    unchanged(a, 0)
    assert a.step_run("r", 1, {"val_loss": 1.0}, 0, 0).start == 1  # the worker thread's way


def test_a_write_slot_held_by_another_process_is_not_waited_for(managers, settings):
    a, _ = managers
    other = sqlite3.connect(settings.db.removeprefix("sqlite:///"), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process's writer, as SQLite sees it
    try:
        began = time.monotonic()
        assert step(a, 1) is None
        assert time.monotonic() - began < 5
    finally:
        other.execute("ROLLBACK")
        other.close()
    unchanged(a, 0)
    assert step(a, 1) is not None  # and the busy timeout is back for everyone else:
    with a.store._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000


def test_a_run_another_thread_holds_is_not_waited_for(managers):
    a, _ = managers
    with a.state("r").lock:
        assert step(a, 1) is None
    unchanged(a, 0)


def test_big_work_a_snapshot_due_or_a_run_not_loaded_go_to_a_worker_thread(managers):
    a, b = managers
    assert step(a, 1, ahead=150) is None  # 151 steps of 2 groups: over ON_LOOP_WORK
    unchanged(a, 0)
    a.window("r", 0, 198)
    assert step(a, 199) is not None
    assert step(a, 200) is None  # a snapshot every 200 steps: this commit would save one
    unchanged(a, 199)
    assert b.loaded("r") is None
    assert b.now(lambda: b.step_run("r", 200, {"val_loss": 1.0}, 0, 0)) is None
    assert b.loaded("r") is None


def test_postgres_is_never_answered_on_the_loop(database_url):
    settings = Settings(db=database_url("postgres"))
    store = open_store(settings.db)
    try:
        manager = RunManager(store, settings)
        manager.create_run({"run_id": "r", "schedule": PLATEAU, "base_lrs": [0.1]})
        manager.window("r", 0, 0)
        assert step(manager, 1) is None
        unchanged(manager, 0)
    finally:
        store.close()
