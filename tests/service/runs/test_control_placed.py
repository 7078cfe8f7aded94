"""A control commit takes its action into the run's state as parsed once (``replay.apply_control``),
not parsed back from its stored payload; the state it leaves is the one a replay of the log
gives (another replica loading the run), on SQLite and on PostgreSQL."""

from __future__ import annotations

import pytest
from lrserve.service.errors import InvalidInput, RunConflict
from lrserve.service.runs import replay
from lrserve.service.runs.manager import RunManager
from lrserve.service.runs.state import RunState
from lrserve.service.settings import Settings

from tests.conftest import BACKENDS
from tests.specs import plateau_on_any_rise

PLATEAU = plateau_on_any_rise()
NEW_SCHEDULE = {"type": "ReduceLROnPlateau", "monitor": "val_acc", "mode": "max", "factor": 0.5}
ACTIONS = [
    {"action": "scale", "factor": 0.5},
    {"action": "set_lr", "lr": 0.03},
    {"action": "hold"},
    {"action": "resume"},
    {"action": "replace_schedule", "schedule": NEW_SCHEDULE},
]


def _queued(state: RunState) -> dict[int, list[tuple[object, str, str | None]]]:
    """The actions queued for their steps: what, by whom, why."""
    return {s: [(c.action, c.actor, c.reason) for c in cs] for s, cs in state.inputs.actions.items() if cs}


@pytest.fixture(params=BACKENDS)
def settings(request, database_url) -> Settings:
    return Settings(db=database_url(request.param), snapshot_every=1000, max_jump=100, max_ahead=100)


@pytest.fixture
def managers(settings, open_manager) -> tuple[RunManager, RunManager]:
    a, b = open_manager(settings), open_manager(settings)
    a.create_run({"run_id": "r", "schedule": PLATEAU, "base_lrs": [0.1, 0.2]})
    a.window("r", 0, 3)
    return a, b


def test_a_placed_action_is_not_parsed_back_from_its_payload(managers, monkeypatch):
    a, _ = managers
    parsed: list[object] = []
    real = replay.parse_action
    monkeypatch.setattr(replay, "parse_action", lambda payload: parsed.append(payload) or real(payload))
    for action in ACTIONS:
        a.control("r", action, None)
    assert parsed == []  # before: one parse of each action's stored payload, per commit


@pytest.mark.parametrize("request_", ACTIONS, ids=[a["action"] for a in ACTIONS])
def test_the_live_state_after_an_action_is_the_replayed_one(managers, request_):
    a, b = managers
    at, event = a.control("r", request_, 6, actor="ops", reason="why")
    assert (at, event.step, event.actor, event.reason) == (6, 6, "ops", "why")
    live = a.loaded("r")
    replayed = b.state("r")  # loaded from the log by another manager, as another process would
    assert live is not None and replayed is not live
    assert replayed.last_seq == live.last_seq
    assert _queued(live) == _queued(replayed)
    assert (live.watched, live.guard_monitors) == (replayed.watched, replayed.guard_monitors)
    assert a.window("r", 4, 8).values == b.window("r", 4, 8).values  # the action applied alike
    assert a.window("r", 4, 8).status == b.window("r", 4, 8).status


@pytest.mark.parametrize("stop_at", [None, 5])
def test_a_run_with_a_stop_placed_takes_no_action_at_or_after_it(managers, stop_at):
    """A stop placed ahead (or on the first free step, not yet final) stops the run after its
    step: an action placed at or after it would change a stopped run's LRs, and a ``resume``
    there was recorded as the run's status though the run stays stopped. Both are refused as
    on a stopped run; an action placed before the stop still goes in."""
    a, b = managers
    stops_after, _ = a.control("r", {"action": "stop"}, stop_at)
    for at in (stops_after, stops_after + 3):
        for request_ in ({"action": "set_lr", "lr": 0.7}, {"action": "resume"}):
            with pytest.raises(RunConflict, match=f"stops after step {stops_after}"):
                a.control("r", request_, at)
    if stop_at is None:  # both on the first free step: the resume after the stop
        with pytest.raises(RunConflict):
            a.control("r", {"action": "resume"}, None)
    else:  # before the stop: taken
        assert a.control("r", {"action": "scale", "factor": 0.5}, stop_at - 1)[0] == stop_at - 1
    with pytest.raises(RunConflict):  # another process holding the run as stored refuses it too
        b.control("r", {"action": "set_lr", "lr": 0.7}, stops_after + 1)
    window = a.window("r", 0, stops_after + 4)
    assert (window.status, window.stopped_at) == ("stopped", stops_after)
    statuses = [(e.step, e.payload["status"]) for e in a.store.read_events("r") if e.kind.value == "status"]
    assert statuses == [(stops_after, "stopped")]  # no "active" recorded after it


def test_an_action_checked_against_a_run_another_process_replaced_is_checked_again(managers):
    """Another process deleted the run and created it anew with other param groups after this
    one loaded it: an action is checked against the new run (a 422 naming ``lrs`` where it was
    a 500), and placed on its first free step, not moved to the old run's horizon."""
    a, b = managers
    assert a.loaded("r").horizon == 3
    b.delete_run("r")
    b.create_run({"run_id": "r", "schedule": PLATEAU, "base_lrs": [0.1, 0.2, 0.3]})
    with pytest.raises(InvalidInput) as refused:
        a.control("r", {"action": "set_lr", "lrs": [0.5, 0.5]}, None)
    assert "lrs" in str(refused.value.errors)
    at, event = a.control("r", {"action": "scale", "factor": 0.5}, None)
    assert (at, event.step) == (1, 1)
    assert b.store.read_run("r").horizon == 0  # nobody asked for a step of the new run
    assert a.window("r", 0, 2).values == b.window("r", 0, 2).values


def test_a_process_that_loaded_the_run_before_a_stop_was_placed_elsewhere_refuses_under_the_lock(managers):
    """b holds the run as it was before a placed the stop: its own check passes, and the check
    made under the run's lock, on the run as stored, refuses."""
    a, b = managers
    b.window("r", 0, 3)  # loaded now, without the stop
    a.control("r", {"action": "stop"}, 5)
    with pytest.raises(RunConflict, match="stops after step 5"):
        b.control("r", {"action": "set_lr", "lr": 0.7}, 7)
    assert [e.kind.value for e in a.store.read_events("r")][-1] == "control"  # the stop, last


def test_a_stop_placed_below_pending_actions_stops_the_run_there_for_good(managers):
    """Actions placed before a stop was placed below them keep their steps (the log is the
    log), but the run is stopped from the stop's step: the ``resume`` and a second stop after it
    record no status, and ``stopped_at`` is the first stop's step."""
    a, _ = managers
    a.control("r", {"action": "resume"}, 8)
    a.control("r", {"action": "stop"}, 9)
    a.control("r", {"action": "stop"}, 5)
    window = a.window("r", 0, 10)
    assert (window.status, window.stopped_at) == ("stopped", 5)
    statuses = [(e.step, e.payload["status"]) for e in a.store.read_events("r") if e.kind.value == "status"]
    assert statuses == [(5, "stopped")]


def test_a_process_holding_a_replaced_run_asks_the_new_one_before_refusing(managers):
    """The run this process holds refuses the action (another number of param groups, a stop
    pending); the stored run, created anew by another process, is another: it is asked."""
    a, b = managers
    a.control("r", {"action": "stop"}, 6)
    b.delete_run("r")
    b.create_run({"run_id": "r", "schedule": PLATEAU, "base_lrs": [0.1, 0.2, 0.3]})
    assert a.control("r", {"action": "set_lr", "lrs": [0.5, 0.5, 0.5]}, None)[0] == 1
    assert a.control("r", {"action": "scale", "factor": 0.5}, 7)[0] == 7
    assert len(b.store.read_events("r")) == 3  # created, and both actions
