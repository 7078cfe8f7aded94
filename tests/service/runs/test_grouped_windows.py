"""``RunManager.windows_grouped``: on PostgreSQL, the windows asked in one turn of the event loop
committed in one commit thread and one transaction (``service.api.fast_path``'s group), as
SQLite's loop commits them (``windows_now``, tests/service/runs/test_now.py). Each ask's outcome
is its window, durable; or its own error; or None, nothing of it changed, where the group would
wait for it (another thread holds the run, another transaction its row) or it is big work —
the caller then commits it on its own. What another process committed is taken in on the way.
"""

from __future__ import annotations

import threading
import uuid

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as examples
from hypothesis import strategies as st
from lrserve.service.errors import StoreUnavailable
from lrserve.service.runs.manager import RunManager
from lrserve.service.settings import Settings
from lrserve.service.store import open_store

from tests.service.runs.conftest import transactions

ONE_CYCLE = {"type": "OneCycleLR", "max_lr": 0.5, "total_steps": 8}  # it fails past step 8
RUNS = ["g0", "g1", "g2", "g3"]
MOST = 4096


@pytest.fixture
def settings(database_url) -> Settings:
    return Settings(db=database_url("postgres"), snapshot_every=200, max_jump=500, max_ahead=500)


@pytest.fixture
def managers(settings, open_manager) -> list[RunManager]:
    """Two managers (as two processes) on one PostgreSQL schema; four runs loaded in the first."""
    a, b = open_manager(settings), open_manager(settings)
    for run_id in RUNS:
        a.create_run({"run_id": run_id, "schedule": ONE_CYCLE, "base_lrs": [0.1, 0.2],
                      "base_momentums": [0.9, 0.8]})
        a.window(run_id, 0, 0)
    return [a, b]


def horizons(manager: RunManager, runs=RUNS) -> list[int]:
    return [manager.store.read_run(run_id).horizon for run_id in runs]


def test_windows_asked_together_commit_in_one_transaction(managers, monkeypatch):
    a, b = managers
    opened = transactions(a, monkeypatch)
    asks = [("g0", 1, 0), ("g1", 2, 1), ("g2", 1, 3), ("g3", 0, 0), ("g0", 1, 0)]  # g3: final; g0 twice
    windows = a.windows_grouped(asks, most_values=MOST)
    assert opened == [["g0", "g1", "g2"]]  # one transaction for every run with steps to commit
    for (run_id, step, ahead), window in zip(asks, windows, strict=True):
        assert window is not None and not isinstance(window, BaseException)
        assert (window.run_id, window.start, len(window.values)) == (run_id, step, ahead + 1)
        assert window.values == b.window(run_id, step, ahead).values  # durable: another process reads them
    assert horizons(b) == [1, 3, 4, 0]


def test_one_asks_failure_before_writing_leaves_the_others_standing(managers):
    a, b = managers
    # g0: OneCycleLR has no step 9; g2: far (its own commit reads the stored horizon); g3: negative
    asks = [("g0", 9, 0), ("g1", 3, 0), ("g2", 50_000, 0), ("g3", -1, 0)]
    failed, window, too_far, negative = a.windows_grouped(asks, most_values=MOST)
    assert type(failed).__name__ == "ScheduleError" and type(negative).__name__ == "InvalidInput"
    assert too_far is None
    assert window is not None and not isinstance(window, BaseException) and window.start == 3
    assert horizons(b) == [0, 3, 0, 0]
    assert a.loaded("g0") is None  # dropped, as a failed commit drops it: its own commit reloads
    assert a.window("g0", 8, 0).start == 8  # steps up to the schedule's end are still served


def test_a_failed_transaction_acknowledges_none_of_its_windows(managers, monkeypatch):
    a, b = managers

    def broken(cursor, txs):
        raise StoreUnavailable("the database went away")

    monkeypatch.setattr(a.store, "_write_held", broken)
    outcomes = a.windows_grouped([("g0", 1, 0), ("g1", 2, 0)], most_values=MOST)
    assert [type(o).__name__ for o in outcomes] == ["StoreUnavailable"] * 2
    assert horizons(b, ["g0", "g1"]) == [0, 0]
    assert a.loaded("g0") is None and a.loaded("g1") is None  # computed ahead of the store: reload
    monkeypatch.undo()
    assert a.windows_grouped([("g0", 1, 0)], most_values=MOST) == [None]  # not loaded: its own commit's
    a.state("g0"), a.state("g1")  # loaded again (as that commit would)
    again = a.windows_grouped([("g0", 1, 0), ("g1", 2, 0)], most_values=MOST)
    assert horizons(b, ["g0", "g1"]) == [1, 2]
    assert [w.values for w in again] == [b.window("g0", 1, 0).values, b.window("g1", 2, 0).values]  # type: ignore[union-attr]


def test_runs_it_would_wait_for_are_left_to_their_own_commits(managers):
    """Not loaded, big, held by another thread, or its row held by another transaction (another
    process committing it): None, and the others go through without waiting for them."""
    a, b = managers
    assert a.windows_grouped([("nope", 1, 0), ("g1", 1, 5000)], most_values=MOST) == [None] * 2
    with a.state("g1").lock:  # another thread holds g1: g0 goes through alone
        first, held = a.windows_grouped([("g0", 1, 0), ("g1", 1, 0)], most_values=MOST)
    assert held is None and first is not None
    entered, release = threading.Event(), threading.Event()

    def hold_g2() -> None:  # as another process's commit, which may compute a big window in it
        with b.store.lock_run("g2"):
            entered.set()
            assert release.wait(30)

    holder = threading.Thread(target=hold_g2)
    holder.start()
    try:
        assert entered.wait(30)
        second, row_held = a.windows_grouped([("g0", 2, 0), ("g2", 1, 0)], most_values=MOST)
        assert row_held is None and second is not None and second.start == 2
    finally:
        release.set()
        holder.join(30)
    assert horizons(b, ["g0", "g1", "g2"]) == [2, 0, 0]
    assert [a.loaded(r).horizon for r in ("g0", "g1", "g2")] == [2, 0, 0]  # type: ignore[union-attr]
    (window,) = a.windows_grouped([("g2", 1, 0)], most_values=MOST)  # free again
    assert window is not None and horizons(b, ["g2"]) == [1]


def test_old_steps_to_replay_are_left_to_their_own_request(managers, settings, open_manager):
    """A window of steps below the snapshot a process loaded its run from (a rank resuming from
    an old checkpoint) needs a replay of the run's log: never in the group, whose other runs
    would wait for it (one group at a time per process), but in its own request's thread."""
    a, _ = managers
    a.create_run({"run_id": "long", "schedule": {"type": "ExponentialLR", "gamma": 0.99}, "base_lrs": [0.1]})
    a.window("long", 0, 250)  # a snapshot at step 200
    c = open_manager(settings)
    c.window("long", 250, 0)  # c loads it from that snapshot: the steps below it are not held
    c.state("g1")
    replays = []
    values_between = c.runs.values_between
    c.runs.values_between = lambda *args: replays.append(args) or values_between(*args)
    old, new = c.windows_grouped([("long", 5, 0), ("g1", 1, 0)], most_values=MOST)
    assert old is None and replays == []
    assert new is not None and not isinstance(new, BaseException) and new.start == 1
    assert c.window("long", 5, 0).values == a.window("long", 5, 0).values  # its own request replays
    assert replays == [("long", 5, 5)]


_OPS = st.lists(
    st.tuples(st.sampled_from(["a group", "b group", "a window", "b window", "a scale", "b scale"]),
              st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True),  # which runs
              st.integers(1, 4),  # steps past the highest one served so far
              st.integers(0, 3)),  # ahead
    min_size=1, max_size=14)


@examples(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_groups_and_single_commits_in_two_processes_serve_one_truth(managers, settings, ops):
    """Windows asked in groups and one at a time, by two managers (two processes) on one
    PostgreSQL schema, with operator actions in between: every value served for a step is the
    one every later answer gives for it (finality), and the one a third manager loading the
    runs from the log afterwards gives (what a restart gives)."""
    a, b = managers
    runs = [f"p{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
    for i, run_id in enumerate(runs):
        schedule = [{"type": "ExponentialLR", "gamma": 0.9}, {"type": "StepLR", "step_size": 3},
                    {"type": "CosineAnnealingLR", "T_max": 20}][i]
        a.create_run({"run_id": run_id, "schedule": schedule, "base_lrs": [0.1, 0.2]})
    served: dict[tuple[str, int], object] = {}
    top = dict.fromkeys(runs, 0)

    def keep(window) -> None:
        for k, values in enumerate(window.values):
            key = (window.run_id, window.start + k)
            assert served.setdefault(key, values) == values, key  # a final value never changes
            top[window.run_id] = max(top[window.run_id], key[1])

    for op, which, delta, ahead in ops:
        manager = a if op[0] == "a" else b
        asked = [(runs[i], top[runs[i]] + delta, ahead) for i in which]
        if op.endswith("group"):
            for ask, window in zip(asked, manager.windows_grouped(asked, most_values=MOST), strict=True):
                assert not isinstance(window, BaseException), window
                keep(window if window is not None else manager.window(*ask))  # left out: on its own
        elif op.endswith("window"):
            for ask in asked:
                keep(manager.window(*ask))
        else:
            for run_id, _, _ in asked:
                manager.control(run_id, {"action": "scale", "factor": 0.5}, None)
    store = open_store(settings.db)  # closed at each example's end: a test of many examples
    fresh = RunManager(store, settings)
    try:
        for run_id in runs:
            for step, values in enumerate(fresh.window(run_id, 0, top[run_id]).values):
                assert served.get((run_id, step), values) == values, (run_id, step)
    finally:
        fresh.close()
        store.close()
