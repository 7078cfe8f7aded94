"""What an engine snapshot holds SQLite's write slot for: every run's commit waits for it.

Before: a 1024-group run's snapshot wrote its 8 MB value chunk in one transaction, and its
COMMIT ran SQLite's WAL checkpoint (the log past 1,000 pages), 40-120 ms with the slot
held. Now the chunk goes in pieces of at most ``CHUNK_PIECE_BYTES``, one transaction each,
and checkpoints run in a thread of the store (``service/store/wal.py``), never in a COMMIT.
"""

from __future__ import annotations

import os
import time
from array import array

import pytest
from lrserve.service.runs.manager import RunManager
from lrserve.service.settings import Settings
from lrserve.service.store import open_store
from lrserve.service.store.base import ValueChunk, pack_lrs
from lrserve.service.store.sql import CHUNK_PIECE_BYTES
from lrserve.service.store.wal import WAL_KEEP_BYTES
from sqlalchemy import event, text

from tests.conftest import BACKENDS

GROUPS = 300  # 2,400 bytes a step: a 1,000-step chunk is 2.4 MB, three pieces


@pytest.fixture(params=BACKENDS)
def url(request, database_url):
    return database_url(request.param)


def test_a_snapshots_value_chunk_is_written_in_bounded_transactions(url):
    settings = Settings(db=url)  # a snapshot every 1000 steps
    store = open_store(url)
    try:
        manager = RunManager(store, settings)
        manager.create_run({"run_id": "wide", "schedule": {"type": "StepLR", "step_size": 7},
                            "base_lrs": [0.1 + i / 1000 for i in range(GROUPS)]})
        written: list[int] = []  # bytes of value chunks per committed write transaction
        carried = [0]

        def before(_conn, _cursor, statement, params, _context, _many):
            if "value_chunks" in statement and "INSERT" in statement:
                items = params.values() if isinstance(params, dict) else params
                carried[0] += sum(len(getattr(v, "obj", v)) for v in items  # psycopg wraps bytes
                                  if isinstance(getattr(v, "obj", v), (bytes, memoryview)))

        def committed(_conn):
            if carried[0]:
                written.append(carried[0])
            carried[0] = 0

        event.listen(store._engine, "before_cursor_execute", before)
        event.listen(store._engine, "commit", committed)
        served = {}
        for start in range(0, 2_400, 400):  # across two snapshots
            window = manager.window("wide", start, 399)
            served.update(zip(range(start, start + 400), (v[0] for v in window.values), strict=True))
        assert len(written) >= 2 * 3  # before: one transaction per snapshot, 2.4 MB
        assert max(written) <= CHUNK_PIECE_BYTES
        assert sum(written) >= 2_000 * GROUPS * 8
        stored = store.read_lrs("wide", list(served))  # every step of both chunks, as served
        assert {step: stored[step] for step in stored} == {step: served[step] for step in stored}
        assert set(range(0, 2_001)) <= set(stored)
    finally:
        store.close()


def test_pieces_of_a_chunk_cover_its_steps_and_bytes():
    lrs = pack_lrs(array("d", [float(i) for i in range(10 * 3)]))
    chunk = ValueChunk(first_step=5, steps=10, groups=3, lrs=lrs)
    pieces = chunk.pieces(50)  # two steps (48 bytes) a piece
    assert [(p.first_step, p.steps) for p in pieces] == [(5, 2), (7, 2), (9, 2), (11, 2), (13, 2)]
    assert b"".join(p.lrs for p in pieces) == lrs
    assert chunk.pieces(1) == [ValueChunk(5 + i, 1, 3, lrs[i * 24:(i + 1) * 24]) for i in range(10)]
    assert chunk.pieces(10**9) == [chunk]


def test_no_commit_runs_a_checkpoint_a_thread_of_the_store_does(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/wal.db")
    try:
        with store._engine.connect() as conn:  # before: 1000 (SQLite's default, in the COMMIT)
            assert conn.execute(text("PRAGMA wal_autocheckpoint")).scalar() == 0
        manager = RunManager(store, Settings(db=f"sqlite:///{tmp_path}/wal.db"))
        manager.create_run({"run_id": "r", "schedule": {"type": "StepLR", "step_size": 7},
                            "base_lrs": [0.1] * 64})
        for start in range(0, 2_100, 300):
            manager.window("r", start, 299)
        checkpointer = store.checkpointer
        assert checkpointer is not None
        deadline = time.monotonic() + 30
        while checkpointer.checkpoints == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert checkpointer.checkpoints >= 1  # within ``every_s`` of the writes, by itself
        # Stop the thread first (a checkpoint it is running ends before): on a busy machine the
        # writes outlast ``every_s``, so another is due after them, and two checkpoints at once
        # make the second answer SQLite's busy=1 (-1, -1), however the writes are signalled.
        thread = checkpointer._thread
        checkpointer.close()
        assert thread is not None and not thread.is_alive()
        busy, log_pages, copied = checkpointer.checkpoint() or (1, -1, -2)
        assert busy == 0 and log_pages == copied  # the whole log is in the database file
    finally:
        store.close()


def test_the_log_starts_again_under_a_steady_stream_of_commits(tmp_path):
    """A bug hunt's one client stepping one run grew the log by 30 MB a second, without end: a
    passive checkpoint copies the frames there when it starts, commits land while it copies,
    so the writer never found the log all copied and never started it again. Where the log
    has grown past ``RESTART_PAGES``, another checkpoint holds the write slot; and the
    file is cut back to ``WAL_KEEP_BYTES`` when the log starts again. The defaults: commits as
    fast as a thread makes them, until the file is cut back (however slow the machine: it
    takes ``WAL_KEEP_BYTES`` of commits first), or has grown past 16 times it (the tree before:
    in 2-8 s)."""
    db = tmp_path / "steady.db"
    store = open_store(f"sqlite:///{db}")
    try:
        manager = RunManager(store, Settings(db=f"sqlite:///{db}"))
        manager.create_run({"run_id": "r", "schedule": {"type": "StepLR", "step_size": 7}, "base_lrs": [0.1]})
        wal, most, step, cut_back = f"{db}-wal", 0, 0, False
        deadline = time.monotonic() + 120
        while not cut_back and most < 16 * WAL_KEEP_BYTES and time.monotonic() < deadline:
            step += 1
            manager.step_run("r", step, {"loss": 1.0}, 0, 0)
            if step % 20 == 0:
                size = os.path.getsize(wal)
                cut_back = most > WAL_KEEP_BYTES and size <= WAL_KEEP_BYTES
                most = max(most, size)
        assert cut_back, f"the log grew to {most / 2**20:.0f} MiB in {step} commits and never started again"
        manager.close()
    finally:
        store.close()


def test_the_log_starts_again_with_two_processes_writing_and_a_reader_reading_all_along(tmp_path):
    """Two stores on one file (as two server processes: a write slot each) commit all along,
    and a reader reads a growing history back to back: the checkpoint that holds one process's
    write slot must keep the other's writers out too, and wait for the readers of the old log
    (``RESTART``, at most ``RESTART_WAIT_MS``); a passive one held the log growing (964 MiB
    in 13 s with two processes)."""
    import threading

    db = tmp_path / "shared.db"
    url = f"sqlite:///{db}"
    stores = [open_store(url), open_store(url)]
    managers = [RunManager(store, Settings(db=url)) for store in stores]
    stop = threading.Event()
    errors: list[BaseException] = []

    def steps(manager: RunManager, run_id: str) -> None:
        manager.create_run({"run_id": run_id, "schedule": {"type": "StepLR", "step_size": 7},
                            "base_lrs": [0.1]})
        k = 0
        try:
            while not stop.is_set():
                k += 1
                manager.step_run(run_id, k, {"loss": 1.0}, 0, 0)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    def reads() -> None:
        while not stop.is_set():
            stores[0].read_metrics("a")

    threads = [threading.Thread(target=steps, args=(managers[0], "a")),
               threading.Thread(target=steps, args=(managers[1], "b")), threading.Thread(target=reads)]
    for thread in threads:
        thread.start()
    try:
        wal, most, cut_back = f"{db}-wal", 0, False
        deadline = time.monotonic() + 120
        while not cut_back and most < 16 * WAL_KEEP_BYTES and time.monotonic() < deadline and not errors:
            time.sleep(0.05)
            if os.path.exists(wal):
                size = os.path.getsize(wal)
                cut_back = most > WAL_KEEP_BYTES and size <= WAL_KEEP_BYTES
                most = max(most, size)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        for manager, store in zip(managers, stores, strict=True):
            manager.close()
            store.close()
    assert not errors, errors
    assert cut_back, f"the log grew to {most / 2**20:.0f} MiB and never started again"


def _checkpointing(path):
    """A store whose checkpoint thread runs (told of a write), and the thread."""
    store = open_store(f"sqlite:///{path}")
    checkpointer = store.checkpointer
    assert checkpointer is not None
    checkpointer.wrote()
    thread = checkpointer._thread
    assert thread is not None and thread.is_alive()
    return store, thread


def test_closing_the_store_stops_its_checkpoint_thread(tmp_path):
    store, thread = _checkpointing(tmp_path / "closed.db")
    store.close()
    assert not thread.is_alive()


def test_a_store_nobody_closed_leaves_no_checkpoint_thread(tmp_path):
    import gc
    import weakref

    store, thread = _checkpointing(tmp_path / "left.db")
    engine = store._engine
    gone = weakref.ref(store)
    del store
    gc.collect()
    assert gone() is None
    thread.join(15)  # it notices within its 5 s wait
    assert not thread.is_alive()
    engine.dispose()


def test_writes_while_a_checkpoint_is_due_do_not_signal_it_again(tmp_path):
    """Each commit tells the checkpointer it wrote; while a checkpoint is due already (the thread
    gathers ``every_s`` of writes, then clears the signal and copies) the signal is left as it
    is: no lock and notify per commit. A write after the clear signals again."""
    import threading

    from lrserve.service.store.wal import Checkpointer

    store = open_store(f"sqlite:///{tmp_path}/signal.db")
    checkpointer = Checkpointer(store._engine, store, every_s=3600)  # gathers for an hour
    signals = []

    class Counted(threading.Event):
        def set(self) -> None:
            signals.append(1)
            super().set()

    checkpointer._wrote = Counted()
    try:
        for _ in range(20):
            checkpointer.wrote()
        assert len(signals) == 1  # before: 20
        checkpointer._wrote.clear()  # as the due checkpoint does before it copies
        checkpointer.wrote()
        assert len(signals) == 2
    finally:
        checkpointer.close()
        store.close()
