"""PostgreSQL's connections: no statement spent checking a pooled connection before use, a
session the server ended replaced without failing a request, and notifications that stay in
their schema (channels are the database's: servers on other schemas must not hear them).
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from pathlib import Path

import pytest
from lrserve.service.errors import StoreUnavailable
from lrserve.service.store import open_store
from lrserve.service.store.events import EventKind, NewEvent
from sqlalchemy import create_engine, event, make_url, text

CREATED = NewEvent(EventKind.CREATED, 0, {})


def _round_trips(trace: Path) -> int:
    """How many times the server said it was ready for the next query (libpq's trace)."""
    return trace.read_text().count("\tB\t5\tReadyForQuery")


def test_a_read_on_a_pooled_connection_sends_no_ping(database_url):
    """A read of a run's record is BEGIN, the SELECT and the pool's ROLLBACK: three round
    trips (four with ``pool_pre_ping``, whose ping is the first of them)."""
    store = open_store(database_url("postgres"))
    with tempfile.NamedTemporaryFile() as trace_file:
        trace = Path(trace_file.name)

        @event.listens_for(store._engine, "connect")
        def _trace(dbapi_connection, _record) -> None:
            dbapi_connection.pgconn.trace(trace_file.fileno())

        try:
            store._engine.dispose()  # every connection from now on is traced
            store.create_run("r", {"schedule": {"type": "StepLR"}}, {}, CREATED)
            store.read_run("r")  # a pooled connection now
            before = _round_trips(trace)
            store.read_run("r")
            assert _round_trips(trace) - before == 3
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
