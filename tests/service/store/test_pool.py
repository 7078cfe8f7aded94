"""A process's database connections: few on PostgreSQL, however many requests are in flight;
on SQLite, none that would create the database again.

The server is shared (its ``max_connections``, 100 by default, serves every replica and
everything else on it): a process holds at most ``POSTGRES_POOL_SIZE +
POSTGRES_POOL_OVERFLOW`` connections, and work beyond that waits for one instead of failing.
"""

from __future__ import annotations

import os
import threading

import pytest
from lrserve.service.errors import StoreUnavailable
from lrserve.service.store import POSTGRES_POOL_OVERFLOW, POSTGRES_POOL_SIZE, open_store
from lrserve.service.store.events import EventKind, NewEvent
from sqlalchemy import event

THREADS = 40  # starlette's worker threads per process: what one process may have in flight at once


def test_many_threads_share_a_few_connections_and_all_get_through(database_url):
    store = open_store(database_url("postgres"))
    try:
        store.create_run("r", {"schedule": {"type": "StepLR"}}, {}, NewEvent(EventKind.CREATED, 0, {}))
        start = threading.Barrier(THREADS)
        most = [0]
        errors: list[BaseException] = []
        pool = store._engine.pool
        opened = [0]
        event.listen(store._engine, "connect", lambda *_: opened.__setitem__(0, opened[0] + 1))

        def work() -> None:
            start.wait()
            try:
                for step in range(1, 6):
                    store.read_run("r")
                    store.add_barrier_reports("r", step, {threading.get_ident() % 1000: {"loss": 1.0}})
                    most[0] = max(most[0], pool.checkedout())
            except BaseException as exc:  # noqa: BLE001 - the test reports them
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert 1 <= most[0] <= POSTGRES_POOL_SIZE + POSTGRES_POOL_OVERFLOW < THREADS
        # and no session opened twice: the pool closed a connection beyond its size as soon as it
        # came back to a full pool, so a load of more threads than its size opened one per turn
        assert 1 <= opened[0] <= POSTGRES_POOL_SIZE + POSTGRES_POOL_OVERFLOW == store.connections
    finally:
        store.close()


def test_a_new_sqlite_connection_never_creates_the_database_again(tmp_path):
    """After the file is deleted, a connection the pool opens anew (a busy pool, the WAL
    checkpoint thread's) fails instead of creating an empty database at the path, which a
    restart would have taken for the run history (the guard names the fault on writes)."""
    db = tmp_path / "lrserve.db"
    store = open_store(f"sqlite:///{db}")
    try:
        store.create_run("r", {"schedule": {"type": "StepLR"}}, {}, NewEvent(EventKind.CREATED, 0, {}))
        os.remove(db)
        store._engine.dispose()  # every later read or write needs a new connection
        with pytest.raises(StoreUnavailable):
            store.read_run("r")
        with pytest.raises(StoreUnavailable, match="deleted or moved"):
            store.create_run("s", {"schedule": {"type": "StepLR"}}, {}, NewEvent(EventKind.CREATED, 0, {}))
        assert not db.exists()
    finally:
        store.close()


def test_a_new_sqlite_connection_never_reads_a_file_put_in_the_database_s_place(tmp_path):
    """After the file is replaced by another database (here: one without the run), a connection
    the pool opens anew is refused (503), not read: it would answer the stored run as missing
    (a ``404`` to a job's step, as a fresh clone's CI once saw). The connections already open
    read the file the store opened."""
    db, other = tmp_path / "lrserve.db", tmp_path / "other.db"
    open_store(f"sqlite:///{other}").close()  # an lrserve database with no run
    store = open_store(f"sqlite:///{db}")
    try:
        store.create_run("r", {"schedule": {"type": "StepLR"}}, {}, NewEvent(EventKind.CREATED, 0, {}))
        assert store.checkpointer is not None
        store.checkpointer.close()  # its thread would take (and give back) a pooled connection
        pool = store._engine.pool
        held = [store._engine.raw_connection() for _ in range(pool.checkedin())]
        assert pool.checkedin() == 0
        os.replace(other, db)
        try:
            with pytest.raises(StoreUnavailable, match="replaced by another file"):
                store.read_run("r")  # every pooled connection is out: the pool opens one
        finally:
            for connection in held:
                connection.close()
        assert store.read_run("r").run_id == "r"  # on a connection opened before: the store's file
        store._engine.dispose()
        with pytest.raises(StoreUnavailable, match="replaced by another file"):
            store.read_run("r")
        assert store.checkpointer.checkpoint() is None  # the WAL thread's connection: refused, logged
    finally:
        store.close()


def test_a_store_names_how_many_write_transactions_it_runs_at_once(database_url):
    """``connections``: PostgreSQL commits on as many connections as its pool holds; an SQLite
    file has one writer (its pool's other connections serve readers)."""
    for backend, most in (("postgres", POSTGRES_POOL_SIZE + POSTGRES_POOL_OVERFLOW), ("sqlite", 1)):
        store = open_store(database_url(backend))
        try:
            assert (store.one_writer, store.connections) == (backend == "sqlite", most)
        finally:
            store.close()
