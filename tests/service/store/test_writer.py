"""SQLite's hot writes (commits, metric writes, barrier reports) on one kept connection.

This process's writes of the file take turns in its one write slot, so the connection a write
committed on serves the next one: no pool checkout, reset and checkin per commit. A write that
fails gives it back to the pool (rolled back), and one after the pool was replaced for a damaged
file (``_after_failure``) does not use it again.
"""

from __future__ import annotations

import sqlite3

import pytest
from lrserve.service.errors import StoreUnavailable
from lrserve.service.store import EventKind, MetricRecord, NewEvent
from lrserve.service.store.sql import SqlStore
from sqlalchemy import event


@pytest.fixture
def store(sqlite_store_with_run) -> SqlStore:
    return sqlite_store_with_run


def pool_events(store: SqlStore, pool_event: str) -> list[int]:
    """How often the store's pool sees ``pool_event`` from now on (``checkout``, ``invalidate``)."""
    seen = [0]

    def count(*_: object) -> None:
        seen[0] += 1

    event.listen(store._engine.pool, pool_event, count)
    return seen


def checkouts(store: SqlStore) -> list[int]:
    return pool_events(store, "checkout")


def commit(store: SqlStore, step: int) -> None:
    with store.lock_run("r") as tx:
        tx.append_events([NewEvent(EventKind.METRIC, step, {"values": {"loss": 1.0 / step}})])
        tx.update_run(horizon=step)


def test_the_hot_writes_keep_one_connection(store):
    commit(store, 1)
    counted = checkouts(store)
    for step in range(2, 32):
        commit(store, step)
        store.append_metrics("r", [MetricRecord("loss", step, 0, 0.5)])
        store.add_barrier_reports("r", step, {0: {"loss": 0.5}})
    assert counted[0] == 0  # before: one checkout per write (90)
    assert store.read_run("r").horizon == 31
    assert [e.step for e in store.read_events("r", 1)] == list(range(1, 32))
    assert len(store.read_metrics("r")["loss"]) == 30


def test_a_failed_write_gives_its_connection_back_and_the_next_takes_one_anew(store):
    commit(store, 1)
    counted = checkouts(store)
    with pytest.raises(RuntimeError), store.lock_run("r") as tx:
        tx.update_run(horizon=2)
        raise RuntimeError("the caller's own error")
    assert store.read_run("r").horizon == 1  # rolled back
    commit(store, 2)
    assert counted[0] == 2  # the read's, and the next write's fresh connection
    assert store.read_run("r").horizon == 2


def test_a_pool_replaced_after_damage_takes_the_kept_connection_with_it(store):
    commit(store, 1)
    with pytest.raises(StoreUnavailable):
        with store._failures():
            raise sqlite3.DatabaseError("database disk image is malformed")  # disposes the pool
    counted = checkouts(store)
    commit(store, 2)
    assert counted[0] == 1  # not the connection kept from before the damage
    assert store.read_run("r").horizon == 2


def test_a_write_refused_because_another_process_writes_discards_no_connection(store):
    from lrserve.service.store.base import WouldWait

    commit(store, 1)
    dropped = pool_events(store, "invalidate")
    other = sqlite3.connect(store._engine.url.database, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the file's write slot
        with pytest.raises(WouldWait), store.without_waiting():
            commit(store, 2)
    finally:
        other.execute("ROLLBACK")
        other.close()
    commit(store, 2)
    assert dropped[0] == 0  # before: the connection was invalidated (reopened, hooks run again)
    assert store.read_run("r").horizon == 2


def test_a_write_under_way_when_the_pool_was_replaced_does_not_keep_its_connection(store):
    commit(store, 1)
    with store.lock_run("r") as tx:  # a write under way on the kept connection...
        tx.update_run(horizon=2)
        with pytest.raises(StoreUnavailable), store._failures():  # ...while another thread meets damage
            raise sqlite3.DatabaseError("database disk image is malformed")  # disposes the pool
    assert store.read_run("r").horizon == 2
    counted = checkouts(store)
    commit(store, 3)
    assert counted[0] == 1  # before: the connection from before the damage was kept and served this write
    assert store.read_run("r").horizon == 3
