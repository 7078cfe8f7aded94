"""Two real server processes (replicas) on one PostgreSQL database, and ``kill -9`` of one.

Ranks of a world-size-1 run alternate between the replicas step by step; the two ranks of
a world-size-2 run meet at the metric barrier from different replicas (rank 0 always posts
to replica A, rank 1 to replica B); an operator, a metric logger and a reader add load
through both. Replica B is killed with SIGKILL in the middle of it: the clients fail over
to A, which goes on with the same values, and B, restarted on the same database, serves
them too. Over every answer: zero finality violations, identical values on every rank at
every step, every acknowledged metric and action in history.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.load import CLOCK_RUNNING_ACTIONS, Ledger, Load, check_everything, create_run
from tests.live_server import ServerProcess

pytestmark = pytest.mark.slow

RUNS = ("solo", "bar")
STEPS = 90
ENV = {"LRSERVE_BARRIER_TIMEOUT_S": "20", "LRSERVE_SNAPSHOT_EVERY": "25"}


def test_replicas_share_one_truth_through_a_kill_9(database_url, tmp_path):
    db = database_url("postgres")
    a = ServerProcess(db, tmp_path, env=ENV).start()
    b = ServerProcess(db, tmp_path, env=ENV).start()
    try:
        for url in (a.url, b.url):  # every rank may create: idempotent on every replica
            create_run(url, "solo", world_size=1)
            create_run(url, "bar", world_size=2)
        ledger = Ledger()
        load = Load([a.url, b.url], ledger, deadline=time.monotonic() + 45)
        actions = lambda: len(ledger.controls) >= 5  # noqa: E731 - some land while the runs are live
        ranks = [load.spawn(load.rank, "solo", r, STEPS, lambda k, r=r: (k + r) % 2, True, actions)
                 for r in (0, 1)]
        ranks += [load.spawn(load.rank, "bar", r, STEPS, lambda k, r=r: r, True, actions) for r in (0, 1)]
        # "bar" must show plateau decisions: it gets no hold, which would stop them for as
        # long as the operator's timing happens to keep it held ("solo" gets every action).
        load.spawn(load.operator, RUNS, 0.1, {"bar": CLOCK_RUNNING_ACTIONS})
        load.spawn(load.logger, RUNS)
        load.spawn(load.reader, RUNS, 11)

        slowest = lambda: min(ledger.progress(run, r) for run in RUNS for r in (0, 1))  # noqa: E731
        load.wait_for(lambda: slowest() >= STEPS // 3)
        b.kill()
        at_kill = slowest()
        load.wait_for(lambda: slowest() >= 2 * STEPS // 3)
        assert slowest() > at_kill, "replica A did not go on alone"
        b = ServerProcess(db, tmp_path, port=b.port, env=ENV).start()
        load.finish(ranks)

        assert all(ledger.progress(run, r) == STEPS for run in RUNS for r in (0, 1)), ledger.errors
        assert len(ledger.controls) >= 5
        check_everything([a.url, b.url], ledger, RUNS)  # b, restarted, serves every value too
        events = [e["kind"] for e in _history(a.url, "bar")["events"]]
        assert "plateau_reduction" in events and "barrier_timeout" not in events
    finally:
        a.stop()
        b.stop()


def _history(url: str, run_id: str) -> dict:
    import httpx

    return httpx.get(f"{url}/v1/runs/{run_id}/history", params={"max_points": 100_000}, timeout=60).json()
