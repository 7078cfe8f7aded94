"""The store contract (service/store/base.py), run against SQLite and PostgreSQL alike.

PostgreSQL runs when ``TEST_DATABASE_URL`` is set; each test gets its own schema.
"""

from __future__ import annotations

import math
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from lrserve.service.engine.status import RunStatus
from lrserve.service.errors import InvalidInput, RunConflict, RunNotFound, StoreUnavailable
from lrserve.service.store import (
    BaseStore,
    EventKind,
    MetricRecord,
    NewEvent,
    SchemaTooNew,
    Snapshot,
    open_store,
)
from lrserve.service.store.schema import SCHEMA_VERSION
from lrserve.service.store.sql import _dumps
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[3]
SPEC = {"schedule": {"type": "StepLR", "step_size": 3, "gamma": 0.5}, "base_lrs": [0.1]}
TRICKY_FLOATS = [0.1 + 0.2, 1e-308, 5e-324, 1.7976931348623157e308, -0.0, 1 / 3,
                 math.nan, math.inf, -math.inf]


def created(spec=SPEC) -> NewEvent:
    return NewEvent(EventKind.CREATED, 0, {"spec": spec})


def make(store: BaseStore, run_id: str = "r1", labels=None, spec=SPEC):
    record, is_new = store.create_run(run_id, spec, labels or {}, created(spec))
    assert is_new
    return record


def bits(value: float) -> bytes:
    return struct.pack("<d", value)


def same_floats(got, expected) -> bool:
    return [bits(v) for v in got] == [bits(v) for v in expected]


def advance(store: BaseStore, run_id: str, times: int) -> None:
    """Read the horizon under the lock, log the next step, move the horizon to it."""
    for _ in range(times):
        with store.lock_run(run_id) as tx:
            nxt = tx.run.horizon + 1
            tx.append_events([NewEvent(EventKind.CONTROL, nxt, {"n": nxt})])
            tx.update_run(horizon=nxt)


ADVANCE_SCRIPT = """
import sys
from lrserve.service.store import open_store, NewEvent, EventKind
store = open_store(sys.argv[1])
for _ in range(int(sys.argv[2])):
    with store.lock_run("r1") as tx:
        nxt = tx.run.horizon + 1
        tx.append_events([NewEvent(EventKind.CONTROL, nxt, {"n": nxt})])
        tx.update_run(horizon=nxt)
store.close()
"""


def python(script: str, *args: str) -> subprocess.Popen:
    """A separate process running ``script`` from the repository root."""
    return subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def bump_schema_version(url: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE schema_version SET version = version + 1"))
    finally:
        engine.dispose()


def _sort_in_en_us(store, table: str, column: str) -> None:
    """PostgreSQL: ``table.column`` (this test's schema only) sorts in the ICU collation en-US,
    which puts ``a`` before ``B`` (the test database's own, C, sorts by code point); skipped
    where PostgreSQL was built without ICU."""
    collate = 'COLLATE "en-US-x-icu"'
    with store._transaction() as conn:
        icu = conn.execute(text("SELECT 1 FROM pg_collation WHERE collname = 'en-US-x-icu'"))
        if icu.first() is None:
            pytest.skip("this PostgreSQL has no ICU collation en-US-x-icu (built without ICU)")
    with store._transaction(write=True) as conn:
        conn.execute(text(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE varchar(128) {collate}"))
        keys = conn.execute(text(f"SELECT k FROM (VALUES ('B'), ('a')) AS t(k) ORDER BY k {collate}"))
        assert keys.scalars().all() == ["a", "B"]  # the collation really sorts otherwise


class TestStoreContract:
    # -- runs ---------------------------------------------------------------------------

    def test_create_then_read(self, store):
        record = make(store, "r1", {"team": "vision", "env": "prod"})
        assert (record.run_id, record.status, record.horizon, record.last_seq) == ("r1", "active", 0, 1)
        assert record.spec == SPEC and record.labels == {"team": "vision", "env": "prod"}
        assert record.created_at.utcoffset() == timedelta(0)
        assert store.read_run("r1") == record
        [event] = store.read_events("r1")
        assert (event.seq, event.kind, event.step, event.payload) == (1, EventKind.CREATED, 0, {"spec": SPEC})
        assert event.at.utcoffset() == timedelta(0)

    def test_labels_come_in_code_point_order_on_every_path_whatever_the_collation(self, store, backend):
        """A create's record, a read, the create of a run that exists, a listing and the feed give
        a run's labels in one order, their keys' code points, on both backends, also where
        PostgreSQL's collation sorts otherwise (en-US here, which puts ``a`` before ``B``; the
        test database's own is C). Before: the create answered B, Z1, _x, a and the reads
        (``ORDER BY key``) a, B, _x, Z1, so the same run's JSON depended on the path (and the
        replica) that answered."""
        if backend == "postgres":
            _sort_in_en_us(store, "run_labels", "key")
        code_points = ["B", "Z1", "_x", "a"]
        record = make(store, "r1", {"a": "1", "_x": "2", "Z1": "3", "B": "4"})
        assert list(record.labels) == code_points
        assert list(store.read_run("r1").labels) == code_points
        again, is_new = store.create_run("r1", SPEC, {}, created())
        assert not is_new and list(again.labels) == code_points
        assert [list(r.labels) for r in store.list_runs()] == [code_points]
        assert [list(r.labels) for r in store.list_runs(labels={"a": "1"})] == [code_points]
        assert [list(f.labels) for f in store.read_feed(0)] == [code_points]

    def test_pages_of_runs_cover_every_run_once_whatever_the_collation(self, store, backend):
        """``list_runs`` pages by ``run_id`` (``after``: the last id of the page before) in the
        order the database sorts text: on PostgreSQL with a language collation (en-US here,
        which puts ``a`` before ``B`` and ignores ``_`` and ``-`` at first) the cursor's
        comparison and the page's order are the same collation's, so paging neither skips nor
        repeats a run; SQLite (and the test database's C collation) sort by code point."""
        if backend == "postgres":
            _sort_in_en_us(store, "runs", "run_id")
        ids = ["B", "a", "a_b", "aB", "a-b", "ab", "Z1", "_x", "a.b", "A"]
        for run_id in ids:
            make(store, run_id)
        with store._transaction() as conn:
            expected = conn.execute(text("SELECT run_id FROM runs ORDER BY run_id")).scalars().all()
        if backend == "postgres":
            assert expected != sorted(ids)  # the collation really sorts otherwise
        else:
            assert expected == sorted(ids)
        for limit in (1, 3, 4):
            seen: list[str] = []
            after = None
            while page := store.list_runs(limit=limit, after=after):
                seen += [record.run_id for record in page]
                after = page[-1].run_id
            assert seen == expected, limit

    def test_create_is_idempotent(self, store):
        first = make(store, "r1")
        again, is_new = store.create_run("r1", {"other": 1}, {"x": "y"}, created({"other": 1}))
        assert not is_new and again == first
        assert len(store.read_events("r1")) == 1

    def test_concurrent_create_has_one_winner(self, store):
        def create(i: int):
            return store.create_run("race", {**SPEC, "i": i}, {"i": str(i)}, created())

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(create, range(8)))
        assert sum(is_new for _, is_new in results) == 1
        assert len({repr(record) for record, _ in results}) == 1
        assert len(store.read_events("race")) == 1 and store.count_runs() == 1

    def test_unknown_run(self, store):
        for call in (store.read_run, store.delete_run):
            with pytest.raises(RunNotFound):
                call("nope")
        with pytest.raises(RunNotFound):
            with store.lock_run("nope"):
                pass
        with pytest.raises(RunNotFound):
            store.append_metrics("nope", [MetricRecord("loss", 1, 0, 1.0)])
        assert store.read_events("nope") == [] and store.load_snapshot("nope") is None
        assert store.read_metrics("nope") == {}
        with pytest.raises(RunNotFound):
            store.read_barrier("nope", 1)

    def test_list_filters_and_pages(self, store):
        for i in range(7):
            make(store, f"r{i}", {"team": "a" if i % 2 == 0 else "b", "env": "prod" if i < 4 else "dev"})
        with store.lock_run("r2") as tx:
            tx.update_run(status=RunStatus.STOPPED)
        ids = lambda records: [r.run_id for r in records]  # noqa: E731
        assert ids(store.list_runs()) == [f"r{i}" for i in range(7)]
        assert ids(store.list_runs(labels={"team": "a"})) == ["r0", "r2", "r4", "r6"]
        assert ids(store.list_runs(labels={"team": "a", "env": "prod"})) == ["r0", "r2"]
        assert ids(store.list_runs(labels={"team": "nobody"})) == []
        assert ids(store.list_runs(status=RunStatus.STOPPED)) == ["r2"]
        assert ids(store.list_runs(status=RunStatus.ACTIVE, labels={"env": "prod"})) == ["r0", "r1", "r3"]
        pages, cursor = [], None
        while page := store.list_runs(limit=3, after=cursor):
            pages.append(ids(page))
            cursor = page[-1].run_id
        assert pages == [["r0", "r1", "r2"], ["r3", "r4", "r5"], ["r6"]]
        assert store.list_runs(labels={"team": "b"})[0].labels == {"team": "b", "env": "prod"}
        assert store.count_runs() == 7

    def test_nul_in_text_is_refused_alike(self, store):
        """PostgreSQL cannot store NUL; SQLite could, so both refuse it (parity), never a 503."""
        with pytest.raises(InvalidInput):
            store.create_run("n", SPEC, {"team": "a\x00b"}, created())
        make(store, "x", {"team": "a"})
        assert store.list_runs(labels={"team": "a\x00"}) == []
        assert [r.run_id for r in store.list_runs(after="w\x00z")] == ["x"]
        assert store.list_runs(after="x\x00") == []

    def test_delete_removes_everything(self, store):
        make(store, "r1", {"team": "a"})
        make(store, "keep", {"team": "a"})
        advance(store, "r1", 3)
        store.save_snapshot("r1", Snapshot(2, 3, {"x": 1}))
        store.append_metrics("r1", [MetricRecord("loss", 1, 0, 0.5)])
        store.add_barrier_reports("r1", 1, {0: {"loss": 0.5}})
        store.delete_run("r1")
        with pytest.raises(RunNotFound):
            store.read_run("r1")
        assert store.read_events("r1") == [] and store.load_snapshot("r1") is None
        assert store.read_metrics("r1") == {}
        with pytest.raises(RunNotFound):
            store.read_barrier("r1", 1)
        assert [r.run_id for r in store.list_runs(labels={"team": "a"})] == ["keep"]
        fresh = make(store, "r1")  # the id is free again, and nothing of the old run shows
        assert (fresh.last_seq, fresh.horizon, fresh.labels) == (1, 0, {})
        assert store.read_metrics("r1") == {} and len(store.read_events("r1")) == 1

    # -- the event log and the run lock ---------------------------------------------------

    def test_events_in_order_and_after_seq(self, store):
        make(store)
        with store.lock_run("r1") as tx:
            appended = tx.append_events([NewEvent(EventKind.METRIC, 5, {"values": {"loss": 1.0}}),
                                         NewEvent(EventKind.STATUS, None, {"status": "held"})])
            assert [e.seq for e in appended] == [2, 3] and tx.run.last_seq == 3
            assert [e.seq for e in tx.read_events(1)] == [2, 3]
        with store.lock_run("r1") as tx:
            assert tx.run.last_seq == 3
            tx.append_events([NewEvent(EventKind.CONTROL, 7, {"action": "hold"})])
        events = store.read_events("r1")
        assert [e.seq for e in events] == [1, 2, 3, 4]
        assert [e.kind for e in events] == [EventKind.CREATED, EventKind.METRIC, EventKind.STATUS,
                                            EventKind.CONTROL]
        assert events[2].step is None and events[1].payload == {"values": {"loss": 1.0}}
        assert appended == [replace(e, gid=None) for e in events[1:3]]  # gids are given at COMMIT
        assert events[1].gid < events[2].gid < events[3].gid
        assert [e.seq for e in store.read_events("r1", after_seq=2)] == [3, 4]
        assert store.read_events("r1", after_seq=4) == [] and store.read_run("r1").last_seq == 4

    def test_events_of_kinds_within_seqs_and_steps(self, store):
        """``read_events_of``'s bounds, each in the database: ``after_seq < seq <= through_seq``, a
        step, ``above_step < step <= through_step`` (events without a step never in a step's range)."""
        make(store)
        with store.lock_run("r1") as tx:
            metrics = [NewEvent(EventKind.METRIC, step, {"values": {"loss": 1.0}}) for step in (3, 5, 8)]
            tx.append_events([*metrics, NewEvent(EventKind.STATUS, None, {"status": "held"}),
                              NewEvent(EventKind.CONTROL, 5, {"action": "hold"})])

        def seqs(kinds=(EventKind.METRIC,), **how):
            return [e.seq for e in store.read_events_of("r1", list(kinds), **how)]

        assert seqs() == [2, 3, 4] and seqs((EventKind.METRIC, EventKind.CONTROL)) == [2, 3, 4, 6]
        assert seqs(after_seq=2, through_seq=3) == [3] and seqs(through_seq=1) == []
        assert seqs(step=5) == [3] and seqs(above_step=3) == [3, 4]
        assert seqs(above_step=3, through_step=5) == [3]
        assert seqs((EventKind.STATUS,), above_step=-1) == [] and seqs((EventKind.STATUS,)) == [5]
        assert seqs(latest=2) == [3, 4] and seqs((EventKind.METRIC, EventKind.CONTROL), latest=3) == [3, 4, 6]
        assert seqs(through_seq=3, latest=1) == [3] and seqs(after_seq=3, latest=5) == [4]
        assert seqs(first=2) == [2, 3]
        assert seqs((EventKind.METRIC, EventKind.CONTROL), after_seq=2, first=2) == [3, 4]
        assert seqs(through_seq=3, first=5) == [2, 3] and seqs(after_seq=4, first=1) == []

    def test_events_of_kinds_counted(self, store):
        """``count_events_of`` counts what ``read_events_of`` reads in ``after_seq < seq <= through_seq``."""
        make(store)
        with store.lock_run("r1") as tx:
            tx.append_events([NewEvent(EventKind.METRIC, 3, {"values": {"loss": 1.0}}),
                              NewEvent(EventKind.CONTROL, 5, {"action": "hold"}),
                              NewEvent(EventKind.STATUS, None, {"status": "held"})])
        kinds = [EventKind.CREATED, EventKind.CONTROL, EventKind.STATUS]
        assert store.count_events_of("r1", kinds, after_seq=0, through_seq=4) == 3
        assert store.count_events_of("r1", kinds, after_seq=1, through_seq=3) == 1
        assert store.count_events_of("r1", [EventKind.METRIC], after_seq=2, through_seq=4) == 0
        assert store.count_events_of("r2", kinds, after_seq=0, through_seq=4) == 0

    def test_events_of_kinds_weighed(self, store):
        """``payload_sizes_of`` gives ``(seq, bytes of the payload's JSON as stored)`` of what
        ``read_events_of`` reads with the same arguments, in its order (bytes, not characters)."""
        make(store)
        with store.lock_run("r1") as tx:
            tx.append_events([NewEvent(EventKind.CONTROL, 5, {"action": "hold", "why": "ünïcödé"}),
                              NewEvent(EventKind.METRIC, 3, {"values": {"loss": 1.0}}),
                              NewEvent(EventKind.CONTROL, 6, {"action": "set_lr", "lrs": [0.5] * 100})])
        kinds = [EventKind.CREATED, EventKind.CONTROL]
        for after, through, latest in ((0, 4, 9), (1, 4, 1), (0, 3, 2)):  # 1-4: created, hold, metric, set_lr
            how = {"after_seq": after, "through_seq": through, "latest": latest}
            found = store.read_events_of("r1", kinds, **how)
            assert store.payload_sizes_of("r1", kinds, **how) == [
                (e.seq, len(_dumps(e.payload).encode())) for e in found]
        for after, through, first in ((0, 4, 9), (0, 4, 2), (1, 4, 1), (4, 4, 3)):
            how = {"after_seq": after, "through_seq": through, "first": first}
            found = store.read_events_of("r1", kinds, **how)
            assert store.weigh_events_of("r1", kinds, **how) == (
                len(found), sum(len(_dumps(e.payload).encode()) for e in found))
        (_, hold), (_, set_lr) = store.payload_sizes_of("r1", kinds, after_seq=1, through_seq=4, latest=2)
        assert len(_dumps({"action": "hold", "why": "ünïcödé"})) < hold < 50 < 100 * len("0.5") < set_lr

    def test_events_added_are_appended_without_being_made(self, store):
        """``add_events`` (a commit's) stores what ``append_events`` would; ``run.last_seq`` follows."""
        make(store)
        with store.lock_run("r1") as tx:
            tx.add_events([NewEvent(EventKind.CONTROL, 4, {"action": "scale", "factor": 0.5}, "ops", "why"),
                           NewEvent(EventKind.STATUS, None, {"status": "held"})])
            assert tx.run.last_seq == 3
            tx.add_events([])
            assert tx.run.last_seq == 3
        with store.lock_run("r1") as tx:
            assert tx.run.last_seq == 3
        events = store.read_events("r1", after_seq=1)
        assert [(e.seq, e.kind, e.step, e.payload, e.actor, e.reason) for e in events] == [
            (2, EventKind.CONTROL, 4, {"action": "scale", "factor": 0.5}, "ops", "why"),
            (3, EventKind.STATUS, None, {"status": "held"}, "server", None)]
        assert events[0].gid < events[1].gid and store.read_run("r1").last_seq == 3

    def test_horizon_never_goes_down(self, store):
        make(store)
        with store.lock_run("r1") as tx:
            tx.update_run(horizon=10)
            tx.update_run(horizon=4, status=RunStatus.HELD)
            assert (tx.run.horizon, tx.run.status) == (10, "held")
        record = store.read_run("r1")
        assert (record.horizon, record.status) == (10, "held")
        assert record.updated_at >= record.created_at

    def test_lock_run_serialises_writers(self, store):
        make(store)
        with ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(advance, store, "r1", 100) for _ in range(2)]:
                future.result()
        record = store.read_run("r1")
        events = store.read_events("r1")
        assert record.horizon == 200 and record.last_seq == 201
        assert [e.seq for e in events] == list(range(1, 202))
        assert [e.step for e in events[1:]] == list(range(1, 201))  # each saw the previous commit

    def test_lock_run_serialises_processes(self, store, store_url):
        make(store)
        processes = [python(ADVANCE_SCRIPT, store_url, "40") for _ in range(3)]
        advance(store, "r1", 40)
        for process in processes:
            _, stderr = process.communicate(timeout=120)
            assert process.returncode == 0, stderr.decode()
        events = store.read_events("r1")
        assert store.read_run("r1").horizon == 160
        assert [e.seq for e in events] == list(range(1, 162))
        assert [e.step for e in events[1:]] == list(range(1, 161))

    def test_lock_run_leaves_other_runs_free(self, store, backend):
        if backend == "sqlite":
            pytest.skip("SQLite has one writer per file: BEGIN IMMEDIATE holds every run")
        make(store, "a")
        make(store, "b")
        holding, release = threading.Event(), threading.Event()

        def hold_a():
            with store.lock_run("a"):
                holding.set()
                release.wait(10)

        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(hold_a)
            assert holding.wait(10)
            started = time.monotonic()
            advance(store, "b", 1)
            store.append_metrics("a", [MetricRecord("loss", 1, 0, 1.0)])  # same run, no lock needed
            assert time.monotonic() - started < 5
            release.set()
            held.result()

    def test_error_in_lock_run_rolls_back(self, store):
        make(store)
        with pytest.raises(ZeroDivisionError):
            with store.lock_run("r1") as tx:
                tx.append_events([NewEvent(EventKind.CONTROL, 1, {"action": "hold"})])
                tx.update_run(horizon=9, status=RunStatus.HELD)
                raise ZeroDivisionError
        record = store.read_run("r1")
        assert (record.horizon, record.status, record.last_seq) == (0, "active", 1)
        assert len(store.read_events("r1")) == 1
        advance(store, "r1", 1)  # the lock was released
        assert store.read_run("r1").last_seq == 2

    def test_metrics_in_lock_run_commit_and_roll_back_with_it(self, store):
        make(store)
        with store.lock_run("r1") as tx:
            tx.append_metrics([MetricRecord("loss", 1, 0, 0.5), MetricRecord("loss", 1, 0, 0.7)])
        with pytest.raises(ZeroDivisionError):
            with store.lock_run("r1") as tx:
                tx.append_metrics([MetricRecord("loss", 2, 0, 0.4)])
                raise ZeroDivisionError
        assert store.read_metrics("r1") == {"loss": [(1, 0, 0.5)]}

    def test_transaction_is_unusable_after_its_block(self, store):
        make(store)
        with store.lock_run("r1") as tx:
            pass
        with pytest.raises(RuntimeError):
            tx.update_run(horizon=5)

    # -- snapshots, metrics, barrier ------------------------------------------------------

    def test_snapshots(self, store):
        make(store)
        assert store.load_snapshot("r1") is None
        for step in (10, 20, 30):
            store.save_snapshot("r1", Snapshot(step, step + 1, {"step": step}))
        assert store.load_snapshot("r1") == Snapshot(30, 31, {"step": 30})
        assert store.load_snapshot("r1", max_step=25) == Snapshot(20, 21, {"step": 20})
        assert store.load_snapshot("r1", max_step=20).step == 20
        assert store.load_snapshot("r1", max_step=9) is None
        assert store.snapshot_marks("r1", after_step=0, through_step=30) == [(10, 11), (20, 21), (30, 31)]
        assert store.snapshot_marks("r1", after_step=10, through_step=29) == [(20, 21)]
        store.save_snapshot("r1", Snapshot(20, 50, {"replaced": True}))
        assert store.load_snapshot("r1", max_step=29) == Snapshot(20, 50, {"replaced": True})
        assert store.snapshot_marks("r1", after_step=10, through_step=20) == [(20, 50)]
        assert store.snapshot_marks("r2", after_step=0, through_step=30) == []
        created_at = store.read_run("r1").created_at
        store.save_snapshot("r1", Snapshot(40, 41, {"step": 40}), created_at=created_at)
        older = created_at - timedelta(seconds=1)
        with pytest.raises(RunConflict, match="created again"):  # of a run deleted and created again since
            store.save_snapshot("r1", Snapshot(50, 51, {"old": True}), created_at=older)
        assert store.load_snapshot("r1").step == 40

    def test_metrics_are_idempotent_and_sorted(self, store):
        make(store)
        batch = [MetricRecord("loss", 2, 1, 0.4), MetricRecord("loss", 2, 0, 0.5),
                 MetricRecord("acc", 1, 0, 0.9), MetricRecord("loss", 1, 0, 0.7)]
        assert store.append_metrics("r1", batch) == 4
        assert store.append_metrics("r1", batch) == 0
        again = [MetricRecord("loss", 2, 0, 99.0), MetricRecord("loss", 3, 0, 0.3),
                 MetricRecord("loss", 3, 0, 0.3)]
        assert store.append_metrics("r1", again) == 1  # kept as it was; a repeat counts once
        assert store.append_metrics("r1", []) == 0
        assert store.read_metrics("r1") == {
            "acc": [(1, 0, 0.9)],
            "loss": [(1, 0, 0.7), (2, 0, 0.5), (2, 1, 0.4), (3, 0, 0.3)],
        }

    def test_many_metrics_at_once(self, store):
        make(store)
        batch = [MetricRecord("loss", step, rank, step / 7) for step in range(600) for rank in range(2)]
        assert store.append_metrics("r1", batch) == 1200
        assert store.append_metrics("r1", batch[::-1]) == 0
        assert store.read_metrics("r1")["loss"] == [(r.step, r.rank, r.value) for r in batch]

    def test_nonfinite_metrics_round_trip(self, store):
        make(store)
        records = [MetricRecord("x", i, 0, v) for i, v in enumerate(TRICKY_FLOATS)]
        store.append_metrics("r1", records)
        values = [value for _, _, value in store.read_metrics("r1")["x"]]
        assert same_floats(values, [r.value for r in records])
        for rank, value in enumerate(TRICKY_FLOATS):
            store.add_barrier_reports("r1", 1, {rank: {"x": value}})
        assert same_floats([v["x"] for v in store.read_barrier("r1", 1).reports.values()], TRICKY_FLOATS)

    def test_floats_in_json_are_bit_exact(self, store):
        spec = {**SPEC, "values": TRICKY_FLOATS}
        make(store, "r1", spec=spec)
        with store.lock_run("r1") as tx:
            [appended] = tx.append_events([NewEvent(EventKind.METRIC, 1, {"values": TRICKY_FLOATS})])
        store.save_snapshot("r1", Snapshot(1, 2, {"values": TRICKY_FLOATS}))
        assert same_floats(store.read_run("r1").spec["values"], TRICKY_FLOATS)
        assert same_floats(store.read_events("r1")[0].payload["spec"]["values"], TRICKY_FLOATS)
        assert same_floats(store.read_events("r1")[1].payload["values"], TRICKY_FLOATS)
        assert same_floats(appended.payload["values"], TRICKY_FLOATS)
        assert same_floats(store.load_snapshot("r1").state["values"], TRICKY_FLOATS)

    def test_barrier_reports_are_idempotent_per_rank(self, store):
        make(store)
        store.add_barrier_reports("r1", 5, {0: {"loss": 1.0}})
        store.add_barrier_reports("r1", 5, {0: {"loss": 2.0, "acc": 0.5}})  # a retry: the first loss stands
        store.add_barrier_reports("r1", 5, {1: {"loss": 3.0}})
        store.add_barrier_reports("r1", 6, {0: {"loss": 4.0}})
        assert store.read_barrier("r1", 5).reports == {0: {"acc": 0.5, "loss": 1.0}, 1: {"loss": 3.0}}
        assert store.read_barrier("r1", 6).reports == {0: {"loss": 4.0}}
        assert store.read_barrier("r1", 7).reports == {}

    def test_a_barrier_report_returns_the_tally_with_itself_in_it(self, store):
        make(store)
        advance(store, "r1", 3)
        store.add_barrier_reports("r1", 5, {1: {"loss": 3.0}})
        tally = store.add_barrier_reports("r1", 5, {0: {"loss": 1.0}})
        assert (tally.horizon, tally.reports) == (3, {0: {"loss": 1.0}, 1: {"loss": 3.0}})
        assert store.read_barrier("r1", 5) == tally
        assert store.read_barrier("r1", 6).reports == {}

    def test_several_ranks_report_in_one_transaction(self, store):
        make(store)
        store.add_barrier_reports("r1", 5, {1: {"loss": 9.0}})
        records = [MetricRecord("loss", 5, r, float(r)) for r in (0, 1, 2)]
        tally = store.add_barrier_reports("r1", 5, {r: {"loss": float(r)} for r in (0, 1, 2)}, records)
        assert tally.reports == {0: {"loss": 0.0}, 1: {"loss": 9.0}, 2: {"loss": 2.0}}  # rank 1's first
        assert store.read_barrier("r1", 5) == tally
        assert store.read_metrics("r1") == {"loss": [(5, 0, 0.0), (5, 1, 1.0), (5, 2, 2.0)]}

    def test_a_barrier_report_writes_its_history_records_with_it(self, store):
        make(store)
        records = [MetricRecord("loss", 5, 2, 1.0), MetricRecord("acc", 5, 2, 0.75)]
        store.add_barrier_reports("r1", 5, {2: {"loss": 1.0}}, records)
        assert store.read_metrics("r1") == {"loss": [(5, 2, 1.0)], "acc": [(5, 2, 0.75)]}

    def test_a_barrier_of_an_unknown_run_is_not_found(self, store):
        with pytest.raises(RunNotFound):
            store.add_barrier_reports("nope", 1, {0: {"loss": 1.0}}, [MetricRecord("loss", 1, 0, 1.0)])
        with pytest.raises(RunNotFound):
            store.read_barrier("nope", 1)
        assert store.read_metrics("nope") == {}

    def test_lock_run_writes_the_run_row_once_at_commit_and_not_on_rollback(self, store):
        make(store)
        with pytest.raises(RuntimeError), store.lock_run("r1") as tx:
            tx.append_events([NewEvent(EventKind.CONTROL, 1, {"n": 1})])
            tx.update_run(horizon=4, status=RunStatus.HELD)
            raise RuntimeError("before commit")
        assert (store.read_run("r1").last_seq, store.read_run("r1").horizon) == (1, 0)
        with store.lock_run("r1") as tx:
            tx.append_events([NewEvent(EventKind.CONTROL, 1, {"n": 1})])
            tx.update_run(horizon=4, status=RunStatus.HELD)
            tx.append_events([NewEvent(EventKind.CONTROL, 2, {"n": 2})])
        stored = store.read_run("r1")
        assert (stored.last_seq, stored.horizon, stored.status) == (3, 4, "held")
        assert [e.seq for e in store.read_events("r1")] == [1, 2, 3]

    # -- opening, durability, health -------------------------------------------------------

    def test_second_store_reads_what_the_first_wrote(self, store, store_url):
        make(store, "r1", {"team": "a"})
        advance(store, "r1", 2)
        store.append_metrics("r1", [MetricRecord("loss", 1, 0, 0.25)])
        other = open_store(store_url)
        try:
            assert other.read_run("r1") == store.read_run("r1")
            assert other.read_events("r1") == store.read_events("r1")
            assert other.read_metrics("r1") == {"loss": [(1, 0, 0.25)]}
            advance(other, "r1", 1)
            assert store.read_run("r1").horizon == 3
        finally:
            other.close()

    def test_acknowledged_writes_survive_kill_9(self, store_url):
        script = (
            "import os, signal, sys\n"
            "from lrserve.service.store import open_store, NewEvent, EventKind, MetricRecord\n"
            "s = open_store(sys.argv[1])\n"
            "s.create_run('k', {}, {}, NewEvent(EventKind.CREATED, 0, {}))\n"
            "with s.lock_run('k') as tx:\n"
            "    tx.append_events([NewEvent(EventKind.CONTROL, 1, {})]); tx.update_run(horizon=1)\n"
            "s.append_metrics('k', [MetricRecord('loss', 1, 0, 0.5)])\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n"
        )
        process = python(script, store_url)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == -9, stderr.decode()
        reopened = open_store(store_url)
        try:
            assert reopened.read_run("k").horizon == 1 and len(reopened.read_events("k")) == 2
            assert reopened.read_metrics("k") == {"loss": [(1, 0, 0.5)]}
        finally:
            reopened.close()

    def test_reopening_keeps_data_and_version(self, store_url):
        for _ in range(2):
            opened = open_store(store_url)
            opened.close()
        opened = open_store(store_url)
        try:
            make(opened)
        finally:
            opened.close()
        engine = create_engine(store_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(text("SELECT version FROM schema_version")).all()
        finally:
            engine.dispose()
        assert rows == [(SCHEMA_VERSION,)]
        reopened = open_store(store_url)
        try:
            assert reopened.read_run("r1").spec == SPEC
        finally:
            reopened.close()

    def test_concurrent_first_opens(self, store_url):
        def open_and_close(_: int) -> None:
            open_store(store_url).close()

        with ThreadPoolExecutor(6) as pool:
            list(pool.map(open_and_close, range(6)))
        opened = open_store(store_url)
        try:
            make(opened)
        finally:
            opened.close()

    def test_newer_schema_is_refused(self, store_url):
        open_store(store_url).close()
        bump_schema_version(store_url)
        with pytest.raises(SchemaTooNew, match=f"version {SCHEMA_VERSION + 1}"):
            open_store(store_url)

    def test_ping(self, store):
        store.ping()


def test_unreachable_postgres_is_store_unavailable():
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        open_store("postgresql+psycopg://lr:s3cret-pw@127.0.0.1:1/lrserve")
    assert time.monotonic() - started < 10
    assert "127.0.0.1:1" in caught.value.message and "s3cret-pw" not in caught.value.message


def test_unopenable_sqlite_file_is_store_unavailable(tmp_path):
    path = tmp_path / "missing-dir" / "lrserve.db"
    with pytest.raises(StoreUnavailable, match="missing-dir"):
        open_store(f"sqlite:///{path}")


@pytest.mark.parametrize("url", ["mysql://u@h/db", "sqlite://", "sqlite:///:memory:", "not a url"])
def test_unsupported_urls(url):
    with pytest.raises(ValueError):
        open_store(url)


def test_unknown_sqlite_synchronous(tmp_path):
    with pytest.raises(ValueError, match="synchronous"):
        open_store(f"sqlite:///{tmp_path}/x.db", sqlite_synchronous="sometimes")


def test_opening_a_new_file_waits_for_another_writer(tmp_path):
    """A new file switches to WAL; while another connection writes to it, SQLite refuses the
    switch at once ("database is locked", no busy handler): the open must wait, not fail."""
    import sqlite3

    path = tmp_path / "new.db"
    writer = sqlite3.connect(path, isolation_level=None)  # rollback journal: the file is new
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("CREATE TABLE other (x)")
    opened: list[object] = []
    opener = threading.Thread(target=lambda: opened.append(open_store(f"sqlite:///{path}")))
    opener.start()
    opener.join(0.3)
    assert opener.is_alive() and not opened  # waiting for the writer, not failed
    writer.execute("COMMIT")
    opener.join(30)
    writer.close()
    assert opened, "open_store did not finish"
    store = opened[0]
    try:
        make(store)
        assert store.read_run("r1").run_id == "r1"
    finally:
        store.close()
