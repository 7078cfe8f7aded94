"""History after a restart reads the stored final LRs of the steps it shows (value chunks,
saved with each snapshot): its cost follows ``max_points``, not the run's length."""

from __future__ import annotations

import pytest
from lrserve.service.runs.cache import RunCache
from lrserve.service.runs.manager import RunManager
from lrserve.service.runs.read_models import History
from lrserve.service.settings import Settings
from lrserve.service.store import open_store
from sqlalchemy import event

from tests.conftest import BACKENDS

COSINE = {"type": "CosineAnnealingLR", "T_max": 700}


@pytest.fixture(params=BACKENDS)
def url(request, database_url):
    return database_url(request.param)


def test_history_after_a_restart_reads_stored_values_without_replay(url, monkeypatch):
    settings = Settings(db=url)  # a snapshot (and its value chunk) every 1000 steps
    store = open_store(url)
    try:
        first = RunManager(store, settings)
        first.create_run({"run_id": "long", "schedule": COSINE, "base_lrs": [0.1, 0.05]})
        for start in range(0, 2_800, 400):  # across snapshots; the last 400 steps after the last one
            first.window("long", start, 399)
        before = first.history("long", 57)
    finally:
        store.close()
    store = open_store(url)  # a new process: nothing in memory
    try:
        second = RunManager(store, settings)
        replays = []
        monkeypatch.setattr(RunCache, "values_between", lambda *args: replays.append(args))
        after = second.history("long", 57)
        assert replays == []
        assert (after.steps, after.lrs) == (before.steps, before.lrs)
        assert len(after.steps) == 57 and after.steps[-1] == 2_799
        assert store.read_lrs("long", [0, 1_234]) == {0: (0.1, 0.05), 1_234: before_lrs(before, 1_234)}
        statements = []
        event.listen(store._engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
        shown = list(range(0, 2_000, 3))  # across two chunks: one statement however many steps
        assert len(store.read_lrs("long", shown)) == len(shown)
        assert len([s for s in statements if "value_chunks" in s]) == 1
    finally:
        store.close()


def before_lrs(history: History, step: int) -> tuple[float, ...]:
    from lrserve.service.engine.engine import Engine
    from lrserve.service.engine.spec import parse_schedule

    engine = Engine(parse_schedule(COSINE, n_groups=2), [0.1, 0.05])
    for _ in range(step):
        engine.advance()
    return engine.values()[0]
