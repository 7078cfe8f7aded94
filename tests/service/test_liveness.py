"""``Liveness`` and the store's ``last_seen``: batched writes, never backwards, stale counts."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from lrserve.service.engine.status import RunStatus
from lrserve.service.errors import StoreUnavailable
from lrserve.service.liveness import MAX_PENDING, Liveness
from lrserve.service.store import EventKind, NewEvent, open_store

from tests.conftest import BACKENDS

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now.timestamp()


@pytest.fixture(params=BACKENDS)
def store(request, database_url):
    opened = open_store(database_url(request.param))
    for run_id in ("a", "b", "c"):
        opened.create_run(run_id, {}, {}, NewEvent(EventKind.CREATED, 0, {}))
    yield opened
    opened.close()


def test_sightings_reach_the_store_in_one_flush_and_never_move_back(store):
    clock = Clock()
    liveness = Liveness(300, clock)
    created = store.read_run("a").last_seen
    clock.now = created + timedelta(seconds=10)
    liveness.seen("a")
    liveness.seen("nope")  # an unknown run is skipped by the store
    assert store.read_run("a").last_seen == created  # nothing written per request
    assert liveness.last_seen(store.read_run("a")) == clock.now  # but this process knows
    assert liveness.flush(store) == 2
    assert store.read_run("a").last_seen == clock.now
    store.mark_seen({"a": created})  # a late flush from a slower replica
    assert store.read_run("a").last_seen == clock.now


def test_a_row_read_before_a_flush_wrote_the_sighting_is_answered_with_it(store):
    """A request reads the run's row, the flush swaps the sightings out and writes them, then the
    request asks this process for its sighting: it was gone from memory and not in the row, so
    a run a rank had just asked about read as stale (tests/e2e/test_liveness.py failed so once)."""
    clock = Clock()
    liveness = Liveness(300, clock)
    created = store.read_run("a").last_seen
    clock.now = created + timedelta(seconds=400)
    liveness.seen("a")
    row = store.read_run("a")  # read as the flush begins
    assert liveness.flush(store) == 1
    assert liveness.last_seen(row) == clock.now
    assert not liveness.is_stale(row, RunStatus.ACTIVE) and liveness.heard_recently("a")
    liveness.flush(store)  # one interval later the row in the store says it; memory lets go
    assert liveness.last_seen(row) == created and liveness.last_seen(store.read_run("a")) == clock.now


def test_stale_counts_and_filter(store):
    clock = Clock()
    clock.now = store.read_run("a").last_seen + timedelta(seconds=301)
    liveness = Liveness(300, clock)
    liveness.seen("b")
    liveness.flush(store)
    with store.lock_run("c") as tx:
        tx.update_run(status=RunStatus.HELD)
    assert store.count_by_status(stale_before=liveness.stale_before()) == {
        "active": 2, "held": 1, "stopped": 0, "stale": 1}
    stale = store.list_runs(stale_before=liveness.stale_before())
    assert [r.run_id for r in stale] == ["a"]
    assert liveness.is_stale(stale[0], RunStatus.ACTIVE) and not liveness.is_stale(stale[0], RunStatus.HELD)


def test_a_failed_flush_keeps_the_sightings_for_the_next(tmp_path):
    class Down:
        def mark_seen(self, seen):
            raise StoreUnavailable("database down")

    clock = Clock()
    clock.now = later = datetime.now(timezone.utc) + timedelta(hours=1)
    liveness = Liveness(300, clock)
    liveness.seen("a")
    with pytest.raises(StoreUnavailable):
        liveness.flush(Down())
    store = open_store(f"sqlite:///{tmp_path}/l.db")
    try:
        store.create_run("a", {}, {}, NewEvent(EventKind.CREATED, 0, {}))
        assert liveness.flush(store) == 1
        assert store.read_run("a").last_seen == later
    finally:
        store.close()


def test_pending_sightings_are_bounded():
    liveness = Liveness(300)
    for i in range(MAX_PENDING + 10):
        liveness.seen(f"r{i}")
    assert len(liveness._pending) == MAX_PENDING


def test_a_sighting_is_recorded_before_the_answer_goes_out():
    """A rank's next request may reach this process the moment it reads the answer: the
    sighting must already be there (tests/e2e/test_liveness.py failed 1 CI run in ~10 when the
    observers ran after the response body was sent)."""
    import asyncio

    from lrserve.service.telemetry import Telemetry, TelemetryMiddleware

    liveness = Liveness(300)
    sent: list[tuple[str, bool]] = []

    async def rank_route(scope, receive, send):
        scope["lrserve.route"] = "/v1/runs/{run_id}/lr"
        scope["path_params"] = {"run_id": "r"}
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def client_reads(message):
        sent.append((message["type"], "r" in liveness._pending))

    app = TelemetryMiddleware(rank_route, Telemetry(), observers=[liveness.observe])
    scope = {"type": "http", "method": "GET", "path": "/v1/runs/r/lr"}
    asyncio.run(app(scope, None, client_reads))
    assert sent == [("http.response.start", True), ("http.response.body", True)]


def test_a_flush_never_holds_a_run_while_it_waits_for_another(database_url):
    """PostgreSQL: a run's commit holds its row for as long as it computes (a 1024-group run's
    step jump: ~1 s in the worker process). The flush locked the rows of every run it saw, in
    ``run_id`` order, in one transaction: it held ``a``'s while it waited for ``b``'s, and ``a``'s
    next commit waited for the flush, so for ``b``'s computation (figure 7: another run's step
    up to 957 ms). Now the flush writes the rows nobody holds at once and each held one in a
    transaction of its own: ``a`` commits while ``b``'s commit is still held (before: not until
    ``b`` committed; the 30 s below only bound a failing run)."""
    import threading

    from sqlalchemy import create_engine, text

    url = database_url("postgres")
    store = open_store(url)
    try:
        for run_id in ("a", "b"):
            store.create_run(run_id, {}, {}, NewEvent(EventKind.CREATED, 0, {}))
        clock = Clock()
        clock.now = store.read_run("a").last_seen + timedelta(seconds=10)
        liveness = Liveness(300, clock)
        liveness.seen("a")
        liveness.seen("b")
        b_held, b_may_commit, a_committed = threading.Event(), threading.Event(), threading.Event()
        flushed: list[int] = []

        def big_commit() -> None:  # b's commit, held mid-computation
            with store.lock_run("b") as tx:
                b_held.set()
                b_may_commit.wait(60)
                tx.update_run(horizon=5)

        def a_commit() -> None:
            with store.lock_run("a") as tx:
                tx.update_run(horizon=1)
            a_committed.set()

        threads = [threading.Thread(target=big_commit)]
        threads[0].start()
        try:
            assert b_held.wait(60)
            threads.append(threading.Thread(target=lambda: flushed.append(liveness.flush(store))))
            threads[-1].start()
            waiting = text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                           "AND wait_event_type = 'Lock'")
            watcher = create_engine(url)
            try:
                with watcher.connect() as watch:  # until the flush waits for b's row
                    while not watch.execute(waiting).scalar_one():
                        assert threads[-1].is_alive(), "the flush ended with b's row held"
                        watch.rollback()
                        threading.Event().wait(0.01)
            finally:
                watcher.dispose()
            threads.append(threading.Thread(target=a_commit))
            threads[-1].start()
            assert a_committed.wait(30), "a's commit waited for the flush, which waited for b's commit"
            assert store.read_run("a").last_seen == clock.now and store.read_run("b").last_seen != clock.now
        finally:
            b_may_commit.set()
            for thread in threads:
                thread.join(60)
        assert flushed == [2]
        assert store.read_run("b").last_seen == clock.now and store.read_run("b").horizon == 5
    finally:
        store.close()
