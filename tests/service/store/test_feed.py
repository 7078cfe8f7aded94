"""The global event feed: ids increasing across runs, visible in commit order, old databases numbered.

Runs on SQLite and on PostgreSQL (``TEST_DATABASE_URL``), like the contract tests.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

from lrserve.service.store import EventKind, NewEvent, open_store
from lrserve.service.store.schema import SCHEMA_VERSION, _migrate_v1
from sqlalchemy import MetaData, create_engine, text

from tests.service.store.test_contract import SPEC, advance, make


def test_ids_increase_across_runs_and_the_feed_pages_in_id_order(store):
    make(store, "a", labels={"sweep": "7"})
    make(store, "b")
    advance(store, "a", 2)
    advance(store, "b", 1)
    advance(store, "a", 1)
    feed = store.read_feed(0)
    assert [(f.run_id, f.event.seq) for f in feed] == [
        ("a", 1), ("b", 1), ("a", 2), ("a", 3), ("b", 2), ("a", 4)]
    assert [f.event.gid for f in feed] == list(range(1, 7))
    assert feed[0].labels == {"sweep": "7"} and feed[1].labels == {}
    assert [f.event.gid for f in store.read_feed(2, limit=3)] == [3, 4, 5]
    assert store.read_feed(6) == []
    assert store.last_gid() == 6
    assert [e.gid for e in store.read_events("a")] == [1, 3, 4, 6]


def test_a_rolled_back_append_leaves_no_id_taken(store):
    make(store)
    try:
        with store.lock_run("r1") as tx:
            tx.append_events([NewEvent(EventKind.CONTROL, 1, {})])
            raise ZeroDivisionError
    except ZeroDivisionError:
        pass
    advance(store, "r1", 1)
    assert [f.event.gid for f in store.read_feed(0)] == [1, 2]


def test_an_id_never_becomes_visible_before_a_smaller_one(store):
    """A takes an id and stays open; B (another run) appends meanwhile. With a sequence, B
    could commit first and a reader at B's id would skip A's for ever. The counter row makes
    B wait for A's commit, so the feed shows nothing new until A commits, then A before B."""
    make(store, "a")
    make(store, "b")
    seen = store.last_gid()
    holding, release = threading.Event(), threading.Event()

    def open_a():
        with store.lock_run("a") as tx:
            tx.append_events([NewEvent(EventKind.CONTROL, 1, {"who": "a"})])
            tx.read_events()  # writes the held event: its id is taken now (else at COMMIT)
            holding.set()
            release.wait(30)

    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(open_a)
        assert holding.wait(30)
        b = pool.submit(advance, store, "b", 1)
        b_done = threading.Event()
        b.add_done_callback(lambda _: b_done.set())
        assert not b_done.wait(0.5)  # B waits on the counter row (SQLite: on the file's write lock)
        assert store.read_feed(seen) == []
        release.set()
        a.result()
        b.result()
    feed = store.read_feed(seen)
    assert [(f.run_id, f.event.payload) for f in feed] == [("a", {"who": "a"}), ("b", {"n": 1})]
    assert feed[0].event.gid < feed[1].event.gid


def test_an_old_database_gets_ids_in_the_order_its_events_were_written(store_url):
    """A version-1 database (no ``gid``) is numbered on opening; new events continue after."""
    engine = create_engine(store_url)
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    try:
        with engine.begin() as conn:
            _migrate_v1(conn)
            conn.execute(text("CREATE TABLE schema_version (id INTEGER PRIMARY KEY, version INTEGER)"))
            conn.execute(text("INSERT INTO schema_version VALUES (1, 1)"))
            tables = MetaData()
            tables.reflect(conn)
            for run_id in ("a", "b"):
                conn.execute(tables.tables["runs"].insert().values(
                    run_id=run_id, spec="{}", status="active", horizon=0, last_seq=2,
                    created_at=t0, updated_at=t0))
            conn.execute(tables.tables["events"].insert(), [
                {"run_id": "a", "seq": 1, "kind": "created", "step": None, "payload": "{}", "at": t0},
                {"run_id": "b", "seq": 1, "kind": "created", "step": None, "payload": "{}",
                 "at": t0 + timedelta(seconds=1)},
                {"run_id": "a", "seq": 2, "kind": "control", "step": 1, "payload": "{}",
                 "at": t0 + timedelta(seconds=2)},
                {"run_id": "b", "seq": 2, "kind": "control", "step": 1, "payload": "{}",
                 "at": t0 + timedelta(seconds=3)},
            ])
    finally:
        engine.dispose()
    for _ in range(2):  # the second opening finds nothing left to do
        store = open_store(store_url)
        try:
            assert [(f.run_id, f.event.seq, f.event.gid) for f in store.read_feed(0)] == [
                ("a", 1, 1), ("b", 1, 2), ("a", 2, 3), ("b", 2, 4)]
            assert store.last_gid() == 4
        finally:
            store.close()
    store = open_store(store_url)
    try:
        make(store, "c", spec=SPEC)
        assert store.read_feed(4)[0].event.gid == 5
    finally:
        store.close()
    engine = create_engine(store_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version FROM schema_version")).scalar_one() == SCHEMA_VERSION
    finally:
        engine.dispose()
