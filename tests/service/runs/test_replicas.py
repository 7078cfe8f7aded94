"""Several ``RunManager``s on one database, as several replicas or workers would run.

Each manager has its own store (its own connection pool), so nothing is shared but the
database: what one replica decides, the others must find in the log and apply
identically (API.md's three rules hold across processes). Every test runs on SQLite
and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from lrserve.service.errors import InvalidInput, RunConflict, RunNotFound, StoreUnavailable
from lrserve.service.runs.barrier import Barriers
from lrserve.service.runs.manager import RunManager
from lrserve.service.settings import Settings

from tests.conftest import BACKENDS
from tests.service.engine import reference
from tests.specs import plateau_on_any_rise, warmup_then

PLATEAU = plateau_on_any_rise()
WARMUP_PLATEAU = warmup_then(PLATEAU, steps=3, start_factor=0.25)


@pytest.fixture(params=BACKENDS)
def db_url(request, database_url) -> str:
    return database_url(request.param)


@pytest.fixture
def settings(db_url) -> Settings:
    return Settings(db=db_url, snapshot_every=10, max_jump=100, max_ahead=100, barrier_timeout_s=5)


@pytest.fixture
def replicas(settings, open_manager) -> list[RunManager]:
    """Three managers on one database; a third one is there to load runs late."""
    return [open_manager(settings) for _ in range(3)]


def create(manager: RunManager, run_id: str = "r", schedule=WARMUP_PLATEAU, world_size: int = 1) -> None:
    manager.create_run({"run_id": run_id, "schedule": schedule, "base_lrs": [0.1, 0.2],
                        "world_size": world_size})


def lrs(manager: RunManager, run_id: str, start: int, end: int) -> list:
    return [values[0] for values in manager.window(run_id, start, end - start).values]


class NoDatabase:
    """A store that fails the test on any use: what is served must come from memory."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the store was used ({name}) for a value already final in memory")


def test_final_values_are_served_without_the_database(replicas):
    a, b, _ = replicas
    create(a)
    lrs(b, "r", 0, 0)  # b loads the run before any snapshot: it holds every step from 0
    expected = lrs(a, "r", 0, 20)
    assert lrs(b, "r", 0, 20) == expected  # b catches up to a's horizon
    b.store = NoDatabase()
    assert lrs(b, "r", 3, 15) == expected[3:16]
    assert b.cached_window("r", 20, 0) is not None
    answer = b.step_run("r", 12, {}, 0, 5)  # a step without metrics at a final step
    assert [v[0] for v in answer.values] == expected[12:18]


def test_a_replica_catches_up_with_decisions_actions_and_status(replicas):
    a, b, _ = replicas
    create(a)
    lrs(b, "r", 0, 0)  # b has the run cached at horizon 0 from now on
    losses = [1.0, 0.9, 0.95, 0.96, 0.8, 0.85]
    for k, loss in enumerate(losses, start=1):
        a.step_run("r", k, {"val_loss": loss}, 0, 0)
    assert a.control("r", {"action": "hold"}, None)[0] == 7
    a.window("r", 7, 2)
    assert a.control("r", {"action": "resume"}, None)[0] == 10
    assert a.control("r", {"action": "stop"}, 12)[0] == 12
    for k in (10, 11, 12):
        a.step_run("r", k, {"val_loss": 2.0}, 0, 0)
    theirs = lrs(b, "r", 0, 14)  # b catches up (_catch_up) and takes steps 13, 14 itself
    assert theirs[:13] == lrs(a, "r", 0, 12)
    assert lrs(a, "r", 0, 14) == theirs
    assert (b.state("r").status, b.state("r").stopped_at) == ("stopped", 12)
    assert (a.state("r").status, a.state("r").stopped_at) == ("stopped", 12)
    kinds = [e.kind.value for e in b.history("r", 100).events]
    assert kinds.count("status") == 3 and kinds.count("control") == 3


def test_history_on_a_lagging_replica_reaches_the_stored_horizon(replicas):
    a, b, _ = replicas
    create(a, schedule={"type": "ExponentialLR", "gamma": 0.9})
    lrs(b, "r", 0, 0)
    a.window("r", 0, 30)
    history = b.history("r", 1000)
    assert history.steps[-1] == 30
    assert [list(v) for v in history.lrs] == [list(v) for v in lrs(a, "r", 0, 30)]


def test_actions_on_a_run_stopped_elsewhere_are_refused(replicas):
    a, b, _ = replicas
    create(a, schedule={"type": "ExponentialLR", "gamma": 0.9})
    lrs(b, "r", 0, 0)
    a.control("r", {"action": "stop"}, None)
    a.window("r", 0, 3)
    with pytest.raises(RunConflict):
        b.control("r", {"action": "scale", "factor": 0.5}, None)
    assert [e.kind.value for e in a.history("r", 10).events].count("control") == 1


def test_an_action_lands_above_the_horizon_another_replica_reached(replicas):
    a, b, _ = replicas
    create(a, schedule={"type": "ExponentialLR", "gamma": 0.9})
    lrs(b, "r", 0, 0)
    a.window("r", 0, 30)
    applied_at, _ = b.control("r", {"action": "scale", "factor": 0.5}, None)
    assert applied_at == 31
    with pytest.raises(InvalidInput):
        b.control("r", {"action": "scale", "factor": 0.5}, 20)


def test_delete_on_another_replica_is_404_there_at_its_next_commit(replicas):
    a, b, _ = replicas
    create(a)
    lrs(b, "r", 0, 10)
    a.delete_run("r")
    for call in (lambda: b.window("r", 11, 0), lambda: b.history("r", 10),
                 lambda: b.record_metrics("r", [{"name": "loss", "step": 1, "rank": 0, "value": 1.0}]),
                 lambda: b.control("r", {"action": "hold"}, None)):
        with pytest.raises(RunNotFound):
            call()


def test_a_run_created_anew_under_the_same_id_is_not_confused_with_the_old(replicas):
    a, b, c = replicas
    create(a)
    lrs(b, "r", 0, 50)
    a.delete_run("r")
    create(a, schedule={"type": "ExponentialLR", "gamma": 0.5})
    new = lrs(b, "r", 51, 52)  # b's next commit meets the new run
    assert lrs(b, "r", 0, 52) == lrs(c, "r", 0, 52)
    assert new == lrs(c, "r", 51, 52)
    assert a.store.read_run("r").horizon == 52


def test_the_jump_limit_counts_from_the_stored_horizon(replicas):
    a, b, _ = replicas
    create(a, schedule={"type": "ExponentialLR", "gamma": 0.99})
    lrs(b, "r", 0, 0)
    a.window("r", 0, 100)
    a.window("r", 100, 100)  # horizon 200; b still thinks 0 (max_jump is 100)
    assert lrs(b, "r", 150, 160) == lrs(a, "r", 150, 160)
    with pytest.raises(InvalidInput):
        b.window("r", 301, 0)


def test_a_snapshot_saved_by_one_replica_is_loaded_by_another(replicas):
    a, _, c = replicas
    create(a)
    for k in range(1, 36):
        a.step_run("r", k, {"val_loss": 1.0 + (k % 7) / 10}, 0, 0)
        if k == 17:
            a.control("r", {"action": "scale", "factor": 0.3}, None)
        if k == 25:
            a.control("r", {"action": "hold"}, None)
    assert a.store.load_snapshot("r") is not None
    loaded = c.state("r")
    assert loaded.first_step == 30  # from the snapshot, not a replay from step 0
    assert lrs(c, "r", 0, 35) == lrs(a, "r", 0, 35)
    assert loaded.status == a.state("r").status == "held"
    c.control("r", {"action": "resume"}, None)
    for k in range(36, 45):
        c.step_run("r", k, {"val_loss": 3.0}, 0, 0)
    assert lrs(a, "r", 0, 44) == lrs(c, "r", 0, 44)


def test_metric_barrier_with_ranks_on_two_replicas(replicas, settings):
    a, b, _ = replicas
    create(a, schedule=PLATEAU, world_size=2)
    losses = {0: [1.0, 1.5, 0.7, 0.9, 0.9], 1: [3.0, 2.6, 1.0, 0.9, 1.2]}
    gates = [Barriers(a, settings.barrier_timeout_s), Barriers(b, settings.barrier_timeout_s)]

    async def both(step: int):
        return await asyncio.gather(*(
            gates[rank].step("r", step, {"val_loss": losses[rank][step - 1]}, rank, 0) for rank in (0, 1)))

    answers = [asyncio.run(both(k)) for k in range(1, 6)]
    for first, second in answers:
        assert first.values == second.values
    means = [(x + y) / 2 for x, y in zip(losses[0], losses[1], strict=True)]
    expected = [lrs_ for lrs_, _ in reference.trajectory(PLATEAU, [0.1, 0.2], 6, means)]
    assert [list(first.values[0][0]) for first, _ in answers] == expected[1:]
    assert not [e for e in a.history("r", 10).events if e.kind.value == "barrier_timeout"]


def test_a_barrier_step_beyond_the_jump_limit_is_refused(replicas, settings):
    a, _, _ = replicas
    create(a, schedule=PLATEAU, world_size=2)
    gate = Barriers(a, settings.barrier_timeout_s)
    with pytest.raises(InvalidInput):
        asyncio.run(gate.step("r", 10_000_000, {"val_loss": 1.0}, 0, 0))


@contextmanager
def failing_commit(manager: RunManager, during) -> Iterator[None]:
    """Make the next commit of ``manager`` fail at its very end, after ``during()`` ran."""
    original = manager.store.lock_runs

    @contextmanager
    def lock_runs(run_ids, **kwargs):
        with original(run_ids, **kwargs) as locked:
            yield locked
            manager.store.lock_runs = original
            during()
            raise StoreUnavailable("the database went away just before COMMIT")

    manager.store.lock_runs = lock_runs
    try:
        yield
    finally:
        manager.store.lock_runs = original


def test_values_are_not_served_before_they_are_durable(replicas):
    """A commit that fails at COMMIT must not have shown its steps to anyone meanwhile."""
    a, _, c = replicas
    create(a, schedule=PLATEAU)
    a.step_run("r", 1, {"val_loss": 1.0}, 0, 0)
    answered: list = []
    early: list = []

    def meanwhile():  # another request for step 2 while step 2's commit is in flight
        reader = threading.Thread(target=lambda: answered.append(lrs(a, "r", 2, 2)))
        reader.start()
        reader.join(0.3)
        early.append(not reader.is_alive())

    with failing_commit(a, meanwhile), pytest.raises(StoreUnavailable):
        a.step_run("r", 2, {"val_loss": 5.0}, 0, 0)  # worse: this commit would halve the LR
    deadline = time.monotonic() + 10
    while not answered and time.monotonic() < deadline:
        time.sleep(0.01)
    assert early == [False], "a value was served before its commit was durable"
    assert answered == [lrs(c, "r", 2, 2)] == [[(0.1, 0.2)]]  # the log has no metric at step 2


def test_a_thread_waiting_on_a_failed_commit_starts_from_the_log(replicas):
    """The engine of a failed commit is dropped; a request that waited on it must not reuse it.

    Here the waiting request commits across a snapshot step: reusing the dropped engine
    would store a snapshot holding a decision the log never recorded.
    """
    a, _, c = replicas
    create(a, schedule=PLATEAU)
    for k in range(1, 10):
        a.step_run("r", k, {"val_loss": 1.0 - k / 100}, 0, 0)  # improving: no reduction
    answered: list = []

    def meanwhile():
        reader = threading.Thread(target=lambda: answered.append(lrs(a, "r", 10, 25)))
        reader.start()
        reader.join(0.3)

    with failing_commit(a, meanwhile), pytest.raises(StoreUnavailable):
        a.step_run("r", 10, {"val_loss": 5.0}, 0, 0)  # worse: this commit would halve the LR
    deadline = time.monotonic() + 10
    while not answered and time.monotonic() < deadline:
        time.sleep(0.01)
    assert answered == [[(0.1, 0.2)] * 16]  # the log holds no metric at step 10
    assert lrs(c, "r", 25, 30) == [(0.1, 0.2)] * 6  # nor does any snapshot (c loads from one)
    assert lrs(c, "r", 0, 30) == [(0.1, 0.2)] * 31
    assert "plateau_reduction" not in [e.kind.value for e in c.history("r", 100).events]


def test_a_commit_reads_the_run_before_its_lock_only_on_sqlite(replicas, monkeypatch):
    """PostgreSQL locks the run's row alone: a commit takes it first and computes inside it, one
    read of the run per commit (a read before the lock was a round trip of its own). SQLite's
    lock is the file's: a commit computes before it, reading the run first to see whether
    another process moved it. Both take in what another replica committed meanwhile."""
    a, b, _ = replicas
    create(a)
    lrs(b, "r", 0, 0)
    heads: list[str] = []
    original = a.store.run_head
    monkeypatch.setattr(a.store, "run_head", lambda run_id: heads.append(run_id) or original(run_id))
    for k in range(1, 4):
        a.step_run("r", k, {"val_loss": 1.0 / k}, 0, 0)
    b.step_run("r", 4, {"val_loss": 2.0}, 0, 0)  # b moves the run: a catches up in its next commit
    a.step_run("r", 5, {"val_loss": 2.0}, 0, 0)
    assert heads == (["r"] * 4 if a.store.one_writer else [])
    assert lrs(a, "r", 0, 5) == lrs(b, "r", 0, 5)
    assert a.store.read_run("r").horizon == 5


def test_a_replica_catches_up_while_another_holds_the_runs_lock(replicas):
    """Steps another process made are final: a replica reads their events and takes them
    without the run's row lock (on PostgreSQL a write transaction the deciding process's next
    commit would wait on; on SQLite the file's write slot)."""
    a, b, _ = replicas
    create(a, world_size=1)
    lrs(b, "r", 0, 0)
    expected = lrs(a, "r", 0, 8)
    caught = threading.Event()
    with a.store.lock_run("r"):
        thread = threading.Thread(target=lambda: (b.caught_up("r"), caught.set()))
        thread.start()
        assert caught.wait(timeout=60), "the replica waited for the run's lock to catch up"
    thread.join()
    assert b.state("r").horizon == 8
    b.store = NoDatabase()
    assert lrs(b, "r", 0, 8) == expected


def test_a_replica_catching_up_never_takes_the_events_of_a_run_created_anew_under_its_id(replicas):
    """Catching up without the lock reads the row, then the events: a run deleted and created
    anew in between must not lend its events (other inputs, another schedule) to the old run's
    steps. The replica loads the new run instead."""
    a, b, _ = replicas
    create(a, world_size=1)
    lrs(b, "r", 0, 0)  # b holds the first run at step 0
    lrs(a, "r", 0, 8)
    record = b.store.read_run("r")  # b read the first run's row (horizon 8)...
    a.delete_run("r")  # ...and before its read of the events the run was replaced
    create(a, schedule={"type": "StepLR", "step_size": 2, "gamma": 0.5}, world_size=1)
    expected = lrs(a, "r", 0, 12)
    state = b.committer.caught_up("r", record)
    # before: the old run, advanced on the new one's log
    assert state.created_at == a.store.read_run("r").created_at
    assert lrs(b, "r", 0, 12) == expected


def test_a_run_made_anew_here_after_another_replica_deleted_it_serves_its_own_values(replicas):
    # This replica still holds the first run's final values when another deletes it, and then
    # creates the same id anew (README: "do not reuse deleted run ids", but a job may): the run
    # it keeps is the new one, not the old values answered for it from memory.
    a, b, _ = replicas
    old = {"run_id": "again", "schedule": {"type": "StepLR", "step_size": 2, "gamma": 0.5}, "base_lrs": [0.1]}
    new = {**old, "base_lrs": [0.3]}
    a.create_run(old)
    assert a.window("again", 0, 5).values[0][0] == (0.1,)
    b.delete_run("again")
    record, created = a.create_run(new)
    assert created
    kept = a.cached_window("again", 0, 0)
    assert kept is None or kept.values[0][0] == (0.3,), kept
    assert a.window("again", 0, 5).values == b.window("again", 0, 5).values
    assert a.window("again", 0, 0).values[0][0] == (0.3,)


def test_a_group_of_windows_catches_up_with_what_another_replica_committed(replicas):
    """``windows_grouped`` (PostgreSQL's group of windows, in a commit thread) on a replica that
    another one moved on: it takes in the other's steps, decisions and actions in its group's
    transaction, commits the rest, and answers each window with the values the other serves;
    a window the other made final already is answered without a step of its own."""
    a, b, _ = replicas
    for run_id in ("r", "s", "t"):
        create(a, run_id)
        lrs(b, run_id, 0, 0)  # b has the runs cached at horizon 0 from now on
    for k, loss in enumerate([1.0, 0.9, 0.95, 0.96], start=1):
        a.step_run("r", k, {"val_loss": loss}, 0, 0)  # decisions: events b must read
    a.control("r", {"action": "scale", "factor": 0.5}, None)
    lrs(a, "s", 0, 6)  # steps alone, no events
    windows = b.windows_grouped([("r", 6, 2), ("s", 3, 1), ("t", 1, 0)], most_values=4096)
    assert all(w is not None and not isinstance(w, BaseException) for w in windows)
    r, s, t = windows
    assert [v[0] for v in r.values] == lrs(a, "r", 6, 8)
    assert [v[0] for v in s.values] == lrs(a, "s", 3, 4)
    assert [v[0] for v in t.values] == lrs(a, "t", 1, 1)
    assert [b.store.read_run(run_id).horizon for run_id in ("r", "s", "t")] == [8, 6, 1]
    assert b.history("r", 100).events == a.history("r", 100).events


def test_a_group_leaves_a_run_created_anew_elsewhere_to_its_own_commit(replicas):
    """A run deleted and created anew by another replica is not caught up in a group (its log is
    another run's): the group leaves it (None: the caller commits it on its own, which loads
    the new run), changing nothing of it."""
    a, b, _ = replicas
    create(a, "r", schedule={"type": "ExponentialLR", "gamma": 0.5})
    lrs(b, "r", 0, 2)
    a.delete_run("r")
    create(a, "r", schedule={"type": "ExponentialLR", "gamma": 0.9})
    assert b.windows_grouped([("r", 3, 0)], most_values=4096) == [None]
    assert b.store.read_run("r").horizon == 0
    assert lrs(b, "r", 3, 3) == lrs(a, "r", 3, 3) == [pytest.approx((0.1 * 0.9**3, 0.2 * 0.9**3))]


def test_a_group_leaves_a_run_whose_caught_up_schedule_makes_its_steps_big_work(replicas):
    """The cost of a group member's steps is known only once it caught up: another replica's
    ``replace_schedule`` may make them big work, which never runs in the group (it holds the
    other runs' rows). That run is left to its own commit (None), nothing of it written."""
    from lrserve.service.engine import cost
    from lrserve.service.runs.commit import ON_LOOP_WORK

    a, b, _ = replicas
    a.create_run({"run_id": "r", "schedule": {"type": "ExponentialLR", "gamma": 0.9}, "base_lrs": [0.1] * 64})
    lrs(b, "r", 0, 0)  # b has the run at horizon 0, its schedule the cheap one
    lrs(a, "r", 0, 3)
    dear = {"type": "LambdaLR", "lr_lambda": "+".join(["step"] * 99)}  # ~200 nodes: ~11 steps' worth each
    assert a.control("r", {"action": "replace_schedule", "schedule": dear}, None)[0] == 4
    lrs(a, "r", 4, 5)  # a took it past the action: from step 4 on, the dear schedule
    assert cost.cost(b.state("r").engine.schedule, n_groups=64, steps=9) <= ON_LOOP_WORK  # as b saw it
    windows = b.windows_grouped([("r", 9, 0)], most_values=4096)
    assert b.state("r").horizon == 5  # caught up to a's horizon in the group, the action taken in
    assert cost.cost(b.state("r").engine.schedule, n_groups=64, steps=4) > ON_LOOP_WORK
    assert windows == [None] and b.store.read_run("r").horizon == 5
    assert lrs(b, "r", 9, 9) == lrs(a, "r", 9, 9)  # its own commit takes it there
