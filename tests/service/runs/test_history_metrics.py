"""A history's metric series are read at a cost bounded by ``max_points`` and the number of
series, never by their length: a series of at most ``max_points`` rows is shown whole; a
longer one shows its ranks' rows at evenly spread steps, each rank's first and last kept
(``read_models.picks``); the mark that keeps answers counts at most ``MARK_METRIC_ROWS``."""

from __future__ import annotations

import pytest
from lrserve.service.api.fast_reads import HistoryAnswers
from lrserve.service.errors import InvalidInput
from lrserve.service.runs.read_models import downsample, picks
from lrserve.service.settings import Settings
from lrserve.service.store.base import MARK_METRIC_ROWS, MetricEnds
from lrserve.service.store.schema import metrics
from sqlalchemy import func, insert, literal, literal_column, select

from tests.conftest import BACKENDS

STEP_LR = {"type": "StepLR", "step_size": 10}


@pytest.fixture(params=BACKENDS)
def url(request, database_url):
    return database_url(request.param)


@pytest.fixture
def manager(url, open_manager):
    return _run(open_manager, Settings(db=url))


def _run(open_manager, settings: Settings):
    made = open_manager(settings)
    made.create_run({"run_id": "r", "schedule": STEP_LR, "base_lrs": [0.1]})
    return made


def _log(manager, name: str, steps, ranks=(0,)) -> None:
    records = [{"step": s, "name": name, "value": s + r / 10, "rank": r} for s in steps for r in ranks]
    for start in range(0, len(records), 1000):
        manager.record_metrics("r", records[start:start + 1000])


def _refuse_whole_reads(manager, monkeypatch) -> None:
    def whole(*_):
        raise AssertionError("a history read every metric row")

    monkeypatch.setattr(manager.store, "read_metrics", whole)


def test_a_long_series_shows_each_ranks_first_and_last_step_within_max_points(manager, monkeypatch):
    _log(manager, "loss", range(300), ranks=(0, 1, 2, 3))  # 1,200 rows
    _log(manager, "val", range(7, 300, 50))  # 6 rows: shown whole
    _log(manager, "late", range(0, 1000, 3))  # rank 0 from step 0; rank 5 at its last step only
    _log(manager, "late", [999], ranks=(5,))
    _refuse_whole_reads(manager, monkeypatch)  # the tree before read them all, then picked in Python

    shown = manager.history("r", 100).metrics

    loss = shown["loss"]
    assert len(loss) == 100
    for rank in range(4):
        steps = [s for s, r, _ in loss if r == rank]
        assert steps == list(downsample(range(300), 25))  # evenly spread, first and last kept
        assert all(v == s + rank / 10 for s, r, v in loss if r == rank)
    assert loss == sorted(loss, key=lambda row: row[:2])
    assert shown["val"] == [(s, 0, float(s)) for s in range(7, 300, 50)]
    late = shown["late"]  # the first logged step at or after each point: multiples of 3
    assert {r for _, r, _ in late} == {0, 5} and late[-2:] == [(999, 0, 999.0), (999, 5, 999.5)]
    assert all(s % 3 == 0 for s, _, _ in late) and len(late) <= 100
    assert [s for s, r, _ in late if r == 0][0] == 0


def test_picks_spread_steps_over_the_ranks_found_and_never_exceed_the_points():
    head = [(s, r, 0.0) for s in range(10, 14) for r in range(3)]  # 12 rows of ranks 0-2
    steps, ranks = picks(MetricEnds("m", head, [(500, 0, 0.0), (500, 7, 0.0)]), 11)
    assert ranks == [0, 1, 2, 7] and steps == [10, 500]  # 11 // 4 ranks: 2 steps, the first and the last
    many = [(0, r, 0.0) for r in range(40)]  # more ranks than points: the last step's first, highest first
    steps, ranks = picks(MetricEnds("m", many, [(9, r, 0.0) for r in range(30, 60)]), 40)
    assert steps == [9] and ranks == [*range(10), *range(30, 60)]
    assert picks(MetricEnds("m", many, [(9, 3, 0.0), (9, 5, 0.0)]), 1) == ([9], [5])  # the last row


def test_the_store_finds_the_first_logged_step_at_or_after_each_point(manager):
    _log(manager, "b", range(0, 100, 10), ranks=(0, 2))
    _log(manager, "a", [5])
    store = manager.store
    assert store.metric_names("r", 10) == ["a", "b"] and store.metric_names("r", 1) == ["a"]
    rows = store.metric_rows_at("r", "b", [0, 1, 9, 10, 95, 200], [0, 1, 2])
    assert rows == [(0, 0, 0.0), (0, 2, 0.2), (10, 0, 10.0), (10, 2, 10.2)]  # each step once, rank 1 absent
    ends = store.metric_ends("r", ["a", "b"], 3)
    assert ends[0] == MetricEnds("a", [(5, 0, 5.0)], [])
    assert ends[1].head == [(0, 0, 0.0), (0, 2, 0.2), (10, 0, 10.0)] and ends[1].last == [(90, 0, 90.0),
                                                                                            (90, 2, 90.2)]


def test_long_series_share_what_the_budget_leaves_and_too_many_are_refused(url, open_manager, monkeypatch):
    manager = _run(open_manager, Settings(db=url, work_budget=10_000))
    for name in "abcdef":
        _log(manager, name, range(101))  # six series of 101 rows: over 100 points, shown by seeks
    # one LR (7 units), the created event (16), six names (96), their ends (1,212 rows): 8,669
    # left, 45 rows of each (2 seeks a row: 8,640 units), not 100 (19,200)
    shown = manager.history("r", 100).metrics
    assert {name: len(rows) for name, rows in shown.items()} == dict.fromkeys("abcdef", 45)
    assert [s for s, _, _ in shown["a"]] == list(downsample(range(101), 45))
    assert {len(rows) for rows in manager.history("r", 40).metrics.values()} == {40}  # enough for all
    for name in range(34):  # 40 long series: 8,727 units before the seeks, 1,280 for one row each
        _log(manager, f"z{name:02}", range(101))
    with pytest.raises(InvalidInput) as refused:
        manager.history("r", 100)
    assert refused.value.errors[0].field == "max_points"
    assert "40 metric series, 40 of them over 100 rows" in str(refused.value)
    manager.create_run({"run_id": "many", "schedule": STEP_LR, "base_lrs": [0.1]})
    manager.record_metrics("many", [{"step": 0, "name": f"m{i:03}", "value": 1.0, "rank": 0}
                                    for i in range(700)])
    ends = []
    monkeypatch.setattr(manager.store, "metric_ends", lambda *args: ends.append(args))
    with pytest.raises(InvalidInput) as refused:  # one LR, one event (23 units): 623 names paid for
        manager.history("many", 100)
    assert "and 624 metric series costs" in str(refused.value) and ends == []  # one more found; no row read


def test_a_short_series_costs_its_rows_not_max_points(manager):
    for name in "abcdefgh":
        _log(manager, name, range(10))
    big = manager.history("r", 100_000)  # eight series of 100,001 rows would be 1.6 M units
    assert all(len(rows) == 10 for rows in big.metrics.values())


def test_a_run_of_more_rows_than_the_mark_counts_builds_each_history_anew(manager):
    store = manager.store
    counted = store.history_mark("r")
    assert counted.exact and counted.metric_rows == 0
    answers = HistoryAnswers()
    answers.put("r", 10, counted, b"{}")
    assert answers.get("r", 10, counted) == b"{}"
    with store._engine.begin() as conn:  # MARK_METRIC_ROWS + 1 rows in one statement
        steps = select(literal(0).label("step")).cte("steps", recursive=True)
        steps = steps.union_all(select(steps.c.step + 1).where(steps.c.step < MARK_METRIC_ROWS))
        conn.execute(insert(metrics).from_select(
            ["run_id", "name", "step", "rank", "value", "at"],
            select(literal("r"), literal("loss"), steps.c.step, literal(0), steps.c.step * 1.0,
                   literal_column("CURRENT_TIMESTAMP")),
        ))
        assert conn.execute(select(func.count()).select_from(metrics)).scalar_one() == MARK_METRIC_ROWS + 1
    mark = store.history_mark("r")
    assert not mark.exact and mark.metric_rows == MARK_METRIC_ROWS + 1
    assert answers.get("r", 10, mark) is None and answers.peek("r", 10) is None  # the old one gone
    answers.put("r", 10, mark, b"{}")  # (so the event loop never reads a mark for it again)
    assert answers.get("r", 10, mark) is None and len(answers) == 0  # an equal mark tells nothing
    history = manager.history("r", 10)
    assert [s for s, _, _ in history.metrics["loss"]] == list(downsample(range(MARK_METRIC_ROWS + 1), 10))
    _log(manager, "loss", [MARK_METRIC_ROWS + 5])
    assert manager.history_mark("r") == mark  # the count does not move past the cap ...
    assert manager.history("r", 10).metrics["loss"][-1][0] == MARK_METRIC_ROWS + 5  # ... the answer does


def test_a_history_reads_the_events_it_shows_and_never_decodes_a_metric_event(url, open_manager, monkeypatch):
    first = _run(open_manager, Settings(db=url))
    plateau = {"type": "ReduceLROnPlateau", "mode": "min", "factor": 0.5, "patience": 0, "monitor": "loss"}
    first.create_run({"run_id": "p", "schedule": plateau, "base_lrs": [0.1]})
    for step in range(1, 40):
        first.step_run("p", step, {"loss": 1.0}, 0, 0)  # a metric event a step, and reductions
    first.control("p", {"action": "hold"}, None)
    before = first.history("p", 100).events  # every one (at most 41)
    restarted = open_manager(Settings(db=url))  # another process: nothing in memory
    restarted.state("p")  # loaded first: a load reads the metrics above its snapshot (no snapshot here)
    read = []
    reading = restarted.store.read_events_of

    def spied(run_id, kinds, **how):
        found = reading(run_id, kinds, **how)
        read.extend((run_id, e.kind) for e in found)
        return found

    def whole(*_args, **_kwargs):
        raise AssertionError("a history read the whole log")

    monkeypatch.setattr(restarted.store, "read_events", whole)
    monkeypatch.setattr(restarted.store, "read_events_of", spied)
    after = restarted.history("p", 100).events
    assert [(e.seq, e.kind) for e in after] == [(e.seq, e.kind) for e in before]
    assert {kind for _, kind in read} == {e.kind for e in before}  # no metric event among them
    assert {e.kind.value for e in before} >= {"created", "plateau_reduction", "control"}


def test_a_historys_events_stop_at_its_mark_and_the_next_one_shows_what_came_after(manager, monkeypatch):
    mark = manager.history_mark("r")
    manager.control("r", {"action": "hold"}, None)  # after the mark
    assert [e.kind.value for e in manager.history("r", 10, mark).events] == ["created"]
    assert [e.kind.value for e in manager.history("r", 10).events] == ["created", "control"]  # not skipped
    read = []
    reading = manager.store.read_events_of
    monkeypatch.setattr(manager.store, "read_events_of",
                        lambda *args, **how: read.append(how) or reading(*args, **how))
    assert [e.kind.value for e in manager.history("r", 20).events] == ["created", "control"]
    assert read == []  # the same mark: the events kept are all there is to read
