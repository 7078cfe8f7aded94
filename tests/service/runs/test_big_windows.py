"""Big runs of steps (a wide window, a step jump) are taken in the big-work process, from a
snapshot, and give what this process would have given: the same values bit for bit, the
same events and status, the same engine after them (the next steps, taken here, agree too).

Each case runs twice, on two fresh databases: once with ``BigWork(0)`` (every step in this
process) and once with a real worker process, whose calls are counted to show where the
steps went.
"""

from __future__ import annotations

import pytest
from lrserve.service.engine import expr
from lrserve.service.engine.actions import parse_action
from lrserve.service.offload import BigWork
from lrserve.service.runs.commit import PlacedAction
from lrserve.service.runs.manager import RunManager
from lrserve.service.settings import Settings

pytestmark = pytest.mark.slow  # a worker process of its own, importing torch

GROUPS = 64  # 999 steps x (64 + 6) units: over OFFLOAD_UNITS, so a 999-step window is big work
AHEAD = 999


class CountingWork(BigWork):
    """The real process pool; counts what it was given."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self.calls: list[str] = []

    def run(self, fn, *args):
        self.calls.append(fn.__name__)
        return super().run(fn, *args)


@pytest.fixture(scope="module")
def worker():
    big = CountingWork(1)
    yield big
    big.close()


@pytest.fixture
def managers(tmp_path, worker, open_manager):
    """``(here, there)``: the same settings, every step in this process / big ones in the worker."""
    made = [open_manager(Settings(db=f"sqlite:///{tmp_path}/{name}.db"), big)
            for name, big in (("here", BigWork(0)), ("there", worker))]
    worker.calls.clear()
    return made


def _create(managers, schedule, base_lrs=None):
    for manager in managers:
        manager.create_run({"run_id": "r", "schedule": schedule, "base_lrs": base_lrs or [0.1] * GROUPS})


def _same(here: RunManager, there: RunManager) -> None:
    """Stored runs, events and loaded state agree."""
    a, b = here.store.read_run("r"), there.store.read_run("r")
    assert (a.horizon, a.status) == (b.horizon, b.status)
    events = [[(e.kind, e.step, e.payload) for e in m.store.read_events("r")] for m in (here, there)]
    assert events[0] == events[1]
    sa, sb = here.state("r"), there.state("r")
    marks = [(s.status, s.stopped_at, s.switched_at, s.watching) for s in (sa, sb)]
    assert marks[0] == marks[1]
    assert sa.engine.snapshot() == sb.engine.snapshot()


SCHEDULES = [
    pytest.param({"type": "StepLR", "step_size": 7, "gamma": 0.9}, id="step"),
    pytest.param({"type": "CyclicLR", "base_lr": 0.01, "max_lr": 0.2, "step_size_up": 37},
                 id="cyclic-momentum"),
    pytest.param({"type": "LRRangeTest", "min_lr": 1e-5, "max_lr": 1.0, "num_steps": 300,
                  "then": {"type": "CosineAnnealingLR", "T_max": 200}}, id="range-test-switches-mid-window"),
    pytest.param({"type": "LambdaLR", "lr_lambda": "0.999**step * (1 + step % 5)"}, id="lambda"),
    pytest.param({"type": "SequentialLR", "milestones": [100], "schedulers": [
        {"type": "StepLR", "step_size": 30}, {"type": "MultiStepLR", "milestones": [50, 300]}]},
        id="multistep-stage-switched-to-in-the-worker"),
]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_a_wide_window_and_a_step_jump_from_the_worker_equal_this_process(managers, worker, schedule):
    here, there = managers
    base = [0.1 * (1 + i % 3) for i in range(GROUPS)]
    _create(managers, schedule, base)
    windows = [m.window("r", 0, AHEAD) for m in managers]
    assert windows[0].values == windows[1].values and len(windows[0].values) == AHEAD + 1
    assert worker.calls == ["steps_from"]
    _same(here, there)
    # a step jump: one step far past the horizon, committed with the steps before it
    steps = [m.step_run("r", AHEAD + 900, {}, 0, 0).values for m in managers]
    assert steps[0] == steps[1]
    assert worker.calls == ["steps_from"] * 2
    _same(here, there)
    # small commits after it are taken here, on the engine the worker's snapshot restored
    for step in range(AHEAD + 901, AHEAD + 921):
        assert here.step_run("r", step, {}, 0, 0).values == there.step_run("r", step, {}, 0, 0).values
    assert worker.calls == ["steps_from"] * 2
    _same(here, there)


def test_a_window_from_the_worker_compiles_no_expression_here(managers, worker, monkeypatch):
    """The engine restored from the worker's snapshot keeps the run's spec, its expressions
    compiled: parsing the snapshot's again compiled every one of them (1,024: ~0.1 s with the
    GIL held, per big window or step jump of such a run). A range test that switches within
    the steps is parsed from the snapshot (the parametrized test above)."""
    here, there = managers
    _create(managers, {"type": "LambdaLR", "lr_lambda": [f"0.999**step * {1 + i}" for i in range(GROUPS)]})
    for m in managers:
        m.window("r", 0, 10)  # loaded and stepped here
    compiled = []
    real = expr._compile
    monkeypatch.setattr(expr, "_compile", lambda source: compiled.append(source) or real(source))
    windows = [m.window("r", 11, AHEAD) for m in managers]
    assert windows[0].values == windows[1].values
    assert worker.calls == ["steps_from"] and compiled == []
    _same(here, there)


def test_steps_with_inputs_are_taken_here_and_the_plain_ones_after_them_in_the_worker(managers, worker):
    """An action placed ahead (``at_step``) and a plateau metric: the steps up to the last of
    them here, the 800 after it in the worker; decisions land where this process puts them."""
    here, there = managers
    plateau = {"type": "SequentialLR", "milestones": [50], "schedulers": [
        {"type": "LinearLR", "start_factor": 0.1, "total_iters": 50},
        {"type": "ReduceLROnPlateau", "patience": 0, "factor": 0.5}]}
    _create(managers, plateau)
    for m in managers:
        m.window("r", 0, 60)
        action = parse_action({"action": "scale", "factor": 0.5})
        m.committer.commit("r", m.state("r").horizon, action=PlacedAction(190, action))
        for step in (61, 62, 63):  # two reductions
            m.step_run("r", step, {"val_loss": 1.0 * (step != 61) + 5.0 * (step == 61)}, 0, 0)
    worker.calls.clear()
    windows = [m.window("r", 64, AHEAD) for m in managers]
    assert windows[0].values == windows[1].values
    assert worker.calls == ["steps_from"]
    _same(here, there)


def test_a_window_crossing_a_failing_step_ends_before_it_in_the_worker_too(managers, worker):
    """``1/(400-step)`` divides by zero at step 400: the window is the steps before it, the run
    stays at 399, and later windows stop there without failing again."""
    here, there = managers
    _create(managers, {"type": "LambdaLR", "lr_lambda": "1/(400-step)"})
    windows = [m.window("r", 0, AHEAD) for m in managers]
    assert windows[0].values == windows[1].values and len(windows[0].values) == 400
    assert worker.calls == ["steps_from"]
    assert here.store.read_run("r").horizon == there.store.read_run("r").horizon == 399
    assert [m.window("r", 399, 50).values for m in managers][0] == windows[1].values[399:]
    _same(here, there)
