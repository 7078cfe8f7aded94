"""Group commit (``service/runs/group_commit.py``): commits of many runs queued while one
transaction is written go in the next one together; each is acknowledged only once that
transaction committed, a failure reaches every commit of its group, and a commit refused
on its own (its run moved or is gone) leaves the others of its group standing. That is
SQLite (one writer per file); PostgreSQL commits side by side, each in its own transaction.
On both, replicas committing the same runs at once agree (and never deadlock).

The first writer is held before its transaction begins until the others have queued,
so the groups are known, not left to timing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from lrserve.service.errors import RunNotFound, StoreUnavailable
from lrserve.service.runs.manager import RunManager
from lrserve.service.settings import Settings

from tests.conftest import BACKENDS
from tests.specs import plateau_on_any_rise

PLATEAU = plateau_on_any_rise()
RUNS = [f"r{i}" for i in range(6)]
GUARD_S = 30.0


@pytest.fixture(params=BACKENDS)
def settings(request, database_url) -> Settings:
    return Settings(db=database_url(request.param), snapshot_every=10, max_jump=100, max_ahead=100)


@pytest.fixture
def grouped(replicas) -> list[RunManager]:
    if not replicas[0].store.one_writer:
        pytest.skip("PostgreSQL commits side by side, each in its own transaction: no GroupCommit "
                    "(its windows' groups: test_grouped_windows.py)")
    return replicas


@pytest.fixture
def replicas(settings, open_manager) -> list[RunManager]:
    managers = [open_manager(settings) for _ in range(3)]
    for run_id in RUNS:
        managers[0].create_run({"run_id": run_id, "schedule": PLATEAU, "base_lrs": [0.1, 0.2]})
        managers[0].window(run_id, 0, 0)  # loaded: a commit now is one group member
    return managers


@contextmanager
def groups_held(manager: RunManager, queued: int, then: Callable[[], None] = lambda: None,
                fail_second: bool = False) -> Iterator[list[list[str]]]:
    """Record each transaction's runs; hold the first one until ``queued`` commits wait behind
    it, then run ``then()``; ``fail_second``: the second transaction fails just before COMMIT."""
    store = manager.store
    original = store.lock_runs
    groups: list[list[str]] = []

    def lock_runs(run_ids, **kwargs):
        groups.append(sorted(run_ids))
        if len(groups) == 1:
            deadline = time.monotonic() + GUARD_S
            while len(manager.committer.group._queue) < queued:
                assert time.monotonic() < deadline, "the other commits never queued"
                time.sleep(0.005)
            then()
        if len(groups) == 2 and fail_second:
            return failing(original(run_ids, **kwargs))
        return original(run_ids, **kwargs)

    @contextmanager
    def failing(inner):
        with inner as locked:
            yield locked
            raise StoreUnavailable("the database went away just before COMMIT")

    store.lock_runs = lock_runs
    try:
        yield groups
    finally:
        store.lock_runs = original


def step_all(manager: RunManager, run_ids: list[str], step: int) -> dict[str, object]:
    """Each run's ``step`` (with a metric) from its own thread, the first run's first:
    what each got, an answer or an error."""
    outcomes: dict[str, object] = {}

    def step_one(run_id: str) -> None:
        try:
            outcomes[run_id] = manager.step_run(run_id, step, {"val_loss": 1.0}, 0, 0)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            outcomes[run_id] = exc

    first = threading.Thread(target=step_one, args=(run_ids[0],))
    first.start()
    deadline = time.monotonic() + GUARD_S
    while not manager.committer.group._writing:  # the first writer is in (held, see above)
        assert time.monotonic() < deadline
        time.sleep(0.001)
    others = [threading.Thread(target=step_one, args=(run_id,)) for run_id in run_ids[1:]]
    for thread in others:
        thread.start()
    for thread in [first, *others]:
        thread.join(GUARD_S)
    assert len(outcomes) == len(run_ids)
    return outcomes


def test_commits_queued_behind_a_transaction_go_in_the_next_one_together(grouped):
    a, _, c = grouped
    with groups_held(a, queued=len(RUNS) - 1) as groups:
        outcomes = step_all(a, RUNS, 1)
    assert groups == [RUNS[:1], RUNS[1:]]
    for run_id in RUNS:
        window = outcomes[run_id]
        assert not isinstance(window, Exception), window
        assert window.start == 1 and a.state(run_id).horizon == 1
        assert c.store.read_run(run_id).horizon == 1  # durable: another store reads it
        assert c.window(run_id, 0, 1).values == a.window(run_id, 0, 1).values
        assert [e.kind.value for e in c.store.read_events(run_id)] == ["created", "metric"]


def test_a_failed_group_fails_every_commit_in_it_and_shows_none(grouped):
    a, _, c = grouped
    with groups_held(a, queued=len(RUNS) - 1, fail_second=True) as groups:
        outcomes = step_all(a, RUNS, 1)
    assert groups == [RUNS[:1], RUNS[1:]]
    assert not isinstance(outcomes[RUNS[0]], Exception)
    for run_id in RUNS[1:]:
        assert isinstance(outcomes[run_id], StoreUnavailable)
        assert a.state(run_id).horizon == 0  # nothing computed for it was shown (reloaded)
        assert c.store.read_run(run_id).horizon == 0
        assert a.step_run(run_id, 1, {"val_loss": 1.0}, 0, 0).start == 1  # and it commits again
        assert c.store.read_run(run_id).horizon == 1


def test_a_commit_refused_on_its_own_leaves_its_group_standing(grouped):
    """While the group waits, another replica moves one of its runs and deletes another: that
    commit computes again from the log, the deleted run's is a 404, the rest go through."""
    a, b, c = grouped
    moved, deleted = RUNS[1], RUNS[2]
    b.window(moved, 0, 0)

    def meanwhile() -> None:
        b.step_run(moved, 1, {"val_loss": 5.0}, 0, 3)  # b decides step 1 first, and goes to 4
        b.delete_run(deleted)

    with groups_held(a, queued=len(RUNS) - 1, then=meanwhile) as groups:
        outcomes = step_all(a, RUNS, 1)
    assert groups[:2] == [RUNS[:1], RUNS[1:]]
    assert isinstance(outcomes[deleted], RunNotFound)
    assert not isinstance(outcomes[moved], Exception), outcomes[moved]
    assert a.state(moved).horizon == c.store.read_run(moved).horizon == 4
    assert a.window(moved, 0, 4).values == c.window(moved, 0, 4).values == b.window(moved, 0, 4).values
    for run_id in set(RUNS) - {moved, deleted}:
        assert not isinstance(outcomes[run_id], Exception), outcomes[run_id]
        assert c.store.read_run(run_id).horizon == 1


def test_replicas_committing_the_same_runs_at_once_agree(replicas):
    """Two replicas, a thread per run on each, every step of every run reported to both (the
    same metric): groups on both sides lock overlapping runs; nothing deadlocks or fails,
    and every replica serves the same values as one that loads the runs afterwards."""
    a, b, c = replicas
    steps = 12
    errors: list[BaseException] = []

    def drive(manager: RunManager, run_id: str) -> None:
        try:
            for k in range(1, steps + 1):
                manager.step_run(run_id, k, {"val_loss": 1.0 / (1 + k % 4)}, 0, 0)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            errors.append(exc)

    threads = [threading.Thread(target=drive, args=(m, run_id)) for run_id in RUNS for m in (a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    for run_id in RUNS:
        assert c.store.read_run(run_id).horizon == steps
        expected = c.window(run_id, 0, steps).values
        assert a.window(run_id, 0, steps).values == expected
        assert b.window(run_id, 0, steps).values == expected
