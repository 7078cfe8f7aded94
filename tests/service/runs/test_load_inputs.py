"""Loading a run reads its operator actions and the inputs placed above its snapshot, not its
whole log (``replay.apply_stored_inputs``), and serves what a process that never stopped
serves: a new schedule that watches another metric, taken before the snapshot; an action
placed far ahead before it; spike-guard reports ahead of the horizon; and, from another
process committing between the load's reads, what a catch-up brings."""

from __future__ import annotations

import pytest
from lrserve.service.errors import RunConflict
from lrserve.service.settings import Settings
from lrserve.service.store.events import EventKind

from tests.conftest import BACKENDS

PLATEAU = {"type": "ReduceLROnPlateau", "mode": "min", "factor": 0.5, "patience": 1, "monitor": "loss"}
WATCHING_ACC = {**PLATEAU, "monitor": "acc", "mode": "max"}
GUARD = {"type": "SpikeGuard", "schedule": {"type": "StepLR", "step_size": 4}, "warmup_reports": 3}


@pytest.fixture(params=BACKENDS)
def url(request, database_url):
    return database_url(request.param)


def _start(open_manager, url):
    """A manager (a process) with the two runs at step 12, snapshots at 5 and 10."""
    settings = Settings(db=url, snapshot_every=5)
    first = open_manager(settings)
    first.create_run({"run_id": "p", "schedule": PLATEAU, "base_lrs": [0.1]})
    first.create_run({"run_id": "g", "schedule": GUARD, "base_lrs": [0.1]})
    for step in range(1, 13):
        if step == 2:  # taken at step 4, before the snapshots: from then on "acc" is what counts
            first.control("p", {"action": "replace_schedule", "schedule": WATCHING_ACC}, 4)
            first.control("p", {"action": "scale", "factor": 0.25}, 30)  # far ahead
        first.step_run("p", step, {"loss": 1.0, "acc": 0.5}, 0, 0)
        first.window("g", step, 0)
        first.record_metrics("g", [{"step": step, "name": "loss", "value": 9.0 if step == 11 else 1.0,
                                    "rank": 0}])  # applies at the next step: ahead of the horizon
    return first, settings


def _spy(store, monkeypatch, between=None) -> list:
    """The events the store's ``read_events_of`` gives (``between``: called after its first call)."""
    read, reading = [], store.read_events_of

    def spied(run_id, kinds, **how):
        found = reading(run_id, kinds, **how)
        read.extend(found)
        if between is not None and len(read) == len(found):
            between()
        return found

    def whole(*_args, **_kwargs):
        raise AssertionError("a load read the whole log")

    monkeypatch.setattr(store, "read_events", whole)
    monkeypatch.setattr(store, "read_events_of", spied)
    return read


def test_a_run_loaded_from_its_inputs_serves_what_a_process_that_never_stopped_serves(url, open_manager,
                                                                                      monkeypatch):
    first, settings = _start(open_manager, url)
    restarted = open_manager(settings)  # another process: nothing in memory
    read = _spy(restarted.store, monkeypatch)
    for run in ("p", "g"):  # loaded from the snapshot at step 10
        stored = restarted.store.read_run(run).last_seq
        assert restarted.state(run).last_seq == first.state(run).last_seq == stored
    assert {e.step for e in read if e.kind is EventKind.METRIC} == {11, 12, 13}  # above it, only
    assert restarted.state("p").watched == first.state("p").watched
    for step in range(13, 21):  # "acc" rising then flat: the plateau of the new schedule acts
        for manager in (first, restarted):
            manager.step_run("p", step, {"loss": 1.0, "acc": min(step, 15) / 10}, 0, 0)
    later = {manager: [manager.window(run, 1, 35).values for run in ("p", "g")]
             for manager in (restarted, first)}
    assert later[restarted] == later[first]
    lrs = [values[0][0] for values in later[first][0]]
    assert lrs[19] < lrs[14]  # reduced on "acc", the metric the new schedule watches
    assert lrs[29] == pytest.approx(lrs[28] * 0.25)  # step 30: the action placed before the snapshots


def test_what_another_process_commits_between_the_loads_reads_comes_with_the_catch_up(url, open_manager,
                                                                                       monkeypatch):
    first, settings = _start(open_manager, url)
    restarted = open_manager(settings)

    def another_process_commits():  # after the load read the actions, before it reads the metrics
        first.control("p", {"action": "scale", "factor": 0.5}, 16)
        first.step_run("p", 13, {"loss": 1.0, "acc": 0.5}, 0, 0)

    _spy(restarted.store, monkeypatch, another_process_commits)
    loaded = restarted.state("p")
    assert loaded.last_seq < first.state("p").last_seq  # the row's, read before they committed
    values = {manager: manager.window("p", 13, 10).values for manager in (restarted, first)}
    assert values[restarted] == values[first]  # the scale at 16 caught up, not skipped
    assert values[first][3][0][0] == pytest.approx(values[first][2][0][0] * 0.5)


def test_with_the_default_snapshots_a_load_reads_the_metrics_after_the_last(url, open_manager, monkeypatch):
    settings = Settings(db=url)  # a snapshot every 1,000 steps
    first = open_manager(settings)
    first.create_run({"run_id": "p", "schedule": PLATEAU, "base_lrs": [0.1]})
    for step in range(1, 1_006):
        first.step_run("p", step, {"loss": 1.0 if step < 1_003 else 2.0}, 0, 0)
    restarted = open_manager(settings)
    read = _spy(restarted.store, monkeypatch)
    assert restarted.state("p").first_step == 1_000
    assert {e.step for e in read if e.kind is EventKind.METRIC} == {1_001, 1_002, 1_003, 1_004, 1_005}
    values = {manager: manager.window("p", 1_000, 10).values for manager in (restarted, first)}
    assert values[restarted] == values[first]


def _replaced_once(monkeypatch, store, other, spec) -> None:
    """Another process deletes the run and creates it again (``spec``) right before ``store``'s
    next snapshot read: between a load's first read (the run's row) and its others."""
    reading = store.load_snapshot

    def replacing(run_id, **how):
        monkeypatch.setattr(store, "load_snapshot", reading)
        other.delete_run(run_id)
        other.create_run(spec)
        other.control(run_id, {"action": "set_lr", "lr": 0.7}, 2)
        return reading(run_id, **how)

    monkeypatch.setattr(store, "load_snapshot", replacing)


def test_a_run_replaced_between_a_loads_reads_is_loaded_again_not_mixed(url, open_manager, monkeypatch):
    """The tree before built the old run's row with the new run's log: its spec (LR 0.1), its
    horizon and none of the new one's action, where the new run is at 0.2 and set to 0.7 at
    step 2."""
    settings = Settings(db=url)
    first, other = open_manager(settings), open_manager(settings)
    first.create_run({"run_id": "x", "schedule": {"type": "StepLR", "step_size": 100}, "base_lrs": [0.1]})
    first.window("x", 0, 3)
    loading = open_manager(settings)  # a process that has not loaded it yet
    new = {"run_id": "x", "schedule": {"type": "StepLR", "step_size": 100}, "base_lrs": [0.2]}
    _replaced_once(monkeypatch, loading.store, other, new)
    # steps 0-3: the old run's final ones, served from the mixed state by the tree before
    assert [v[0] for v in loading.window("x", 0, 3).values] == [(0.2,), (0.2,), (0.7,), (0.7,)]
    assert [v[0] for v in other.window("x", 0, 3).values] == [(0.2,), (0.2,), (0.7,), (0.7,)]


X = {"run_id": "x", "schedule": {"type": "StepLR", "step_size": 100}, "base_lrs": [0.1]}


def _loaded_from_a_snapshot(open_manager, url):
    """Another process's manager, and one (a process) that loaded run ``x`` from its snapshot
    at step 10: steps 0-9 are replayed when read."""
    settings = Settings(db=url, snapshot_every=5)
    first, other = open_manager(settings), open_manager(settings)
    first.create_run(X)
    first.window("x", 0, 12)
    reader = open_manager(settings)
    reader.state("x")
    return other, reader


def test_old_steps_of_a_run_replaced_since_it_loaded_are_a_409_and_the_next_read_the_new_runs(
        url, open_manager):
    other, reader = _loaded_from_a_snapshot(open_manager, url)
    other.delete_run("x")
    other.create_run({**X, "base_lrs": [0.2]})
    other.window("x", 0, 12)
    with pytest.raises(RunConflict, match="deleted and created again"):
        reader.values_between("x", 0, 3)  # the tree before: the new run's values, as the old run's
    assert [v[0] for v in reader.values_between("x", 0, 3)] == [(0.2,)] * 4


def test_old_steps_of_a_run_replaced_while_they_are_read_are_a_409(url, open_manager, monkeypatch):
    from lrserve.service.runs import cache

    other, reader = _loaded_from_a_snapshot(open_manager, url)
    applying = cache.apply_stored_inputs

    def replacing(*args, **how):  # between the replay's reads and its check
        monkeypatch.setattr(cache, "apply_stored_inputs", applying)
        applying(*args, **how)
        other.delete_run("x")
        other.create_run({**X, "base_lrs": [0.2]})

    monkeypatch.setattr(cache, "apply_stored_inputs", replacing)
    with pytest.raises(RunConflict, match="deleted and created again"):
        reader.values_between("x", 0, 3)
    assert [v[0] for v in reader.values_between("x", 0, 0)] == [(0.2,)]


def test_a_run_replaced_at_every_try_of_a_load_is_a_409(url, open_manager, monkeypatch):
    settings = Settings(db=url)
    other = open_manager(settings)
    other.create_run(X)
    loading = open_manager(settings)
    reading = loading.store.load_snapshot
    tries = []

    def replacing(run_id, **how):
        tries.append(run_id)
        other.delete_run(run_id)
        other.create_run(X)
        return reading(run_id, **how)

    monkeypatch.setattr(loading.store, "load_snapshot", replacing)
    with pytest.raises(RunConflict, match="3 times"):
        loading.state("x")
    assert len(tries) == 3
    monkeypatch.setattr(loading.store, "load_snapshot", reading)
    assert loading.state("x").horizon == 0


def test_old_steps_whose_reads_fail_on_a_run_replaced_meanwhile_are_a_409_not_the_failure(
        url, open_manager, monkeypatch):
    """Reads that mixed two runs may not even make a state (another run's snapshot, of other
    groups): where the run was replaced meanwhile, that is a 409, and where it was not, the
    failure itself."""
    from lrserve.service.runs import cache

    other, reader = _loaded_from_a_snapshot(open_manager, url)

    def failing(*_args, **_how):
        raise ValueError("a state of two runs' reads")

    monkeypatch.setattr(cache, "apply_stored_inputs", failing)
    with pytest.raises(ValueError, match="two runs"):
        reader.values_between("x", 0, 3)  # not replaced: the failure

    def replaced_then_failing(*_args, **_how):
        other.delete_run("x")
        other.create_run({**X, "base_lrs": [0.2, 0.2]})  # other groups
        failing()

    monkeypatch.setattr(cache, "apply_stored_inputs", replaced_then_failing)
    with pytest.raises(RunConflict, match="deleted and created again"):
        reader.values_between("x", 0, 3)
