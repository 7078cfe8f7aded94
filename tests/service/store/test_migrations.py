"""Databases written by older lrserve versions open, upgraded in place, with nothing lost.

``assets/lrserve_v1.sqlite`` was written by lrserve at schema version 1 (commit a845a68):
run ``old-run`` (labels ``sweep=7``, StepLR step_size 3, gamma 0.5, two groups) stepped
to 8, scaled by 0.5 at step 5 and held at step 7, a ``loss`` metric at step 3. Never
regenerate it: it stands for every database already out there.
"""

from __future__ import annotations

import shutil
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import pytest
from lrserve.service.runs.manager import RunManager
from lrserve.service.settings import Settings
from lrserve.service.store import open_store
from lrserve.service.store.events import EventKind, NewEvent
from lrserve.service.store.schema import MIGRATIONS, SCHEMA_VERSION, _migrate_v1, _v1_metadata, schema_version
from sqlalchemy import create_engine, insert, inspect, select, text

from tests.conftest import BACKENDS

OLD_FILE = Path(__file__).parent / "assets" / "lrserve_v1.sqlite"
OLD_LRS = [[0.1, 0.01], [0.1, 0.01], [0.1, 0.01], [0.05, 0.005], [0.05, 0.005], [0.025, 0.0025],
           [0.0125, 0.00125], [0.0125, 0.00125], [0.0125, 0.00125]]


def _version(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT version FROM schema_version")).scalar_one()
    finally:
        engine.dispose()


def test_a_v1_sqlite_file_opens_upgraded_with_its_log_intact(tmp_path):
    path = tmp_path / "old.db"
    shutil.copy(OLD_FILE, path)
    url = f"sqlite:///{path}"
    assert _version(url) == 1
    store = open_store(url)
    try:
        assert _version(url) == SCHEMA_VERSION == len(MIGRATIONS)
        record = store.read_run("old-run")
        assert record.labels == {"sweep": "7"} and record.horizon == 8 and record.status == "held"
        assert record.last_seen is None  # never heard from since the upgrade
        events = store.read_events("old-run")
        assert [(e.kind, e.step) for e in events] == [
            (EventKind.CREATED, 0), (EventKind.CONTROL, 5), (EventKind.CONTROL, 7), (EventKind.STATUS, 7)]
        assert {(e.actor, e.reason) for e in events} == {("server", None)}  # who acted was never recorded
        manager = RunManager(store, Settings(db=url))
        assert [list(lrs) for lrs, _ in manager.values_between("old-run", 0, 8)] == OLD_LRS
        assert [list(v) for v in manager.history("old-run", 100).lrs] == OLD_LRS  # no value chunks: replayed
        assert store.read_lrs("old-run", [0, 8]) == {}
        assert store.read_metrics("old-run") == {"loss": [(3, 0, 0.5)]}
        manager.control("old-run", {"action": "resume"}, None, actor="ops-alice", reason="back on")
        manager.window("old-run", 9, 0)
        tail = store.read_events("old-run", after_seq=4)
        assert [(e.kind, e.actor, e.reason) for e in tail] == [
            (EventKind.CONTROL, "ops-alice", "back on"), (EventKind.STATUS, "ops-alice", "back on")]
    finally:
        store.close()
    reopened = open_store(url)  # the upgrade ran once; opening again changes nothing
    try:
        assert len(reopened.read_events("old-run")) == 6
    finally:
        reopened.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_v1_schema_upgrades_on_every_backend(backend, database_url):
    url = database_url(backend)
    engine = create_engine(url)
    at = datetime(2026, 1, 2, tzinfo=timezone.utc)
    try:
        with engine.begin() as conn:  # a database as lrserve v1 left it
            _migrate_v1(conn)
            schema_version.create(conn)
            conn.execute(insert(schema_version).values(id=1, version=1))
            v1 = _v1_metadata().tables
            conn.execute(insert(v1["runs"]).values(run_id="r", spec="{}", status="active", horizon=0,
                                                   last_seq=1, created_at=at, updated_at=at))
            conn.execute(insert(v1["events"]).values(run_id="r", seq=1, kind="created", step=0,
                                                     payload="{}", at=at))
        with engine.connect() as conn:
            assert "actor" not in {c["name"] for c in inspect(conn).get_columns("events")}
    finally:
        engine.dispose()
    store = open_store(url)
    try:
        [event] = store.read_events("r")
        assert (event.actor, event.reason, event.at) == ("server", None, at)
        assert store.read_run("r").last_seen is None
    finally:
        store.close()
    assert _version(url) == SCHEMA_VERSION


def test_the_v2_step_is_idempotent(database_url):
    """A column already there (a half-applied step, e.g. on a backend without DDL in
    transactions) is left alone, not added twice."""
    url = database_url("sqlite")
    open_store(url).close()
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            MIGRATIONS[1](conn)
            columns = [c["name"] for c in inspect(conn).get_columns("runs")]
            assert columns.count("last_seen") == 1
            assert conn.execute(select(schema_version.c.version)).scalar_one() == SCHEMA_VERSION
    finally:
        engine.dispose()


def _v5_sqlite_file(url: str) -> None:
    """A SQLite database as lrserve at schema v5 left it: run ``r`` with events of gids 1 and 2,
    and the ``event_ids`` counter at 5 (a deleted run's events took 3 to 5)."""
    engine = create_engine(url)
    at = datetime(2026, 1, 2, tzinfo=timezone.utc)
    try:
        with engine.begin() as conn:
            for step in MIGRATIONS[:5]:
                step(conn)
            schema_version.create(conn)
            conn.execute(insert(schema_version).values(id=1, version=5))
            conn.execute(text("INSERT INTO runs (run_id, spec, status, horizon, last_seq, created_at, "
                              "updated_at) VALUES ('r', '{}', 'active', 0, 2, :at, :at)"), {"at": at})
            for seq in (1, 2):
                conn.execute(text("INSERT INTO events (run_id, seq, kind, step, payload, at, gid) VALUES "
                                  "('r', :seq, 'control', 0, '{}', :at, :seq)"), {"seq": seq, "at": at})
            conn.execute(text("UPDATE event_ids SET last_gid = 5"))
    finally:
        engine.dispose()


def test_a_v5_sqlite_file_numbers_events_above_every_id_its_counter_gave_out(tmp_path):
    """Schema v6 on SQLite: events number themselves, one above the last id given out; the
    counter's last id is the floor (ids 3 to 5 went to events since deleted: not given again),
    and the counter's table is gone."""
    url = f"sqlite:///{tmp_path / 'v5.db'}"
    _v5_sqlite_file(url)
    store = open_store(url)
    try:
        assert _version(url) == SCHEMA_VERSION
        assert store.last_gid() == 5
        with store.lock_run("r") as tx:
            tx.append_events([NewEvent(EventKind.CONTROL, 1, {"action": "hold"})])
        assert [e.gid for e in store.read_events("r")] == [1, 2, 6]
        assert store.last_gid() == 6
    finally:
        store.close()
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            assert "event_ids" not in inspect(conn).get_table_names()
    finally:
        engine.dispose()


def test_a_v5_process_still_on_an_upgraded_sqlite_file_fails_its_appends_cleanly(tmp_path):
    """A process of the version before, still running on the file another upgraded, numbers its
    events from the counter (``UPDATE event_ids ... RETURNING``, its statement): the table is
    gone, so its append fails (a 503 there, the transaction rolled back) instead of giving out
    an id twice."""
    url = f"sqlite:///{tmp_path / 'v5.db'}"
    _v5_sqlite_file(url)
    old = sqlite3.connect(tmp_path / "v5.db", isolation_level=None)
    try:
        old.execute("BEGIN IMMEDIATE")
        assert old.execute("UPDATE event_ids SET last_gid = last_gid + 1 WHERE id = 1 RETURNING last_gid"
                           ).fetchone() == (6,)  # its statement, prepared before the upgrade
        old.execute("ROLLBACK")
        open_store(url).close()  # the upgrade
        old.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError, match="no such table: event_ids"):
            old.execute("UPDATE event_ids SET last_gid = last_gid + 1 WHERE id = 1 RETURNING last_gid")
        old.execute("ROLLBACK")
    finally:
        old.close()


def test_a_v5_process_deleting_a_run_on_an_upgraded_sqlite_file_raises_the_floor(tmp_path):
    """A process of the version before still deletes runs on the upgraded file (its statements
    know no floor): the file's own trigger raises the floor to the ids its DELETE removed, so the
    next event does not take an id a reader of the feed has already passed."""
    url = f"sqlite:///{tmp_path / 'v5.db'}"
    _v5_sqlite_file(url)
    store = open_store(url)  # the upgrade
    try:
        store.create_run("top", {"schedule": {"type": "StepLR", "step_size": 3}}, {},
                         NewEvent(EventKind.CREATED, 0, {}))
        (top,) = [e.gid for e in store.read_events("top")]
        assert top == 6 and store.last_gid() == 6
        old = sqlite3.connect(tmp_path / "v5.db", isolation_level=None)
        try:  # the older process's delete_run: its tables' rows, no floor
            old.execute("BEGIN IMMEDIATE")
            old.execute("DELETE FROM events WHERE run_id = 'top'")
            old.execute("DELETE FROM runs WHERE run_id = 'top'")
            old.execute("COMMIT")
        finally:
            old.close()
        assert store.last_gid() == 6
        with store.lock_run("r") as tx:
            tx.append_events([NewEvent(EventKind.CONTROL, 1, {"action": "hold"})])
        assert [e.gid for e in store.read_events("r")][-1] == 7
    finally:
        store.close()
