"""A control commit takes its action into the run's state as parsed once (``replay.apply_control``),
not parsed back from its stored payload; the state it leaves is the one a replay of the log
gives (another replica loading the run), on SQLite and on PostgreSQL."""

from __future__ import annotations

import pytest
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
