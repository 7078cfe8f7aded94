"""``RunState.prices`` (``cost.PricePlan``): a run's steps priced in work units (``cost.cost``)
by the schedule that takes each of them, ``replace_schedule`` actions placed ahead included, so
no budget (a request's, the event loop's) prices a dear schedule's steps at a cheap one's; one
immutable plan, swapped whole under the run's lock, so a read on another thread never sees half
of a change."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import settings as examples
from hypothesis import strategies as st
from lrserve.service.engine import cost
from lrserve.service.engine.spec import parse_schedule
from lrserve.service.settings import Settings

GROUPS = 4
CHEAP = {"type": "StepLR", "step_size": 7}
DEAR = {"type": "LambdaLR", "lr_lambda": "+".join(["step"] * 40)}
DEARER = {"type": "LambdaLR", "lr_lambda": "+".join(["step"] * 99)}


def spec(schedule: dict):
    return parse_schedule(schedule, n_groups=GROUPS)


def units(schedule: dict, steps: int) -> int:
    return cost.cost(spec(schedule), n_groups=GROUPS, steps=steps)


@pytest.fixture
def manager(database_url, open_manager):
    manager = open_manager(Settings(db=database_url("sqlite")))
    manager.create_run({"run_id": "r", "schedule": CHEAP, "base_lrs": [0.1] * GROUPS})
    return manager


def test_without_actions_ahead_the_price_is_the_schedules(manager):
    state = manager.state("r")
    assert state.prices.switches == ()
    assert state.prices.work(0, 50) == units(CHEAP, 50)
    assert state.prices.steps_within(0, 10_000) == cost.steps_within(
        spec(CHEAP), n_groups=GROUPS, budget=10_000)
    assert manager.budget_steps(state) == cost.steps_within(
        spec(CHEAP), n_groups=GROUPS, budget=manager.settings.work_budget)


def test_each_step_is_priced_by_the_schedule_that_takes_it(manager):
    manager.control("r", {"action": "replace_schedule", "schedule": DEAR}, 10)
    manager.control("r", {"action": "replace_schedule", "schedule": DEARER}, 30)
    manager.control("r", {"action": "scale", "factor": 0.5}, 20)  # no schedule of its own
    state = manager.state("r")
    assert [step for step, _ in state.prices.switches] == [10, 30]
    # steps 1..10 cheap, 11..30 dear, 31.. dearer (an action applies right after its step)
    assert state.prices.work(0, 50) == units(CHEAP, 10) + units(DEAR, 20) + units(DEARER, 20)
    assert state.prices.work(0, 10) == units(CHEAP, 10)
    assert state.prices.work(12, 20) == units(DEAR, 8)
    assert state.prices.work(35, 40) == units(DEARER, 5)
    budget = units(CHEAP, 10) + units(DEAR, 20) + units(DEARER, 3)
    assert state.prices.steps_within(0, budget) == 33
    assert state.prices.steps_within(0, units(CHEAP, 10) + units(DEAR, 5)) == 15
    assert state.prices.steps_within(0, units(CHEAP, 4)) == 4
    assert state.prices.steps_within(0, 1) == 1  # one step is always served
    assert manager.budget_steps(state) == state.prices.steps_within(0, manager.settings.work_budget)
    manager.window("r", 0, 15)  # past the first: the engine's schedule is the dear one now
    state = manager.state("r")
    assert [step for step, _ in state.prices.switches] == [30]
    assert state.prices.work(15, 40) == units(DEAR, 15) + units(DEARER, 10)


def test_two_replacements_at_one_step_price_the_last(manager):
    manager.control("r", {"action": "replace_schedule", "schedule": DEARER}, 10)
    manager.control("r", {"action": "replace_schedule", "schedule": DEAR}, 10)  # applied after: it stays
    state = manager.state("r")
    assert state.prices.work(0, 20) == units(CHEAP, 10) + units(DEAR, 10)


def test_the_event_loops_small_work_is_priced_the_same(manager):
    """``Committer._check_small`` (what the event loop, and a group of windows, may compute):
    steps across a dearer schedule placed ahead are big work, not the cheap schedule's few."""
    from lrserve.service.runs.commit import ON_LOOP_WORK
    from lrserve.service.store.base import WouldWait

    state = manager.state("r")
    manager.committer._check_small(state, 30)  # 30 cheap steps: small
    assert units(CHEAP, 30) <= ON_LOOP_WORK < units(CHEAP, 10) + units(DEARER, 20)
    manager.control("r", {"action": "replace_schedule", "schedule": DEARER}, 10)
    with pytest.raises(WouldWait):
        manager.committer._check_small(manager.state("r"), 30)
    manager.committer._check_small(manager.state("r"), 10)  # up to the switch: still small


def test_steps_within_is_the_inverse_of_work_at_every_budget(manager):
    """At the boundaries too: a replacement at ``start`` switches at once, one at ``end`` is not
    paid for, a budget that ends at a switch takes the steps up to it."""
    manager.control("r", {"action": "replace_schedule", "schedule": DEAR}, 10)
    manager.control("r", {"action": "replace_schedule", "schedule": DEARER}, 30)
    state = manager.state("r")
    assert state.prices.work(10, 20) == units(DEAR, 10)  # the switch at step 10: steps 11.. are the new one's
    assert state.prices.work(0, 10) == units(CHEAP, 10)  # the switch at the end: not paid for
    assert state.prices.steps_within(0, units(CHEAP, 10)) == 10
    for start in (0, 5, 10, 29, 30, 40):
        for budget in range(0, units(CHEAP, 10) + units(DEAR, 20) + units(DEARER, 20), 37):
            steps = state.prices.steps_within(start, budget)
            assert steps == 1 or state.prices.work(start, start + steps) <= budget, (start, budget)
            assert state.prices.work(start, start + steps + 1) > budget, (start, budget)


def test_a_jump_from_the_stored_horizon_is_priced_whatever_this_process_knew(database_url, open_manager):
    """Another process moved the run past a dearer schedule's switch: a step jump within the jump
    limit of the stored horizon is priced from there (the dear schedule's steps), not waved
    through because this process, priced from its own older horizon, allowed that many steps."""
    from lrserve.service.engine.cost import WorkBudgetExceeded

    settings = Settings(db=database_url("sqlite"), work_budget=80_000, max_jump=1000)
    a, b = open_manager(settings), open_manager(settings)
    a.create_run({"run_id": "j", "schedule": CHEAP, "base_lrs": [0.1] * 64})
    b.window("j", 0, 0)  # b holds it at horizon 0
    a.control("j", {"action": "replace_schedule", "schedule": DEAR}, 40)
    for control in a.state("j").inputs.actions[40]:  # b knows the switch too
        b.state("j").place_action(40, control)
    a.window("j", 50, 0)  # a takes it past the switch: stored horizon 50
    assert b.budget_steps(b.state("j")) < 290  # what b allows from its own horizon, 0
    assert cost.cost(parse_schedule(DEAR, n_groups=64), n_groups=64, steps=240) > settings.work_budget
    with pytest.raises(WorkBudgetExceeded):
        b.window("j", 290, 0)  # 240 dear steps from the stored horizon
    assert b.store.read_run("j").horizon == 50


def test_a_read_while_a_commit_takes_the_switch_prices_it(manager, monkeypatch):
    """The commit taking step 10 has popped its ``replace_schedule`` from the placed actions and
    not yet installed the new schedule: a read at that moment (made here, as one on the event
    loop's thread would be: a window's budget) still prices the steps after 10 at the new
    schedule's rate; and after the engine switched, until the commit publishes, the plan still
    prices from the old horizon."""
    from lrserve.service.engine.engine import Engine
    from lrserve.service.runs.state import RunState

    manager.control("r", {"action": "replace_schedule", "schedule": DEARER}, 10)
    state = manager.state("r")
    seen = []
    advance, publish = Engine.advance, RunState.publish

    def taking(engine, *args, **kwargs):
        if engine.step in (9, 15):  # 9: step 10's actions out of the inputs, not applied yet
            assert not state.inputs.actions
            seen.append(state.prices.work(state.horizon, 20))
        return advance(engine, *args, **kwargs)

    def publishing(run):  # computed and committed, not yet shown: the horizon is still 0
        seen.append(run.prices.work(run.horizon, 20))
        publish(run)

    monkeypatch.setattr(Engine, "advance", taking)
    monkeypatch.setattr(RunState, "publish", publishing)
    manager.window("r", 0, 20)
    assert seen == [units(CHEAP, 10) + units(DEARER, 10)] * 3
    assert state.prices.switches == () and state.prices.work(20, 30) == units(DEARER, 10)


def test_actions_that_bring_no_schedule_leave_the_price_cached(manager):
    """Actions pile up at the first free step while no step is taken (an operator's ``scale``
    every second on a paused job): the price is the plan's, cached, never a walk over them."""
    state = manager.state("r")
    before = state.prices
    for _ in range(200):
        manager.control("r", {"action": "scale", "factor": 1.0}, None)
    assert len(state.inputs.actions[1]) == 200
    assert state.prices is before
    steps = manager.budget_steps(state)
    assert state.budget_steps == (before, steps)


def test_the_plan_follows_a_range_tests_switch_to_its_schedule(database_url, open_manager):
    """A range test's engine installs its ``then`` schedule without any action: the plan (and
    the cached budget) is the new schedule's from there."""
    manager = open_manager(Settings(db=database_url("sqlite")))
    then = DEARER
    manager.create_run({"run_id": "t", "base_lrs": [1e-3] * GROUPS, "schedule": {
        "type": "LRRangeTest", "min_lr": 1e-5, "max_lr": 1.0, "num_steps": 5, "then": then}})
    state = manager.state("t")
    manager.budget_steps(state)
    manager.window("t", 0, 10)
    assert state.engine.schedule.type == "LambdaLR"
    assert state.prices.schedule is state.engine.schedule
    assert manager.budget_steps(state) == cost.steps_within(
        spec(then), n_groups=GROUPS, budget=manager.settings.work_budget)


# The plan against the obvious reference: each step priced alone by the schedule in force at
# it. Schedules whose unit cost per step is a whole number (StepLR 1 per group, a chain of k
# StepLRs k), so that the plan's one ``ceil`` per stretch of steps is exact.
_PRICED = [{"type": "ChainedScheduler", "schedulers": [CHEAP] * k} if k > 1 else CHEAP for k in (1, 2, 3)]
_SWITCHES = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 2)), max_size=6)


_SPECS = [spec(schedule) for schedule in _PRICED]
_UNITS = [cost.cost(parsed, n_groups=GROUPS, steps=1) for parsed in _SPECS]


def _per_step(base: int, switches: list[tuple[int, int]], start: int, steps: int) -> list[int]:
    """The units of each of steps ``start + 1 .. start + steps``, alone: step ``s`` taken by the
    schedule of the last switch placed at a step below ``s`` (an action applies right after its
    step), else ``base``'s."""
    placed = sorted(switches, key=lambda item: item[0])  # stable: the last placed last
    priced = []
    for s in range(start + 1, start + steps + 1):
        kind = base
        for at, switched in placed:
            if at < s:
                kind = switched
        priced.append(_UNITS[kind])
    return priced


@examples(max_examples=200, deadline=None)
@given(base=st.integers(0, 2), switches=_SWITCHES, start=st.integers(0, 70), length=st.integers(0, 40),
       budget=st.integers(0, 2_000))
def test_the_plan_prices_each_step_by_the_schedule_in_force_at_it(base, switches, start, length, budget):
    plan = cost.PricePlan(_SPECS[base], GROUPS)
    for at, kind in switches:
        plan = plan.placed(at, _SPECS[kind])
    assert [at for at, _ in plan.switches] == sorted({at for at, _ in switches})  # the last at a step kept
    assert plan.work(start, start + length) == sum(_per_step(base, switches, start, length))
    paid, fits = 0, 0
    for units_of_step in _per_step(base, switches, start, budget + 1):  # at least 1 unit a step
        paid += units_of_step
        if paid > budget:
            break
        fits += 1
    assert plan.steps_within(start, budget) == max(1, fits)
    # once the engine took the switches up to ``start``, the plan from there prices alike
    later = sorted({at for at, _ in switches if at > start})
    now = ([base] + [kind for at, kind in sorted(switches, key=lambda item: item[0]) if at <= start])[-1]
    moved = plan.from_step(start, _SPECS[now])
    assert [at for at, _ in moved.switches] == later
    assert moved.work(start, start + length) == plan.work(start, start + length)


def test_a_run_loaded_from_its_log_prices_the_switches_placed_ahead(manager, open_manager):
    """Another manager (a restart, a replica) loads the run from its log: the switches placed
    ahead are in its plan, the last placed at a step in force."""
    manager.control("r", {"action": "replace_schedule", "schedule": DEAR}, 40)
    manager.control("r", {"action": "replace_schedule", "schedule": DEARER}, 40)
    manager.control("r", {"action": "replace_schedule", "schedule": DEAR}, 60)
    manager.window("r", 20, 0)
    loaded = open_manager(manager.settings).state("r")
    assert loaded.horizon == 20
    assert [(step, s.type) for step, s in loaded.prices.switches] == [(40, "LambdaLR"), (60, "LambdaLR")]
    assert loaded.prices.work(20, 70) == units(CHEAP, 20) + units(DEARER, 20) + units(DEAR, 10)
