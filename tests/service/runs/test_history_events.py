"""A history shows a run's latest events, at most ``max_points`` of them, and how many there
are (``events_total``): each counted by the database, priced before any is read, and read
once per process, never more than it shows (``read_models.RunEvents``). The tree before showed
every event: a run's 200,000 operator actions were 25 MB in every history, decoded anew."""

from __future__ import annotations

import pytest
from lrserve.service.engine.cost import WorkBudgetExceeded
from lrserve.service.errors import RunConflict, RunNotFound
from lrserve.service.runs.read_models import SHOWN
from lrserve.service.settings import Settings

from tests.conftest import BACKENDS


@pytest.fixture(params=BACKENDS)
def url(request, database_url):
    return database_url(request.param)


def _scales(manager, n: int) -> None:
    for i in range(n):
        manager.control("r", {"action": "scale", "factor": 1.0}, None, actor="ops", reason=f"#{i}")


def _spy(manager, monkeypatch) -> list[tuple[dict, int]]:
    """Each read of a history's events: its bounds, and how many it decoded."""
    read: list[tuple[dict, int]] = []
    reading = manager.store.read_events_of

    def spied(run_id, kinds, **how):
        found = reading(run_id, kinds, **how)
        if tuple(kinds) == SHOWN:
            read.append((how, len(found)))
        return found

    monkeypatch.setattr(manager.store, "read_events_of", spied)
    return read


def _every(manager) -> list[tuple[int, str, str | None]]:
    store = manager.store  # read past the spy: every one of them
    return [(e.seq, e.kind.value, e.reason) for e in type(store).read_events_of(store, "r", SHOWN)]


def _shown(history) -> list[tuple[int, str, str | None]]:
    return [(e.seq, e.kind.value, e.reason) for e in history.events]


def test_a_history_shows_the_latest_events_and_reads_no_more_than_it_shows(url, open_manager, monkeypatch):
    manager = open_manager(Settings(db=url))
    manager.create_run({"run_id": "r", "schedule": {"type": "StepLR", "step_size": 10}, "base_lrs": [0.1]})
    _scales(manager, 250)
    read = _spy(manager, monkeypatch)

    history = manager.history("r", 100)
    every = _every(manager)
    assert len(every) == 251 and history.events_total == 251
    assert _shown(history) == every[-100:]  # the tree before: all 251
    assert [n for _, n in read] == [100]  # the latest 100, found by the database

    _scales(manager, 30)
    read.clear()
    history = manager.history("r", 100)
    every = _every(manager)
    assert history.events_total == 281 and _shown(history) == every[-100:]
    assert [(how["after_seq"], n) for how, n in read] == [(251, 30)]  # only the new ones

    read.clear()
    history = manager.history("r", 200)  # more than were kept (130): the latest 200 read anew
    assert history.events_total == 281 and _shown(history) == every[-200:]
    assert [n for _, n in read] == [200]
    read.clear()
    assert _shown(manager.history("r", 7)) == every[-7:] and read == []  # the same mark: kept

    restarted = open_manager(Settings(db=url))  # another process: nothing in memory
    read = _spy(restarted, monkeypatch)
    history = restarted.history("r", 50)
    assert history.events_total == 281 and _shown(history) == every[-50:]
    assert [n for _, n in read] == [50]


def test_a_historys_events_are_priced_before_any_is_read(url, open_manager, monkeypatch):
    """1,000 events at 16 units are over a 10,000-unit budget: a 422 naming ``max_points``,
    nothing read; 500 of them are within it."""
    manager = open_manager(Settings(db=url, work_budget=10_000))
    manager.create_run({"run_id": "r", "schedule": {"type": "StepLR", "step_size": 10}, "base_lrs": [0.1]})
    _scales(manager, 999)
    read = _spy(manager, monkeypatch)
    with pytest.raises(WorkBudgetExceeded, match=r"max_points.*1000 events|1000 events.*max_points"):
        manager.history("r", 1000)
    assert read == []
    history = manager.history("r", 500)
    assert history.events_total == 1000 and len(history.events) == 500
    assert history.events[-1].reason == "#998"


def test_a_run_created_again_counts_its_events_from_its_start(url, open_manager):
    manager = open_manager(Settings(db=url))
    spec = {"run_id": "r", "schedule": {"type": "StepLR", "step_size": 10}, "base_lrs": [0.1]}
    manager.create_run(spec)
    _scales(manager, 5)
    assert manager.history("r", 3).events_total == 6
    manager.delete_run("r")
    manager.create_run(spec)
    history = manager.history("r", 3)
    assert history.events_total == 1 and [e.kind.value for e in history.events] == ["created"]


def test_events_are_priced_before_the_metric_rows_share_out_the_budget(url, open_manager):
    """The events' price comes out of the budget before the long metric series share what is
    left: 20 series of 1,100 rows and 10 actions fit the default budget at 1,000 points (the
    events priced after the series took all of it: a 422)."""
    manager = open_manager(Settings(db=url))
    manager.create_run({"run_id": "r", "schedule": {"type": "StepLR", "step_size": 10}, "base_lrs": [0.1]})
    for name in range(20):
        records = [{"step": s, "name": f"m{name}", "value": 1.0, "rank": 0} for s in range(1100)]
        for start in range(0, len(records), 1000):
            manager.record_metrics("r", records[start:start + 1000])
    _scales(manager, 10)
    history = manager.history("r", 1000)
    assert len(history.metrics) == 20 and history.events_total == len(history.events) == 11
    assert all(0 < len(rows) <= 1000 for rows in history.metrics.values())


def test_a_process_keeps_no_more_events_of_a_run_than_its_last_history_showed(url, open_manager):
    manager = open_manager(Settings(db=url))
    manager.create_run({"run_id": "r", "schedule": {"type": "StepLR", "step_size": 10}, "base_lrs": [0.1]})
    kept = manager.reads.events._kept  # what a dashboard polling 10 points costs the process
    _scales(manager, 9)
    for _ in range(30):
        _scales(manager, 3)
        assert len(manager.history("r", 10).events) == 10
        assert len(kept.get("r").latest) == 10
    assert manager.history("r", 10).events_total == 100  # the tree before's first fix kept all 100


def test_an_events_payload_is_priced_by_its_length_before_it_is_read(url, open_manager, monkeypatch):
    """A ``replace_schedule`` carries a whole schedule: 25 of 10,000 milestones (~60 KB each) are
    ~11,700 units at 128 characters a unit, over a 10,000-unit budget however few events that
    is (at 16 units an event alone: 416); the latest 10 fit."""
    manager = open_manager(Settings(db=url, work_budget=10_000))
    manager.create_run({"run_id": "r", "schedule": {"type": "StepLR", "step_size": 10}, "base_lrs": [0.1]})
    schedule = {"type": "MultiStepLR", "milestones": list(range(1_000_000, 1_010_000)), "gamma": 0.5}
    for _ in range(25):
        manager.control("r", {"action": "replace_schedule", "schedule": schedule}, None)
    read = _spy(manager, monkeypatch)
    with pytest.raises(WorkBudgetExceeded, match=r"26 events of \d{7} bytes"):
        manager.history("r", 100)
    assert read == []
    history = manager.history("r", 10)
    assert history.events_total == 26 and [e.kind.value for e in history.events] == ["control"] * 10


def test_the_kept_events_are_weighed_with_the_new_ones(url, open_manager):
    """A history of 10 events keeps them with their payloads' bytes; the next one, after one
    more event, shows 9 of them and the new one, and weighs all ten."""
    manager = open_manager(Settings(db=url))
    manager.create_run({"run_id": "r", "schedule": {"type": "StepLR", "step_size": 10}, "base_lrs": [0.1]})
    schedule = {"type": "MultiStepLR", "milestones": list(range(1_000_000, 1_001_000)), "gamma": 0.5}
    for _ in range(10):
        manager.control("r", {"action": "replace_schedule", "schedule": schedule}, None)
    manager.history("r", 10)
    _scales(manager, 1)
    to_show = manager.reads.events.count("r", manager.history_mark("r"), 10)
    assert (to_show.from_kept, len(to_show.to_read)) == (9, 1)  # read: only the new one
    store = manager.store
    weighed = type(store).payload_sizes_of(store, "r", SHOWN, after_seq=0, through_seq=12, latest=10)
    assert to_show.payload_bytes == sum(size for _, size in weighed) > 9 * 8_000


def test_a_run_created_again_between_its_events_count_and_read_shows_none_of_the_new_runs(url, open_manager):
    """The new run's events count from seq 1 again, so the seqs weighed can match those read: the
    run's ``created_at`` is read again after them (a 409, nothing kept; a deleted run: a 404)."""
    spec = {"run_id": "r", "schedule": {"type": "StepLR", "step_size": 10}, "base_lrs": [0.1]}
    manager, other = open_manager(Settings(db=url)), open_manager(Settings(db=url))
    manager.create_run(spec)
    events = manager.reads.events
    to_show = events.count("r", manager.history_mark("r"), 10)  # the created event, to read
    other.delete_run("r")
    other.create_run({**spec, "base_lrs": [0.9]})
    with pytest.raises(RunConflict, match="deleted and created again"):
        events.read(to_show)
    assert "r" not in events._kept
    to_show = events.count("r", manager.history_mark("r"), 10)
    other.delete_run("r")
    with pytest.raises(RunNotFound):
        events.read(to_show)
