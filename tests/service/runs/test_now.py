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

import pytest
from lrserve.service.runs.manager import RunManager
from lrserve.service.settings import Settings
from lrserve.service.store.sql import SQLITE_BUSY_TIMEOUT_S, SQLITE_WAL, begin_sqlite

from tests.service.runs.conftest import transactions
from tests.specs import plateau_on_any_rise

PLATEAU = plateau_on_any_rise()


@pytest.fixture
def settings(database_url) -> Settings:
    return Settings(db=database_url("sqlite"), snapshot_every=200, max_jump=500, max_ahead=500)


@pytest.fixture
def managers(settings, open_manager) -> list[RunManager]:
    managers = [open_manager(settings) for _ in range(2)]
    managers[0].create_run({"run_id": "r", "schedule": PLATEAU, "base_lrs": [0.1, 0.2]})
    managers[0].window("r", 0, 0)
    return managers


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


def test_the_loops_writes_set_the_busy_timeout_once_and_a_threads_write_waits_again(managers, settings):
    """In WAL mode SQLite waits (its busy handler) only to begin a transaction: the loop's writes
    leave the kept writer's busy timeout at 0 for the next one (before: a PRAGMA before and after
    each write's BEGIN), and a worker thread's write on it waits for another process's write
    slot again, as any write through the pool does."""
    a, _ = managers
    assert step(a, 1) is not None
    writer = a.store._writer[0].driver_connection
    statements: list[str] = []
    writer.set_trace_callback(statements.append)
    for k in range(2, 6):
        assert step(a, k) is not None
    assert not [s for s in statements if "busy_timeout=" in s]  # before: 8
    assert writer.execute("PRAGMA busy_timeout").fetchone() == (0,)
    other = sqlite3.connect(settings.db.removeprefix("sqlite:///"), isolation_level=None,
                            check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another process's writer, done in a moment
    threading.Timer(0.3, lambda: other.execute("ROLLBACK")).start()
    try:
        assert a.step_run("r", 6, {"val_loss": 1.0}, 0, 0).start == 6  # waited (0 would refuse it)
    finally:
        other.close()
    assert a.store._writer[0].driver_connection is writer
    assert writer.execute("PRAGMA busy_timeout").fetchone() == (30_000,)
    assert step(a, 7) is not None  # and the loop's next write sets it to 0 again
    assert [s for s in statements if "busy_timeout=" in s] == ["PRAGMA busy_timeout=30000",
                                                               "PRAGMA busy_timeout=0"]


def test_a_file_not_in_wal_mode_gets_its_busy_timeout_back_at_once(tmp_path):
    """With a rollback journal a COMMIT waits for readers: the loop's begin puts the timeout back."""
    conn = sqlite3.connect(tmp_path / "x.db", isolation_level=None, timeout=SQLITE_BUSY_TIMEOUT_S)
    conn.execute("CREATE TABLE t (x)")
    info: dict[str, bool] = {SQLITE_WAL: False}
    begin_sqlite(conn, "IMMEDIATE NOW", info)
    conn.execute("INSERT INTO t VALUES (1)")
    conn.execute("COMMIT")
    assert conn.execute("PRAGMA busy_timeout").fetchone() == (30_000,)
    assert info == {SQLITE_WAL: False}
    conn.close()


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


def test_postgres_is_never_answered_on_the_loop(database_url, open_manager):
    manager = open_manager(Settings(db=database_url("postgres")))
    manager.create_run({"run_id": "r", "schedule": PLATEAU, "base_lrs": [0.1]})
    manager.window("r", 0, 0)
    assert step(manager, 1) is None
    unchanged(manager, 0)


# -- windows_now: the event loop's group commit (GET .../lr of steps not final yet) -----------

ONE_CYCLE = {"type": "OneCycleLR", "max_lr": 0.5, "total_steps": 8}
RUNS = ["g0", "g1", "g2", "g3"]


@pytest.fixture
def grouped(managers) -> RunManager:
    """``managers[0]`` with four more runs loaded at step 0 (OneCycleLR: it fails past step 8)."""
    a = managers[0]
    for run_id in RUNS:
        a.create_run({"run_id": run_id, "schedule": ONE_CYCLE, "base_lrs": [0.1, 0.2],
                      "base_momentums": [0.9, 0.8]})
        a.window(run_id, 0, 0)
    return a


def test_windows_asked_together_commit_in_one_transaction(grouped, managers, monkeypatch):
    a, b = managers
    opened = transactions(a, monkeypatch)
    asks = [("g0", 1, 0), ("g1", 2, 1), ("g2", 1, 3), ("g3", 0, 0), ("g0", 1, 0)]  # g3: final; g0 twice
    windows = a.windows_now(asks, most_values=4096)
    assert opened == [["g0", "g1", "g2"]]  # one transaction for every run with steps to commit
    for (run_id, step, ahead), window in zip(asks, windows, strict=True):
        assert window is not None and not isinstance(window, BaseException)
        assert (window.run_id, window.start, len(window.values)) == (run_id, step, ahead + 1)
        assert window.values == b.window(run_id, step, ahead).values  # durable: another process reads them
    assert [b.store.read_run(r).horizon for r in RUNS] == [1, 3, 4, 0]


def test_one_asks_failure_before_writing_leaves_the_others_standing(grouped, managers):
    a, b = managers
    # g0: OneCycleLR has no step 9; g2: far (its own commit reads the stored horizon); g3: negative
    asks = [("g0", 9, 0), ("g1", 3, 0), ("g2", 50_000, 0), ("g3", -1, 0)]
    failed, window, too_far, negative = a.windows_now(asks, most_values=4096)
    assert type(failed).__name__ == "ScheduleError" and type(negative).__name__ == "InvalidInput"
    assert too_far is None
    assert window is not None and not isinstance(window, BaseException) and window.start == 3
    assert [b.store.read_run(r).horizon for r in ("g0", "g1", "g2")] == [0, 3, 0]
    assert a.loaded("g0") is None  # dropped, as a failed commit drops it: a worker thread reloads
    assert a.window("g0", 8, 0).start == 8  # steps up to the schedule's end are still served


def test_a_failed_transaction_acknowledges_none_of_its_windows(grouped, managers, monkeypatch):
    a, b = managers
    from lrserve.service.errors import StoreUnavailable

    def broken(cursor, txs):
        raise StoreUnavailable("the disk is full")

    monkeypatch.setattr(a.store, "_write_held", broken)
    outcomes = a.windows_now([("g0", 1, 0), ("g1", 2, 0)], most_values=4096)
    assert [type(o).__name__ for o in outcomes] == ["StoreUnavailable"] * 2
    assert [b.store.read_run(r).horizon for r in ("g0", "g1")] == [0, 0]
    assert a.loaded("g0") is None and a.loaded("g1") is None  # computed ahead of the store: reload
    monkeypatch.undo()
    assert a.windows_now([("g0", 1, 0)], most_values=4096) == [None]  # not loaded: a worker thread's work
    a.state("g0"), a.state("g1")  # loaded again (as that thread would): the loop commits them now
    again = a.windows_now([("g0", 1, 0), ("g1", 2, 0)], most_values=4096)
    assert [b.store.read_run(r).horizon for r in ("g0", "g1")] == [1, 2]
    assert [w.values for w in again] == [b.window("g0", 1, 0).values, b.window("g1", 2, 0).values]  # type: ignore[union-attr]


def test_windows_that_would_wait_are_left_to_a_worker_thread(grouped, managers, settings):
    a, b = managers
    assert a.windows_now([("nope", 1, 0), ("g1", 1, 5000)], most_values=4096) == [None] * 2  # not loaded; big
    with a.state("g1").lock:  # another thread holds g1: g0 goes through alone
        first, held = a.windows_now([("g0", 1, 0), ("g1", 1, 0)], most_values=4096)
    assert held is None and first is not None
    other = sqlite3.connect(settings.db.removeprefix("sqlite:///"), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # the write slot, taken by another process
    try:
        assert a.windows_now([("g0", 2, 0), ("g2", 1, 0)], most_values=4096) == [None, None]
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert [b.store.read_run(r).horizon for r in ("g0", "g1", "g2")] == [1, 0, 0]
    assert [a.loaded(r).horizon for r in ("g0", "g1", "g2")] == [1, 0, 0]  # type: ignore[union-attr]
