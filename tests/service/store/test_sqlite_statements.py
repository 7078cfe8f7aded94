"""SQLite's hot writes, statement by statement: what a metric write and a control's commit send.

Every statement after a pause costs SQLite's own work and the driver's Python around it (the
figure-8 writes, issue 15's target 2), so each is counted here through sqlite3's trace of the
connection: ``BEGIN IMMEDIATE`` and ``COMMIT`` included.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from lrserve.service.errors import RunNotFound, StoreUnavailable
from lrserve.service.store import EventKind, MetricRecord, NewEvent, open_store
from lrserve.service.store.sql import SqlStore
from sqlalchemy import event


@pytest.fixture
def store(database_url) -> Iterator[SqlStore]:
    opened = open_store(database_url("sqlite"))
    opened.create_run("r", {"schedule": {"type": "StepLR", "step_size": 3}}, {},
                      NewEvent(EventKind.CREATED, 0, {}))
    yield opened
    opened.close()


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
    checked first too: one to a file gone would create an empty one."""
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
    assert len(stats) == 12
    moved = tmp_path / "moved.db"
    identity.path.rename(moved)
    with pytest.raises(StoreUnavailable, match="deleted or moved"):
        store.append_metrics("r", [MetricRecord("loss", 7, 0, 0.5)])
    moved.rename(identity.path)
    assert store.read_metrics("r")["loss"][-1] == (6, 0, 0.5)  # nothing of the refused write
    store.append_metrics("r", [MetricRecord("loss", 7, 0, 0.5)])
    assert store.read_metrics("r")["loss"][-1] == (7, 0, 0.5)


@pytest.fixture
def managers(database_url):
    """Two processes' managers of one SQLite file (two stores), the run loaded in the first."""
    from lrserve.service.runs.manager import RunManager
    from lrserve.service.settings import Settings

    settings = Settings(db=database_url("sqlite"))
    stores = [open_store(settings.db) for _ in range(2)]
    made = [RunManager(store, settings) for store in stores]
    made[0].create_run({"run_id": "c", "schedule": {"type": "StepLR", "step_size": 3}, "base_lrs": [0.1]})
    made[0].window("c", 0, 2)
    yield made
    for store in stores:
        store.close()


def trace(store: SqlStore) -> list[str]:
    seen: list[str] = []

    @event.listens_for(store._engine, "connect")
    def _trace(dbapi_connection, _record) -> None:
        dbapi_connection.set_trace_callback(lambda sql: seen.append(sql.split(None, 1)[0].upper()))

    store._replace_pool()
    return seen


def control_now(manager, **action):
    return manager.now(lambda: manager.control("c", action or {"action": "scale", "factor": 0.5}, None))


def test_a_control_on_the_loop_checks_its_run_in_the_runs_update(managers):
    """On the event loop the run is loaded and the write slot held: the run's row is not read
    under the lock, the run's UPDATE checks it is still the one loaded (six statements before:
    the row's SELECT first)."""
    a, b = managers
    seen = trace(a.store)
    assert control_now(a) is not None  # connects the writer
    seen.clear()
    placed, _ = control_now(a)
    assert seen == ["BEGIN", "UPDATE", "UPDATE", "INSERT", "COMMIT"]
    assert placed == 3
    events = b.store.read_events("c")
    assert [(e.kind.value, e.step) for e in events] == [("created", 0), ("control", 3), ("control", 3)]
    assert [e.gid for e in events] == sorted(e.gid for e in events)


def test_a_control_on_the_loop_after_another_process_moved_the_run_goes_to_a_thread(managers):
    a, b = managers
    b.window("c", 0, 5)  # another process takes the run to step 5
    b.control("c", {"action": "scale", "factor": 2.0}, None)
    assert control_now(a) is None  # refused: nothing of it kept, its computed state dropped
    assert [e.kind.value for e in b.store.read_events("c")] == ["created", "control"]
    assert a.loaded("c") is None or a.loaded("c").evicted
    placed, _ = a.control("c", {"action": "scale", "factor": 0.5}, None)  # a worker thread's
    assert placed == 6
    assert [(e.kind.value, e.step) for e in b.store.read_events("c")] == [
        ("created", 0), ("control", 6), ("control", 6)]
    assert b.window("c", 6, 0).values == a.window("c", 6, 0).values


def test_a_control_on_the_loop_of_a_run_deleted_and_created_anew_keeps_nothing(managers):
    a, b = managers
    b.delete_run("c")
    b.create_run({"run_id": "c", "schedule": {"type": "StepLR", "step_size": 5}, "base_lrs": [0.3]})
    assert control_now(a) is None
    assert [e.kind.value for e in b.store.read_events("c")] == ["created"]
    placed, _ = a.control("c", {"action": "scale", "factor": 0.5}, None)
    assert placed == 1 and a.window("c", 0, 0).values == b.window("c", 0, 0).values


def test_a_created_at_stored_in_another_spelling_still_matches(managers):
    """The UPDATE's check compares ``created_at`` as text; a row whose time is spelled otherwise
    (written by another version, say) is read and compared as a time before it is refused."""
    a, b = managers
    with a.store._engine.begin() as conn:
        from sqlalchemy import text

        stored = conn.execute(text("SELECT created_at FROM runs WHERE run_id = 'c'")).scalar_one()
        conn.execute(text("UPDATE runs SET created_at = :v WHERE run_id = 'c'"),
                     {"v": stored.replace(" ", "T")})
    assert b.store.read_run("c").created_at == a.loaded("c").created_at
    placed, _ = control_now(a)
    assert placed == 3
    assert [e.kind.value for e in b.store.read_events("c")] == ["created", "control"]
