"""``lrserve serve --workers 2``: two worker processes on one database, SQLite or PostgreSQL.

New connections spread over the workers, so concurrent ranks of one run reach both with
plateau metrics, barrier reports and operator actions: no answer may ever contradict another.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import BACKENDS
from tests.e2e.load import Ledger, Load, check_everything, create_run
from tests.live_server import ServerProcess

pytestmark = pytest.mark.slow

RUNS = ("solo", "bar")
STEPS = 40


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_workers_keep_finality(backend, database_url, tmp_path):
    db = database_url(backend)
    server = ServerProcess(db, tmp_path, workers=2, env={"LRSERVE_BARRIER_TIMEOUT_S": "20",
                                                         "LRSERVE_SNAPSHOT_EVERY": "15"})
    with server:
        create_run(server.url, "solo", world_size=1)
        create_run(server.url, "bar", world_size=2)
        ledger = Ledger()
        load = Load([server.url], ledger, deadline=time.monotonic() + 40, keepalive=False)
        actions = lambda: len(ledger.controls) >= 5  # noqa: E731 - some land while the runs are live
        ranks = [load.spawn(load.rank, run_id, r, STEPS, lambda k: 0, True, actions)
                 for run_id in RUNS for r in (0, 1)]
        load.spawn(load.operator, RUNS, 0.1)
        load.spawn(load.logger, RUNS)
        load.spawn(load.reader, RUNS, 7)
        load.finish(ranks)
        assert all(ledger.progress(run_id, r) == STEPS for run_id in RUNS for r in (0, 1)), ledger.errors
        assert len(ledger.controls) >= 5
        check_everything([server.url], ledger, RUNS)
