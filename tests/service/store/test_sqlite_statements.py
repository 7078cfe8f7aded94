"""SQLite's hot writes, statement by statement: what a metric write and a control's commit send.

Every statement after a pause costs SQLite's own work and the driver's Python around it (the
figure-8 writes, issue 15's target 2), so each is counted here through sqlite3's trace of the
connection: ``BEGIN IMMEDIATE`` and ``COMMIT`` included.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from lrserve.service.errors import RunNotFound, StoreUnavailable
from lrserve.service.store import EventKind, MetricRecord, NewEvent
from lrserve.service.store.schema import UTCDateTime
from lrserve.service.store.sql import _SQLITE_NUMBERED_EVENT, SqlStore
from sqlalchemy import TypeDecorator, event
from sqlalchemy.dialects import sqlite


@pytest.fixture
def store(sqlite_store_with_run) -> SqlStore:
    return sqlite_store_with_run


@pytest.fixture
def statements(store) -> list[str]:
    """Every statement the store's connections run from now on (the first word of each)."""
    seen: list[str] = []

    @event.listens_for(store._engine, "connect")
    def _trace(dbapi_connection, _record) -> None:
        dbapi_connection.set_trace_callback(lambda sql: seen.append(sql.split(None, 1)[0].upper()))

    store._replace_pool()  # every connection from now on is traced, the kept writer's too
    store.append_metrics("r", [MetricRecord("warm", 0, 0, 0.0)])  # the writer connected
    seen.clear()
    return seen


def test_a_metric_write_is_its_insert_alone(store, statements):
    """The INSERT checks its run itself (the write slot keeps a delete out until COMMIT): no read
    of the run's row before it (four statements before: BEGIN, the row, the INSERT, COMMIT)."""
    assert store.append_metrics("r", [MetricRecord("loss", 1, 0, 0.5), MetricRecord("acc", 1, 0, 0.9)]) == 2
    assert statements == ["BEGIN", "INSERT", "INSERT", "COMMIT"]
    assert store.read_metrics("r") == {"acc": [(1, 0, 0.9)], "loss": [(1, 0, 0.5)], "warm": [(0, 0, 0.0)]}


def test_a_resent_metric_reads_the_run_and_counts_nothing_new(store, statements):
    assert store.append_metrics("r", [MetricRecord("loss", 1, 0, 0.5)]) == 1
    statements.clear()
    assert store.append_metrics("r", [MetricRecord("loss", 1, 0, 0.7), MetricRecord("loss", 2, 0, 0.4)]) == 1
    assert statements == ["BEGIN", "INSERT", "INSERT", "SELECT", "COMMIT"]
    assert store.read_metrics("r")["loss"] == [(1, 0, 0.5), (2, 0, 0.4)]  # the first value stands


def test_a_control_commit_numbers_its_event_in_its_insert(store, statements):
    """The event takes its global id in its own INSERT (one above the last given out: schema
    v6's ``event_gid_floor``), not from the ``event_ids`` counter's UPDATE before it (six
    statements before: BEGIN, the row, the run's UPDATE, the counter's, the INSERT, COMMIT)."""
    with store.lock_run("r") as tx:
        tx.append_events([NewEvent(EventKind.CONTROL, 1, {"action": "hold"})])
    assert statements == ["BEGIN", "SELECT", "UPDATE", "INSERT", "COMMIT"]
    with store.lock_run("r") as tx:
        tx.append_events([NewEvent(EventKind.CONTROL, 2, {"action": "hold"}),
                          NewEvent(EventKind.STATUS, 2, {"status": "held"})])
    assert [e.gid for e in store.read_events("r")] == [1, 2, 3, 4]
    assert store.last_gid() == 4


def test_the_next_event_id_is_a_seek_in_the_gid_index_not_a_scan_of_the_events(store):
    """The INSERT's ``max(events.gid)`` is SQLite's min/max optimisation on ``ux_events_gid``:
    the cost of an append does not grow with the log."""
    numbered = store._driver_sql("insert_sqlite_numbered_events", _SQLITE_NUMBERED_EVENT)  # the store's name
    raw = store._engine.raw_connection()
    try:
        plan = [row[3] for row in raw.driver_connection.execute(
            f"EXPLAIN QUERY PLAN {numbered.sql}", [None] * len(numbered.names))]
    finally:
        raw.close()
    assert "SEARCH events USING COVERING INDEX ux_events_gid" in plan, plan
    assert not any(step.startswith("SCAN") for step in plan), plan


def test_the_ids_of_a_deleted_runs_events_are_not_given_out_again(store):
    """Ids are one above the greatest given out: a run deleted with the greatest ones raises the
    floor first, so a reader of the feed that saw them never misses the next event (its id
    would have been one it had passed)."""
    store.create_run("gone", {"schedule": {"type": "StepLR", "step_size": 3}}, {},
                     NewEvent(EventKind.CREATED, 0, {}))
    with store.lock_run("gone") as tx:
        tx.append_events([NewEvent(EventKind.CONTROL, 1, {"action": "hold"})])
    assert store.last_gid() == 3
    store.delete_run("gone")
    assert store.last_gid() == 3
    with store.lock_run("r") as tx:
        tx.append_events([NewEvent(EventKind.CONTROL, 1, {"action": "hold"})])
    assert [e.gid for e in store.read_events("r")] == [1, 4]
    assert [entry.event.gid for entry in store.read_feed(0)] == [1, 4]


def test_without_the_floors_row_the_last_id_is_a_store_failure_not_a_crash(store):
    """The feed's and the webhooks' start read the last id given out: without the row it comes
    from, the database is broken, a 503 (``StoreUnavailable``) as an append says, not a 500."""
    with store._engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM event_gid_floor")
    with pytest.raises(StoreUnavailable, match="event_gid_floor"):
        store.last_gid()


@pytest.mark.parametrize("records", [[], [MetricRecord("loss", 1, 0, 0.5)]])
def test_a_metric_write_to_no_run_stores_nothing(store, records):
    with pytest.raises(RunNotFound):
        store.append_metrics("nope", records)
    assert store.read_metrics("nope") == {}
    store.create_run("nope", {"schedule": {"type": "StepLR", "step_size": 3}}, {},
                     NewEvent(EventKind.CREATED, 0, {}))
    assert store.read_metrics("nope") == {}


def test_a_write_on_the_kept_connection_checks_the_file_once(store, statements, monkeypatch, tmp_path):
    """The file's identity is checked before COMMIT, the check that keeps a write from being
    acknowledged into a file gone; before a kept connection's BEGIN a second ``stat`` told
    nothing more (the connection writes on the inode it opened). A connection taken anew is
    checked first too (one to a file gone would create an empty one), and once it is open (the
    pool's ``connect`` event: a file put in the database's place is not read)."""
    stats = []
    identity = store._guard
    assert identity is not None
    real = identity._stat
    monkeypatch.setattr(identity, "_stat", lambda: stats.append(1) or real())
    for step in range(1, 6):
        store.append_metrics("r", [MetricRecord("loss", step, 0, 0.5)])
        with store.lock_run("r") as tx:
            tx.append_events([NewEvent(EventKind.CONTROL, step, {"action": "hold"})])
    assert len(stats) == 10  # before: 20
    store._replace_pool()
    store.append_metrics("r", [MetricRecord("loss", 6, 0, 0.5)])
    assert len(stats) == 13  # before taking a connection anew, once it is open, before COMMIT
    moved = tmp_path / "moved.db"
    identity.path.rename(moved)
    with pytest.raises(StoreUnavailable, match="deleted or moved"):
        store.append_metrics("r", [MetricRecord("loss", 7, 0, 0.5)])
    moved.rename(identity.path)
    assert store.read_metrics("r")["loss"][-1] == (6, 0, 0.5)  # nothing of the refused write
    store.append_metrics("r", [MetricRecord("loss", 7, 0, 0.5)])
    assert store.read_metrics("r")["loss"][-1] == (7, 0, 0.5)


@pytest.mark.parametrize("value", [
    datetime(2026, 12, 5, 9, 58, 57, 287440, tzinfo=timezone.utc),
    datetime(2026, 1, 1, tzinfo=timezone.utc),  # no microseconds: still six digits
    datetime(5, 3, 4, 5, 6, 7, 8, tzinfo=timezone.utc),  # a year of one digit: four
    datetime(2026, 6, 1, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-5))),  # to UTC
    datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc),
])
def test_a_datetime_is_bound_as_sqlalchemy_writes_it(value):
    """``UTCDateTime``'s SQLite text in one step is SQLAlchemy's composition's, character for
    character (the stored text older and newer processes compare and order by)."""
    dialect = sqlite.dialect()
    ours = UTCDateTime().dialect_impl(dialect).bind_processor(dialect)
    sqlalchemy_s = TypeDecorator.bind_processor(UTCDateTime().dialect_impl(dialect), dialect)
    assert ours is not None and sqlalchemy_s is not None
    assert ours(value) == sqlalchemy_s(value)
    assert ours(value) == sqlalchemy_s(value)  # the same object again: the text kept
    other = value.replace(microsecond=(value.microsecond + 1) % 1_000_000)
    assert ours(other) == sqlalchemy_s(other) != sqlalchemy_s(value)  # another: its own text
    assert ours(value) == sqlalchemy_s(value)
    assert ours(None) is None
    with pytest.raises(ValueError, match="naive"):
        ours(value.replace(tzinfo=None))


@pytest.mark.parametrize("text", [
    "2026-12-05 10:00:00.123456", "0005-03-04 05:06:07.000008", "2026-12-05T10:00:00.123456",
    "2026-12-05 10:00:00", "2026-12-05 10:00:00.123456+02:00", None,
])
def test_a_datetime_is_read_as_sqlalchemy_reads_it(text):
    """``UTCDateTime``'s SQLite read of its own text in one ``fromisoformat`` is SQLAlchemy's
    composition's value, in UTC (any other text goes through that composition)."""
    dialect = sqlite.dialect()
    impl = UTCDateTime().dialect_impl(dialect)
    ours = impl.result_processor(dialect, None)
    sqlalchemy_s = TypeDecorator.result_processor(impl, dialect, None)
    assert ours is not None and sqlalchemy_s is not None
    value = ours(text)
    assert value == sqlalchemy_s(text)
    assert value is None or value.tzinfo is timezone.utc
