"""Creating a run while all of a job's ranks ask at once: one creates it, the others join it."""

from __future__ import annotations

import threading

import pytest
from lrserve.service.errors import RunConflict, RunNotFound
from lrserve.service.runs.manager import RunManager
from lrserve.service.settings import Settings
from lrserve.service.store import open_store
from lrserve.service.store.events import EventKind

from tests.conftest import BACKENDS

RANKS = 16
SPEC = {"run_id": "job", "schedule": {"type": "StepLR", "step_size": 3}, "base_lrs": [0.1],
        "world_size": RANKS}


@pytest.fixture(params=BACKENDS)
def manager(request, database_url):
    store = open_store(database_url(request.param))
    yield RunManager(store, Settings(db=database_url(request.param)))
    store.close()


def all_at_once(fn, n):
    """Run ``fn(i)`` on ``n`` threads released together; results (or exceptions) by index."""
    start = threading.Barrier(n)
    out = [None] * n

    def go(i):
        start.wait()
        try:
            out[i] = fn(i)
        except Exception as exc:  # noqa: BLE001 - handed back to the test
            out[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_ranks_creating_together_get_one_run(manager: RunManager):
    results = all_at_once(lambda _: manager.create_run(SPEC), RANKS)
    assert all(not isinstance(r, Exception) for r in results), results
    assert sum(created for _, created in results) == 1
    assert len({(record.run_id, record.created_at) for record, _ in results}) == 1
    kinds = [e.kind for e in manager.store.read_events("job")]
    assert kinds.count(EventKind.CREATED) == 1


def test_a_different_spec_racing_the_same_id_is_refused(manager: RunManager):
    other = {**SPEC, "base_lrs": [0.2]}
    results = all_at_once(lambda i: manager.create_run(SPEC if i % 2 else other), 8)
    winners = {tuple(r[0].spec["base_lrs"]) for r in results if not isinstance(r, Exception)}
    assert len(winners) == 1  # whichever came first, every request of the other spec is refused
    losers = [r for r in results if isinstance(r, Exception)]
    assert len(losers) == 4 and all(isinstance(r, RunConflict) for r in losers)


def test_a_join_goes_through_on_the_event_loop_and_a_create_does_not(manager: RunManager):
    """``now`` (the event loop's way, SQLite only): a join is one read; creating a run builds
    an engine and writes, so it says ``WouldWait`` before it changes anything."""
    if not manager.store.one_writer:
        assert manager.now(lambda: manager.create_run(SPEC)) is None  # PostgreSQL: never on the loop
        return
    assert manager.now(lambda: manager.create_run(SPEC)) is None
    with pytest.raises(RunNotFound):
        manager.store.read_run("job")  # nothing written
    record, created = manager.create_run(SPEC)
    assert created
    joined = manager.now(lambda: manager.create_run(SPEC))
    assert joined == (record, False)
    with pytest.raises(RunConflict):  # a different spec is refused there too
        manager.now(lambda: manager.create_run({**SPEC, "base_lrs": [0.2]}))
    big = {**SPEC, "run_id": "big", "base_lrs": [0.1] * 5000}  # checked in a worker process, not here
    checked = []
    manager.big_work.run = lambda *args: checked.append(args)
    assert manager.now(lambda: manager.create_run(big)) is None
    assert checked == []


def test_the_run_a_create_made_is_in_memory_as_a_load_would_make_it(manager: RunManager):
    """Its ranks step it next: no load (three reads of the log) for the state just built."""
    record, created = manager.create_run(SPEC)
    assert created
    state = manager.loaded("job")
    assert state is not None
    loaded = RunManager(manager.store, manager.settings).state("job")  # another cache: from the log
    assert (state.horizon, state.last_seq, state.created_at, state.status, state.watching) == (
        loaded.horizon, loaded.last_seq, loaded.created_at, loaded.status, loaded.watching)
    assert list(state.values) == list(loaded.values)
