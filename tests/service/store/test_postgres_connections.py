"""PostgreSQL's connections: a read of one statement in one round trip and a commit in two
(no statement spent checking a pooled connection before use), a
session the server ended replaced without failing a request, and notifications that stay in
their schema (channels are the database's: servers on other schemas must not hear them).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from lrserve.service.errors import RunNotFound, StoreUnavailable
from lrserve.service.store import open_store, require_pipeline
from lrserve.service.store.base import MetricRecord
from lrserve.service.store.events import EventKind, NewEvent
from sqlalchemy import create_engine, event, make_url, text

from tests.conftest import BACKENDS
from tests.e2e.proxy import pipe

CREATED = NewEvent(EventKind.CREATED, 0, {})


@contextmanager
def _round_trips(store) -> Iterator[Callable[[], int]]:
    """How many times, so far, a traced connection of ``store`` sent something and then waited
    for the server's answer: a round trip (libpq's trace of every connection from now on; a
    pipeline's flush counts, as a ``ReadyForQuery`` would not)."""
    with tempfile.NamedTemporaryFile() as trace_file:
        traced = []

        @event.listens_for(store._engine, "connect")
        def _trace(dbapi_connection, _record) -> None:
            dbapi_connection.pgconn.trace(trace_file.fileno())
            traced.append(dbapi_connection)

        store._engine.dispose()  # every connection from now on is traced

        def count() -> int:
            for connection in traced:  # libpq writes its trace through a buffered stream: flush it
                if not connection.closed:
                    connection.pgconn.untrace()
                    connection.pgconn.trace(trace_file.fileno())
            trips, last = 0, "B"
            for line in Path(trace_file.name).read_text().splitlines():
                fields = line.split("\t")
                if len(fields) >= 3 and fields[1] in ("F", "B"):
                    trips += fields[1] == "B" and last == "F"
                    last = fields[1]
            return trips

        yield count


def test_a_read_of_one_statement_is_one_round_trip(database_url):
    """Each statement its own transaction (psycopg's autocommit), so a read of one statement is
    the statement alone: no ``BEGIN`` before it, no pool ``ROLLBACK`` after (three round trips
    before; four with ``pool_pre_ping``, whose ping was the first)."""
    store = open_store(database_url("postgres"))
    try:
        with _round_trips(store) as trips:
            store.create_run("r", {"schedule": {"type": "StepLR"}}, {"team": "a"}, CREATED)
            store.append_metrics("r", [MetricRecord("loss", 1, 0, 0.5)])
            store.add_barrier_reports("r", 1, {1: {"loss": 2.0}, 0: {"loss": 1.0, "acc": -0.0}})
            reads = [store.read_run, store.run_head, store.read_events, store.read_metrics,
                     store.history_mark,
                     lambda run_id: store.read_barrier(run_id, 1)]
            for read in reads:
                read("r")  # a pooled connection now
                before = trips()
                read("r")
                assert trips() - before == 1
            assert store.read_run("r").labels == {"team": "a"}
            assert store.read_barrier("r", 1).reports == {0: {"acc": -0.0, "loss": 1.0}, 1: {"loss": 2.0}}
            assert store.read_barrier("r", 2).reports == {}
    finally:
        store.close()


def test_a_commit_is_two_round_trips_and_answers_after_commit(database_url):
    """A commit under the run's row lock: ``BEGIN`` with the lock's read, then its writes and
    ``COMMIT`` in one flush, answered once COMMIT is (seven round trips before: BEGIN, the lock,
    the UPDATE, the NOTIFY, the event ids, the events' INSERT, COMMIT). What it wrote is there
    for another store as soon as it returns, events numbered in commit order."""
    url = database_url("postgres")
    store, other = open_store(url), open_store(url)
    try:
        store.create_run("r", {"schedule": {"type": "StepLR"}}, {}, CREATED)
        with _round_trips(store) as trips:
            for step in (1, 2):
                before = trips()
                with store.lock_run("r") as tx:
                    tx.append_events([NewEvent(EventKind.CREATED, step, {"n": step})])
                    tx.append_metrics([MetricRecord("loss", step, 0, 0.5)])
                    tx.update_run(horizon=step)
                assert trips() - before == 2
                record = other.read_run("r")
                assert (record.horizon, record.last_seq) == (step, step + 1)
            before = trips()  # a metric write: its lock's read, then the INSERT with COMMIT, counted after
            twice = [MetricRecord("acc", 1, 0, 0.5), MetricRecord("acc", 1, 0, 0.6)]
            assert store.append_metrics("r", twice) == 1
            assert trips() - before == 2
        assert [e.gid for e in other.read_events("r")] == [1, 2, 3]
        assert other.read_metrics("r") == {"acc": [(1, 0, 0.5)], "loss": [(1, 0, 0.5), (2, 0, 0.5)]}
    finally:
        store.close()
        other.close()


def test_a_group_of_runs_commits_in_two_round_trips(database_url):
    """``lock_runs`` (the group commit of windows asked together): every run's row lock read in
    one round trip, however many runs (one each before), then every run's writes with
    ``COMMIT``; a run that does not exist is left out, the others' writes all durable."""
    url = database_url("postgres")
    store, other = open_store(url), open_store(url)
    runs = [f"r{i}" for i in range(6)]
    try:
        for run_id in runs:
            store.create_run(run_id, {"schedule": {"type": "StepLR"}}, {}, CREATED)
        with _round_trips(store) as trips:
            store.read_run("r0")  # a pooled connection now
            before = trips()
            with store.lock_runs([*reversed(runs), "gone"]) as locked:
                assert sorted(locked) == runs
                for n, run_id in enumerate(runs, start=1):
                    locked[run_id].append_events([NewEvent(EventKind.CREATED, n, {"n": n})])
                    locked[run_id].update_run(horizon=n)
            assert trips() - before == 2
        assert [other.read_run(run_id).horizon for run_id in runs] == [1, 2, 3, 4, 5, 6]
        assert [e.step for e in other.read_events("r5")] == [0, 6]
    finally:
        store.close()
        other.close()


def test_a_group_skipping_locked_rows_never_waits_for_another_transaction(database_url):
    """``lock_runs(skip_locked=True)``: a run whose row another transaction holds (another
    process committing it, perhaps a big window computed under its lock) is left out at once,
    as a missing run is; the others are locked and written; without it, the group waits."""
    url = database_url("postgres")
    store, other = open_store(url), open_store(url)
    try:
        for run_id in ("a", "b"):
            store.create_run(run_id, {"schedule": {"type": "StepLR"}}, {}, CREATED)
        entered, release = threading.Event(), threading.Event()

        def hold_a() -> None:
            with other.lock_run("a"):
                entered.set()
                assert release.wait(30)

        waited, held = threading.Event(), []

        def group() -> None:
            with store.lock_runs(["a", "b"]) as locked:
                waited.set()
                held.append(sorted(locked))

        holder, waiting = threading.Thread(target=hold_a), threading.Thread(target=group)
        holder.start()
        try:
            assert entered.wait(30)
            with store.lock_runs(["a", "b"], skip_locked=True) as locked:
                assert sorted(locked) == ["b"]
                locked["b"].update_run(horizon=1)
            waiting.start()
            assert not waited.wait(0.5)  # behind the holder, which holds until released below
        finally:
            release.set()
            holder.join(30)
        waiting.join(30)
        assert held == [["a", "b"]]
        assert [other.read_run(run_id).horizon for run_id in ("a", "b")] == [0, 1]
    finally:
        store.close()
        other.close()


def test_a_create_is_two_round_trips_in_two_writes_and_returns_the_run_as_a_read_does(database_url):
    """``create_run``: ``BEGIN`` with the run's INSERT (its row returned), then the labels, the
    notification and the numbered event with ``COMMIT``: two round trips and two writes (nine
    round trips before, one per statement, the event id counter's row locked from the third).
    A create of a run that exists reads it in the same transaction, then commits: three (five
    before). What it
    returns is what another store reads, labels in key order, and its event is numbered."""
    url = make_url(database_url("postgres"))
    proxy = _CountingProxy(url.host or "127.0.0.1", url.port or 5432)
    store = open_store(url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False))
    other = open_store(url.render_as_string(hide_password=False))
    spec = {"schedule": {"type": "StepLR", "step_size": 3}}
    try:
        store.create_run("warm", spec, {}, CREATED)  # a pooled connection, its statements prepared
        store.create_run("warm", spec, {}, CREATED)
        with _round_trips(store) as trips:
            store.create_run("warm2", spec, {}, CREATED)  # the traced connection, prepared
            store.create_run("warm2", spec, {}, CREATED)
            for labels in ({"team": "a", "owner": "b"}, {}):
                run_id = f"r{len(labels)}"
                before, writes = trips(), proxy.writes
                record, is_new = store.create_run(run_id, spec, labels, CREATED)
                assert (trips() - before, proxy.writes - writes, is_new) == (2, 2, True)
                assert record == other.read_run(run_id)
                assert list(record.labels) == sorted(labels)
                before, writes = trips(), proxy.writes
                again, is_new = store.create_run(run_id, {"other": 1}, {"x": "y"}, CREATED)
                assert (trips() - before, proxy.writes - writes, is_new) == (3, 3, False)
                assert again == record
        assert [e.gid for e in other.read_events("r2")] == [3]
        assert [e.gid for e in other.read_events("r0")] == [4]
    finally:
        store.close()
        other.close()
        proxy.close()


_GID_TABLES = {"postgres": "event_ids", "sqlite": "event_gid_floor"}
"""Where each backend's global event ids come from (``schema.event_ids``, ``schema.event_gid_floor``)."""


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_create_that_fails_keeps_nothing_and_its_connection_serves_the_next(database_url, backend):
    """A create whose event cannot be numbered (no counter row: on PostgreSQL the INSERT fails,
    answered only at COMMIT's flush; no floor row on SQLite: its INSERT inserts nothing) keeps
    neither the run nor its labels and fails as the database's (503, naming the row; on SQLite
    it was a TypeError, a 500); its connection goes back with no transaction open, and the
    next create on it, once the counter is back, goes through."""
    store = open_store(database_url(backend))
    spec = {"schedule": {"type": "StepLR"}}
    table = _GID_TABLES[backend]
    try:
        store.create_run("first", spec, {}, CREATED)
        with store._transaction(write=True) as conn:
            conn.execute(text(f"DELETE FROM {table}"))
        with pytest.raises(StoreUnavailable, match=f"{table} row 1 is missing"):
            store.create_run("r", spec, {"team": "a"}, CREATED)
        with pytest.raises(RunNotFound):
            store.read_run("r")
        assert store._disposals == 0
        assert store._engine.pool.checkedin() == 1
        with store._transaction(write=True) as conn:
            assert conn.execute(text("SELECT count(*) FROM run_labels")).scalar_one() == 0
            conn.execute(text(f"INSERT INTO {table} VALUES (1, 1)"))
        record, is_new = store.create_run("r", spec, {"team": "a"}, CREATED)
        assert is_new and record.labels == {"team": "a"}
        assert [e.gid for e in store.read_events("r")] == [2]
    finally:
        store.close()


class _CountingProxy:
    """A TCP proxy to the test's PostgreSQL that counts the client's writes: each ``recv`` of
    data the client sent (a client that writes several times in a row may be read at once, so
    this is at most the number of its writes, and exactly it when it waits in between)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.writes = 0
        self._sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self._sockets += [client, server]
            threading.Thread(target=pipe, args=(client, server, self._counted), daemon=True).start()
            threading.Thread(target=pipe, args=(server, client), daemon=True).start()

    def _counted(self) -> None:
        self.writes += 1

    def close(self) -> None:
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


def test_a_commit_sends_each_flush_in_one_write(database_url):
    """A commit's statements reach the server in two writes, one per round trip: ``BEGIN``
    with the locked row's read and a flush request, then the writes, ``COMMIT`` and the
    sync (seven writes before, one per statement and message, each waking the server's
    process: its CPU per commit was about twice pgbench's for the same statements). A metric
    write and a barrier report the same way (three for the report: its tally is read in
    the middle)."""
    url = make_url(database_url("postgres"))
    proxy = _CountingProxy(url.host or "127.0.0.1", url.port or 5432)
    store = open_store(url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False))
    try:
        store.create_run("r", {"schedule": {"type": "StepLR"}}, {}, CREATED)

        def commit(step: int) -> None:
            with store.lock_run("r") as tx:
                tx.append_events([NewEvent(EventKind.CREATED, step, {"n": step})])
                tx.append_metrics([MetricRecord("loss", step, 0, 0.5)])
                tx.update_run(horizon=step)

        writes = []
        for step in range(1, 5):  # the first prepares its statements (in the same writes)
            before = proxy.writes
            commit(step)
            writes.append(proxy.writes - before)
            record = store.read_run("r")
            assert (record.horizon, record.last_seq) == (step, step + 1)
        assert writes == [2, 2, 2, 2]
        before = proxy.writes
        twice = [MetricRecord("acc", 1, 0, 0.5), MetricRecord("acc", 1, 0, 0.6)]
        assert store.append_metrics("r", twice) == 1
        assert proxy.writes - before == 2
        before = proxy.writes
        tally = store.add_barrier_reports("r", 1, {1: {"loss": 2.0}, 0: {"loss": 1.0}})
        assert proxy.writes - before == 3
        assert tally.reports == {0: {"loss": 1.0}, 1: {"loss": 2.0}}
        assert [e.gid for e in store.read_events("r")] == [1, 2, 3, 4, 5]
    finally:
        store.close()
        proxy.close()


def test_a_commit_that_fails_keeps_nothing_and_leaves_its_connection_as_the_pool_keeps_them(database_url):
    """A pipelined commit that raises inside its block, or one whose statement the server
    refuses (answered only at COMMIT's flush), keeps none of its writes, and its connection
    goes back to the pool out of autocommit with no transaction open: a later transaction on
    it is one (rolled back whole on an error)."""
    store = open_store(database_url("postgres"))
    try:
        store.create_run("r", {"schedule": {"type": "StepLR"}}, {}, CREATED)
        store._engine.dispose()
        with pytest.raises(ZeroDivisionError):
            with store.lock_run("r") as tx:
                tx.append_events([NewEvent(EventKind.CREATED, 1, {})])
                tx.update_run(horizon=7)
                raise ZeroDivisionError
        with pytest.raises(StoreUnavailable):
            with store.lock_run("r") as tx:
                tx.update_run(horizon=8)
                tx.append_metrics([MetricRecord("x" * 500, 1, 0, 0.5)])  # longer than the column
        assert store._disposals == 0  # a refused statement is no dead connection
        record = store.read_run("r")
        assert (record.horizon, record.last_seq) == (0, 1)
        assert store.read_metrics("r") == {}
        assert store._engine.pool.checkedin() == 1  # one connection did all of it
        with store._engine.connect() as conn:
            assert conn.connection.dbapi_connection.autocommit is False
        with pytest.raises(StoreUnavailable), store._transaction(write=True) as conn:
            conn.execute(text("UPDATE runs SET horizon = 9"))
            conn.execute(text("SELECT 1/0"))
        assert store.read_run("r").horizon == 0
    finally:
        store.close()


def _commit(store, step: int) -> None:
    with store.lock_run("r") as tx:
        tx.append_events([NewEvent(EventKind.CREATED, step, {})])
        tx.update_run(horizon=step)


def test_a_rollback_after_psycopg_prepared_its_own_statements_leaves_the_pipeline_working(database_url):
    """The pipeline's statements are prepared once per connection (``lrserve_N``). A rolled
    back transaction on that connection (a ``DELETE`` of an unknown run, a 404) after a
    statement ran there 6 times used to make psycopg send ``DEALLOCATE ALL`` (it had prepared
    that statement itself after 5 uses), and every later commit on the connection failed
    (``prepared statement "lrserve_0" does not exist``, a 503) while it went back to the pool
    each time: in time every pooled connection. One pooled connection here, as it was left."""
    store = open_store(database_url("postgres"))
    try:
        store.create_run("r", {"schedule": {"type": "StepLR"}}, {}, CREATED)
        _commit(store, 1)  # the pipeline prepares its statements on this connection
        for _ in range(6):
            assert store.count_runs() == 1
        with pytest.raises(RunNotFound):
            store.delete_run("nope")  # rolled back
        for step in range(2, 5):
            _commit(store, step)
            assert store.read_run("r").horizon == step
        assert store._engine.pool.checkedin() == 1  # one connection did all of it
        assert store._disposals == 0
    finally:
        store.close()


def test_a_failed_commit_then_reads_and_rollbacks_leave_the_connection_usable(database_url):
    """A pipelined commit whose statement the server refuses ends its transaction on the
    connection, which goes back to the pool; then reads (6 times the same statement, as many
    as psycopg needs to prepare it itself) and rolled back transactions on it: commits and
    reads there still work, the pipeline's prepared statements intact."""
    store = open_store(database_url("postgres"))
    try:
        store.create_run("r", {"schedule": {"type": "StepLR"}}, {}, CREATED)
        _commit(store, 1)
        for _ in range(2):
            with pytest.raises(StoreUnavailable):
                with store.lock_run("r") as tx:
                    tx.update_run(horizon=8)
                    tx.append_metrics([MetricRecord("x" * 500, 1, 0, 0.5)])  # longer than the column
            for _ in range(6):
                assert store.count_runs() == 1
                assert store.read_run("r").horizon == 1
            with pytest.raises(RunNotFound):
                store.delete_run("nope")
            with pytest.raises(StoreUnavailable), store._transaction(write=True) as conn:
                conn.execute(text("SELECT 1/0"))
        _commit(store, 2)
        assert store.append_metrics("r", [MetricRecord("loss", 1, 0, 0.5)]) == 1
        assert store.read_run("r").horizon == 2
        assert store._engine.pool.checkedin() == 1
        assert store._disposals == 0
    finally:
        store.close()


def test_a_pipeline_statement_deallocated_behind_its_back_fails_one_request_only(database_url):
    """Should the pipeline's prepared statements go from the server's session anyway
    (``DEALLOCATE ALL`` from anything else on the connection), the request that meets it fails
    (a 503) and the connection's list of them is emptied: the next commit and read prepare
    them again and succeed, on the same connection (before: every later one failed)."""
    store = open_store(database_url("postgres"))
    try:
        store.create_run("r", {"schedule": {"type": "StepLR"}}, {}, CREATED)
        _commit(store, 1)
        assert store.read_run("r").horizon == 1
        with store._engine.connect() as conn:
            conn.exec_driver_sql("DEALLOCATE ALL")
            conn.commit()
        with pytest.raises(StoreUnavailable, match="does not exist"):
            _commit(store, 2)
        for step in (2, 3):
            _commit(store, step)
            assert store.read_run("r").horizon == step
        assert store._engine.pool.checkedin() == 1
        assert store._disposals == 0
    finally:
        store.close()


def test_a_failed_pipeline_commit_ends_its_transaction_without_psycopg(database_url):
    """A pipelined commit that fails ends its transaction with a ``ROLLBACK`` of its own, not
    psycopg's ``rollback()``, which sends ``DEALLOCATE ALL`` after it where psycopg prepared a
    statement itself: here the connection's psycopg prepares after the fifth use again (as
    without the store's ``prepare_threshold=None``), and the next commit still finds the
    pipeline's statements (before: a 503, ``prepared statement ... does not exist``)."""
    store = open_store(database_url("postgres"))
    try:
        store.create_run("r", {"schedule": {"type": "StepLR"}}, {}, CREATED)
        _commit(store, 1)
        with store._engine.connect() as conn:
            conn.connection.dbapi_connection.prepare_threshold = 5
            for _ in range(6):  # psycopg's own prepared statement on this connection
                conn.exec_driver_sql("SELECT count(*) FROM runs").scalar_one()
            conn.commit()
        with pytest.raises(StoreUnavailable, match="too long"):
            with store.lock_run("r") as tx:
                tx.update_run(horizon=8)
                tx.append_metrics([MetricRecord("x" * 500, 1, 0, 0.5)])  # longer than the column
        _commit(store, 2)
        assert store.read_run("r").horizon == 2
        assert store._engine.pool.checkedin() == 1
    finally:
        store.close()


def _sleeping(admin_url: str, application: str) -> int:
    engine = create_engine(admin_url)
    try:
        with engine.connect() as conn:
            return len(conn.execute(text(
                "SELECT pid FROM pg_stat_activity WHERE application_name = :a AND query LIKE '%pg_sleep%'"
            ), {"a": application}).all())
    finally:
        engine.dispose()


def _terminate(admin_url: str, application: str) -> int:
    """End the sessions of ``application`` and wait until their processes are gone (their
    sockets closed): without the wait, a checkout could come before a session ends."""
    engine = create_engine(admin_url)
    try:
        with engine.connect() as conn:
            ended = conn.execute(text(
                "SELECT pg_terminate_backend(pid, 30000) FROM pg_stat_activity WHERE application_name = :a"
            ), {"a": application}).scalars().all()
            assert all(ended), ended
            return len(ended)
    finally:
        engine.dispose()


@pytest.mark.parametrize("idle", [True, False], ids=["idle", "in_use"])
def test_a_session_the_server_ended_fails_at_most_one_request(database_url, idle):
    """``pg_terminate_backend`` on every pooled session (what a restart does to them): a
    pooled connection found closed at checkout is replaced with the whole pool before use,
    so no request fails; one that breaks in use fails that request only (a 503), and the
    pool is replaced before the next one."""
    url = make_url(database_url("postgres"))
    application = f"lrserve_kill_{url.query['options'].rsplit('=', 1)[1][-12:]}"
    store = open_store(url.update_query_dict({"application_name": application}).render_as_string(
        hide_password=False))
    admin = url.set(query={}).render_as_string(hide_password=False)
    try:
        store.create_run("r", {"schedule": {"type": "StepLR"}}, {}, CREATED)
        for step in range(1, 4):  # a few pooled connections
            store.add_barrier_reports("r", step, {0: {"loss": 1.0}})
        failures = 0
        if idle:
            assert _terminate(admin, application) >= 1
        else:  # a statement in flight on one of them when the server ends it
            errors: list[BaseException] = []

            def sleep() -> None:
                try:
                    with store._driver_read() as cursor:
                        cursor.execute("SELECT pg_sleep(10)")
                except BaseException as exc:  # noqa: BLE001 - counted below
                    errors.append(exc)

            thread = threading.Thread(target=sleep)
            thread.start()
            while _sleeping(admin, application) == 0:
                time.sleep(0.02)
            assert _terminate(admin, application) >= 1
            thread.join(10)
            assert [type(e) for e in errors] == [StoreUnavailable]  # that request's 503
            assert store._disposals == 1  # and the pool was replaced (a silent break is found so)
        for step in range(4, 10):
            try:
                store.add_barrier_reports("r", step, {0: {"loss": 1.0}})
                store.read_run("r")
            except StoreUnavailable:
                failures += 1
        assert failures == 0
    finally:
        store.close()


def test_notifications_wake_the_stores_of_their_own_schema_only(database_url):
    """Two schemas of one database: a run created in the other schema wakes no listener here
    (before: every listener of the database, one needless read per waiting barrier); a run
    created by another store of this schema does. Notifications reach a listener in commit
    order, so the one of ours arriving first means the other schema's was not sent here."""
    ours, theirs = database_url("postgres"), database_url("postgres")
    listening, writer, other = open_store(ours), open_store(ours), open_store(theirs)
    try:
        listen = listening.run_listener()
        assert listen is not None

        async def heard() -> list[str | None]:
            woken: list[str | None] = []
            got_ours = asyncio.Event()

            def wake(run_id: str | None) -> None:
                woken.append(run_id)
                if run_id == "ours":
                    got_ours.set()

            task = asyncio.create_task(listen(wake))
            while not woken:  # listening
                await asyncio.sleep(0.01)
            await asyncio.to_thread(other.create_run, "theirs", {"schedule": {"type": "StepLR"}}, {}, CREATED)
            await asyncio.to_thread(writer.create_run, "ours", {"schedule": {"type": "StepLR"}}, {}, CREATED)
            await asyncio.wait_for(got_ours.wait(), 30)
            task.cancel()
            return woken

        assert asyncio.run(heard()) == [None, "ours"]
    finally:
        for store in (listening, writer, other):
            store.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_commit_without_the_event_id_counter_keeps_nothing(database_url, backend):
    """The events' INSERT numbers each row from the counter's row (``event_ids`` id 1; on
    SQLite the floor's, ``event_gid_floor``) in the same statement; without that row the
    statement fails (on SQLite it inserts nothing, which fails it), and with it the commit,
    which keeps nothing (before: it inserted no event, silently, and committed the run's
    ``last_seq`` ahead of its events)."""
    store = open_store(database_url(backend))
    table = _GID_TABLES[backend]
    try:
        store.create_run("r", {"schedule": {"type": "StepLR"}}, {}, CREATED)
        with store._transaction(write=True) as conn:
            conn.execute(text(f"DELETE FROM {table}"))
        with pytest.raises(StoreUnavailable, match=f"{table} row 1 is missing"):
            with store.lock_runs(["r"]) as locked:
                locked["r"].append_events([NewEvent(EventKind.CREATED, s, {}) for s in (1, 2)])
        assert store.read_run("r").last_seq == 1
        assert [e.seq for e in store.read_events("r")] == [1]
    finally:
        store.close()


def test_a_metric_write_closes_its_cursors_before_its_connection_goes_back(database_url):
    """``append_metrics`` counts its INSERT on a cursor of its own, read once COMMIT answered:
    that cursor is closed before the connection goes back to the pool (before: after, when
    another request may hold the connection), and a failed write is still a 503."""
    import psycopg

    store = open_store(database_url("postgres"))
    try:
        store.create_run("r", {"schedule": {"type": "StepLR"}}, {}, CREATED)
        open_at_checkin: list[int] = []

        @event.listens_for(store._engine, "checkin")
        def _checkin(dbapi_connection, _record) -> None:
            open_at_checkin.append(sum(  # a cursor refers to its connection
                1 for found in gc.get_referrers(dbapi_connection)
                if isinstance(found, psycopg.Cursor) and not found.closed))

        assert store.append_metrics("r", [MetricRecord("loss", s, 0, 0.5) for s in (1, 2)]) == 2
        assert store.append_metrics("r", [MetricRecord("loss", 2, 0, 0.7)]) == 0
        with pytest.raises(StoreUnavailable):
            store.append_metrics("r", [MetricRecord("x" * 500, 1, 0, 0.5)])  # longer than the column
        assert open_at_checkin == [0, 0, 0]
        assert store.read_metrics("r") == {"loss": [(1, 0, 0.5), (2, 0, 0.5)]}
    finally:
        store.close()


def test_a_libpq_without_pipeline_mode_fails_start_up_in_one_line():
    """Writes are pipelined (libpq 14 or newer): an older libpq is refused when the store opens,
    with one line the CLI prints (a ValueError, not retried), not at the first write."""
    require_pipeline(True, 160003)
    with pytest.raises(ValueError, match=r"^PostgreSQL needs libpq 14 or newer .* libpq 13\.4: ") as refused:
        require_pipeline(False, 130004)
    assert "\n" not in str(refused.value)
