"""The metric barrier inside the server: who decides, who is woken, who asks the store.

Every test runs on SQLite and on PostgreSQL; "replicas" are managers with their own
stores on one database, as separate processes would be.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest
from lrserve.service.errors import StoreUnavailable
from lrserve.service.runs import barrier as barrier_module
from lrserve.service.runs.barrier import Barriers
from lrserve.service.runs.manager import RankReport, RunManager
from lrserve.service.settings import Settings

from tests.conftest import BACKENDS
from tests.service.engine import reference
from tests.specs import plateau_on_any_rise

PLATEAU = plateau_on_any_rise()
GUARD_S = 120  # only so that a broken wake-up fails instead of hanging; nothing is timed


@pytest.fixture(params=BACKENDS)
def settings(request, database_url) -> Settings:
    return Settings(db=database_url(request.param), max_jump=100, max_ahead=100, barrier_timeout_s=3600)


@pytest.fixture
def replicas(settings, open_manager) -> list[RunManager]:
    return [open_manager(settings) for _ in range(2)]


def create(manager: RunManager, world_size: int, run_id: str = "r") -> None:
    manager.create_run({"run_id": run_id, "schedule": PLATEAU, "base_lrs": [0.1], "world_size": world_size})


def report(manager: RunManager, step: int, rank: int, loss: float, ahead: int = 0) -> bool:
    metrics = {"val_loss": loss, "acc": 0.5}
    return manager.report_ranks_to_barrier("r", step, [RankReport(rank, metrics, {"val_loss": loss})], ahead)


@contextmanager
def counting(obj, name: str) -> Iterator[list[tuple]]:
    """Count the calls of ``obj.name`` (the real method still runs)."""
    original = getattr(obj, name)
    calls: list[tuple] = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    setattr(obj, name, wrapper)
    try:
        yield calls
    finally:
        setattr(obj, name, original)


@contextmanager
def report_transactions(manager: RunManager) -> Iterator[list[tuple]]:
    """Count the transactions that write barrier reports: ``add_barrier_reports`` (SQLite) or
    the run's transaction that writes them and decides (PostgreSQL, ``report_to_barrier``)."""
    with counting(manager.store, "add_barrier_reports") as alone, \
            counting(manager.committer, "report_to_barrier") as locked:
        both: list[tuple] = []
        yield both
        both.extend(alone + locked)


def test_the_last_report_decides_with_the_rank_order_mean_and_commits_the_window(replicas):
    a, _ = replicas
    create(a, world_size=3)
    assert not report(a, 1, 2, 3.0)
    assert not report(a, 1, 0, 1.0)
    assert a.state("r").horizon == 0
    assert report(a, 1, 1, 2.0, ahead=4)
    assert a.state("r").horizon == 5  # the decision and the window its rank asked for, together
    assert a.store.read_run("r").horizon == 5
    [metric] = [e for e in a.store.read_events("r") if e.kind.value == "metric"]
    assert (metric.step, metric.payload["values"]) == (1, {"val_loss": (1.0 + 2.0 + 3.0) / 3})
    history = a.store.read_metrics("r")
    assert [r for _, r, _ in history["acc"]] == [0, 1, 2]  # every report's history, once


def test_a_report_for_a_step_decided_on_another_replica_is_final_at_once(replicas):
    a, b = replicas
    create(a, world_size=2)
    assert not report(b, 1, 0, 1.0)
    assert report(b, 1, 1, 3.0)
    with counting(a.committer, "commit") as commits:
        assert report(a, 1, 0, 9.0)  # a retry through another replica: history only
    assert commits == []
    assert a.window("r", 1, 0).values == b.window("r", 1, 0).values


def test_two_last_reports_on_two_replicas_are_settled_by_asking_the_store(replicas):
    """On PostgreSQL two last reports may each miss the other; the waiters' poll decides."""
    a, b = replicas
    create(a, world_size=2)
    a.store.add_barrier_reports("r", 1, {0: {"val_loss": 1.0}})  # as if both crossed
    b.store.add_barrier_reports("r", 1, {1: {"val_loss": 3.0}})
    assert a.resolve_barrier("r", 1, timed_out=False, ahead=2)
    assert b.resolve_barrier("r", 1, timed_out=False)
    assert a.store.read_run("r").horizon == 3
    assert a.window("r", 1, 2).values == b.window("r", 1, 2).values
    assert not [e for e in a.history("r", 10).events if e.kind.value == "barrier_timeout"]


def test_a_replica_that_learns_of_another_ones_decision_holds_the_window_for_its_ranks(replicas):
    """The one question a waiting process asks takes it to the decided horizon: every rank
    waiting there is answered from memory, none goes to a worker thread for its window."""
    a, b = replicas
    create(a, world_size=2)
    b.state("r")  # b serves ranks of the run: loaded at horizon 0
    assert not report(b, 1, 0, 1.0)
    assert report(a, 1, 1, 3.0, ahead=4)  # a decides, with the window its rank asked for
    assert b.resolve_barrier("r", 1, timed_out=False, ahead=4)
    window = b.cached_window("r", 1, 4)
    assert window is not None and window.values == a.window("r", 1, 4).values


def test_ranks_waiting_in_the_process_of_the_last_report_are_woken_by_it(replicas, monkeypatch):
    a, _ = replicas
    create(a, world_size=4)
    monkeypatch.setattr(barrier_module, "POLL_S", 3600.0)  # no poll would come in time
    gate = Barriers(a, timeout_s=3600)
    losses = [1.0, 2.0, 4.0, 0.5]

    async def ranks():
        return await asyncio.wait_for(asyncio.gather(*(
            gate.step("r", 1, {"val_loss": losses[r]}, r, 2) for r in range(4))), GUARD_S)

    with counting(a, "resolve_barrier") as asked:
        answers = asyncio.run(ranks())
    # SQLite: the last report's own transaction saw all four. PostgreSQL: concurrent reports
    # may miss each other, and the fourth one counted here asks the store once.
    assert len(asked) <= 1
    assert len({tuple(w.values) for w in answers}) == 1 and answers[0].start == 1
    assert len(answers[0].values) == 3


@contextmanager
def held_first_write(manager: RunManager, gate: Barriers, fail_second: bool = False) -> Iterator[list]:
    """Hold the barrier's first report write (in its worker thread) until ``release()`` is
    called on what this yields; yields the ranks of each write, in order."""
    import threading

    release = threading.Event()

    class Writes(list):
        def release(self) -> None:
            release.set()

    writes = Writes()
    original = manager.report_ranks_to_barrier

    def write(run_id, step, reports, ahead=0):
        writes.append([r.rank for r in reports])
        if len(writes) == 1:
            assert release.wait(GUARD_S)
        elif fail_second and len(writes) == 2:
            raise StoreUnavailable("the database failed")
        return original(run_id, step, reports, ahead)

    manager.report_ranks_to_barrier = write
    try:
        yield writes
    finally:
        manager.report_ranks_to_barrier = original


async def queued_reports(gate: Barriers, n: int) -> None:
    """Until ``n`` reports wait for the write in progress (what the test arranges; not timed)."""
    deadline = asyncio.get_running_loop().time() + GUARD_S
    while sum(len(b.queued) for b in gate._open.values()) < n:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)


def test_ranks_that_report_while_a_report_is_written_go_in_one_transaction(replicas):
    a, _ = replicas
    create(a, world_size=5)
    gate = Barriers(a, timeout_s=3600)
    losses = [1.0, 2.0, 4.0, 0.5, 3.0]

    async def ranks(writes):
        first = asyncio.create_task(gate.step("r", 1, {"val_loss": losses[0]}, 0, 0))
        while not writes:
            await asyncio.sleep(0.01)
        others = [asyncio.create_task(gate.step("r", 1, {"val_loss": losses[r]}, r, 3)) for r in range(1, 5)]
        await queued_reports(gate, 4)
        writes.release()
        return await asyncio.wait_for(asyncio.gather(first, *others), GUARD_S)

    with held_first_write(a, gate) as writes, report_transactions(a) as transactions:
        answers = asyncio.run(ranks(writes))
    assert writes == [[0], [1, 2, 3, 4]] and len(transactions) == 2
    assert len({w.values[0] for w in answers}) == 1 and [len(w.values) for w in answers] == [1, 4, 4, 4, 4]
    [metric] = [e for e in a.store.read_events("r") if e.kind.value == "metric"]
    assert metric.payload["values"] == {"val_loss": sum(losses) / 5}  # the rank-order mean, as ever
    assert a.state("r").horizon == 4  # the window the group asked for (ahead=3), with the decision
    assert sorted(r for _, r, _ in a.store.read_metrics("r")["val_loss"]) == [0, 1, 2, 3, 4]


def test_a_failed_group_write_fails_each_of_its_ranks_and_their_retries_decide(replicas):
    a, _ = replicas
    create(a, world_size=3)
    gate = Barriers(a, timeout_s=3600)

    async def ranks(writes):
        first = asyncio.create_task(gate.step("r", 1, {"val_loss": 1.0}, 0, 0))
        while not writes:
            await asyncio.sleep(0.01)
        others = [asyncio.create_task(gate.step("r", 1, {"val_loss": 2.0}, r, 0)) for r in (1, 2)]
        await queued_reports(gate, 2)
        writes.release()
        failed = await asyncio.wait_for(asyncio.gather(*others, return_exceptions=True), GUARD_S)
        assert not first.done()  # its report stands: it waits for the others
        retried = [gate.step("r", 1, {"val_loss": 3.0}, r, 0) for r in (1, 2)]  # as clients retry
        return failed, await asyncio.wait_for(asyncio.gather(first, *retried), GUARD_S)

    with held_first_write(a, gate, fail_second=True) as writes:
        failed, answers = asyncio.run(ranks(writes))
    assert [type(e) for e in failed] == [StoreUnavailable, StoreUnavailable]
    assert len({tuple(w.values) for w in answers}) == 1
    [metric] = [e for e in a.store.read_events("r") if e.kind.value == "metric"]
    assert metric.payload["values"] == {"val_loss": (1.0 + 3.0 + 3.0) / 3}
    assert gate._open == {}


def test_a_rank_twice_in_one_group_keeps_its_first_report(replicas):
    a, _ = replicas
    create(a, world_size=2)
    reports = [RankReport(0, {"val_loss": v}, {"val_loss": v}) for v in (1.0, 5.0)]
    assert not a.report_ranks_to_barrier("r", 1, reports)
    assert a.store.read_barrier("r", 1).reports == {0: {"val_loss": 1.0}}
    assert a.store.read_metrics("r")["val_loss"] == [(1, 0, 1.0)]


def test_ranks_waiting_on_one_replica_meet_a_rank_reporting_to_another(replicas, monkeypatch):
    a, b = replicas
    create(a, world_size=3)
    monkeypatch.setattr(barrier_module, "POLL_S", 0.05)
    gates = [Barriers(a, 3600), Barriers(b, 3600)]
    losses = {0: [1.0, 1.5, 0.7], 1: [3.0, 2.6, 1.0], 2: [2.0, 2.0, 2.0]}
    replica_of = {0: 0, 1: 0, 2: 1}  # ranks 0 and 1 wait on a; rank 2 reports to b

    async def step(k: int):
        async def rank(r: int):
            if r == 2:
                await asyncio.sleep(0.2)  # let a's ranks wait long enough to poll
            return await gates[replica_of[r]].step("r", k, {"val_loss": losses[r][k - 1]}, r, 0)
        return await asyncio.wait_for(asyncio.gather(*(rank(r) for r in range(3))), GUARD_S)

    answers = [asyncio.run(step(k)) for k in (1, 2, 3)]
    for ranks in answers:
        assert len({tuple(w.values) for w in ranks}) == 1
    means = [sum(losses[r][k] for r in range(3)) / 3 for k in range(3)]
    expected = [lrs for lrs, _ in reference.trajectory(PLATEAU, [0.1], 4, means)]
    assert [list(ranks[0].values[0][0]) for ranks in answers] == expected[1:]


def test_a_waiting_rank_times_out_into_a_decision_with_the_ranks_that_reported(replicas):
    a, _ = replicas
    create(a, world_size=3)
    gate = Barriers(a, timeout_s=0.3)
    answer = asyncio.run(asyncio.wait_for(gate.step("r", 1, {"val_loss": 2.0}, 1, 0), GUARD_S))
    assert answer.start == 1 and a.state("r").horizon == 1
    [timeout] = [e for e in a.history("r", 10).events if e.kind.value == "barrier_timeout"]
    assert timeout.payload["missing_ranks"] == [0, 2] and timeout.payload["reported_ranks"] == [1]


def test_a_window_commit_skips_the_store_when_the_run_is_there_already(replicas):
    a, _ = replicas
    create(a, world_size=1)
    a.window("r", 0, 10)
    with counting(a.store, "lock_runs") as transactions:
        a.committer.commit("r", 8, if_behind=True)
        assert transactions == []
        a.committer.commit("r", 8)  # without it: the store is asked (another replica may have moved on)
        assert len(transactions) == 1


def test_on_postgres_ranks_waiting_on_one_replica_are_woken_by_a_notification(replicas, monkeypatch):
    """Polls are an hour apart: only NOTIFY can bring the other replica's report in time, and
    it brings both crossings: the last report seen here, or the decision taken there."""
    a, b = replicas
    if a.store.run_listener() is None:
        pytest.skip("SQLite cannot notify another process: its replicas poll (the test above)")
    create(a, world_size=3)
    monkeypatch.setattr(barrier_module, "POLL_S", 3600.0)
    monkeypatch.setattr(barrier_module, "NOTIFIED_POLL_S", 3600.0)
    gates = [Barriers(a, 3600, a.store.run_listener()), Barriers(b, 3600, b.store.run_listener())]

    async def step(k: int, last_on: int):
        for gate in gates:
            await gate.start()
        try:
            while not all(gate._listening for gate in gates):
                await asyncio.sleep(0.01)

            async def rank(r: int):
                if r == 2:
                    await asyncio.sleep(0.2)  # ranks 0 and 1 wait on a first
                return await gates[last_on if r == 2 else 0].step("r", k, {"val_loss": 1.0 + r}, r, 0)
            return await asyncio.wait_for(asyncio.gather(*(rank(r) for r in range(3))), GUARD_S)
        finally:
            for gate in gates:
                await gate.close()

    for k, last_on in ((1, 1), (2, 1)):
        ranks = asyncio.run(step(k, last_on))
        assert len({tuple(w.values) for w in ranks}) == 1 and ranks[0].start == k
    assert a.store.read_run("r").horizon == 2


def test_on_postgres_a_barrier_is_decided_once_in_the_transaction_of_its_last_reports(replicas, monkeypatch):
    """Six ranks of a run report to two replicas at once, three barriers in a row: every write
    transaction of the run is a group of reports, one of them decides (under the run's row
    lock, the tally read there), and no transaction decides after them; one decision per
    barrier, the same window for every rank. Before: the decision was a transaction of its own
    after the completing reports, and two last reports that missed each other were each
    settled by asking the store."""
    a, b = replicas
    if a.store.one_writer:
        pytest.skip("SQLite: writers take turns; the decision is its own transaction, in a group commit")
    create(a, world_size=6)
    monkeypatch.setattr(barrier_module, "POLL_S", 0.05)  # the other replica's ranks ask the store
    gates = [Barriers(a, 3600), Barriers(b, 3600)]

    async def step(k: int):
        return await asyncio.wait_for(asyncio.gather(*(
            gates[r % 2].step("r", k, {"val_loss": 1.0 + r * k}, r, 0) for r in range(6))), GUARD_S)

    with ExitStack() as stack:
        transactions = [stack.enter_context(counting(m.store, name))
                        for m in replicas for name in ("lock_runs", "add_barrier_reports")]
        groups = [stack.enter_context(counting(m, "report_ranks_to_barrier")) for m in replicas]
        for k in (1, 2, 3):
            answers = asyncio.run(step(k))
            assert len({tuple(w.values) for w in answers}) == 1 and answers[0].start == k
    assert sum(map(len, transactions)) == sum(map(len, groups))
    decisions = [(e.step, e.payload["values"]) for e in a.store.read_events("r") if e.kind.value == "metric"]
    assert decisions == [(k, {"val_loss": sum(1.0 + r * k for r in range(6)) / 6}) for k in (1, 2, 3)]
    assert a.store.read_run("r").horizon == 3
