"""Values against a real server: an LR that is negative (beyond the rounding of the schedule's
arithmetic, ``engine.ROUNDING``) or not finite is never served, a schedule that cannot start
is refused at create, and an operator can always move a run on."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow


def _schedule_error(response, step: int) -> None:
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "schedule_error"
    assert f"at step {step}" in body["detail"]


def _create(http, run_id: str, schedule: dict, base_lrs=(0.1,)):
    return http.post("/v1/runs", json={"run_id": run_id, "schedule": schedule, "base_lrs": list(base_lrs)})


@pytest.mark.parametrize(
    ("schedule", "step"),
    [
        ({"type": "ExponentialLR", "gamma": 1e308}, 2),  # 0.1 * 1e308 ** 2 overflows
        ({"type": "LRRangeTest", "min_lr": 1e-320, "max_lr": 1e308, "num_steps": 2}, 1),
        ({"type": "LambdaLR", "lr_lambda": "1 / (step - 200)"}, 0),  # negative from the start
    ],
)
def test_a_schedule_that_fails_at_its_first_steps_is_refused_at_create(http, schedule, step):
    run_id = f"bad-start-{schedule['type']}"
    _schedule_error(_create(http, run_id, schedule), step)
    assert http.get(f"/v1/runs/{run_id}").status_code == 404


def test_a_window_crossing_a_failing_step_returns_the_steps_before_it(http):
    turns = {"type": "LambdaLR", "lr_lambda": "1 if step < 150 else -1"}
    assert _create(http, "turns-negative", turns).status_code == 201
    for _ in range(2):  # the second time the server knows where it fails
        window = http.get("/v1/runs/turns-negative/lr", params={"step": 100, "ahead": 100}).json()["window"]
        assert window["start"] == 100 and len(window["lrs"]) == 50
        assert all(row[0] == 0.1 for row in window["lrs"])
    _schedule_error(http.get("/v1/runs/turns-negative/lr", params={"step": 150}), 150)
    _schedule_error(http.post("/v1/runs/turns-negative/step", json={"step": 150}), 150)
    assert http.get("/v1/runs/turns-negative").json()["horizon"] == 149
    # An operator moves it on: the action applies to the last good values at the failing step.
    moved = http.post("/v1/runs/turns-negative/control", json={"action": "set_lr", "lr": 0.01})
    assert moved.status_code == 200 and moved.json()["applied_at"] == 150
    answer = http.post("/v1/runs/turns-negative/step", json={"step": 150, "ahead": 3}).json()
    assert answer["window"]["lrs"] == [[0.01]]  # LambdaLR is closed-form: step 151 fails again
    _schedule_error(http.post("/v1/runs/turns-negative/step", json={"step": 151}), 151)
    new = {"action": "replace_schedule", "schedule": {"type": "StepLR", "step_size": 1000}}
    assert http.post("/v1/runs/turns-negative/control", json=new).json()["applied_at"] == 151
    answer = http.post("/v1/runs/turns-negative/step", json={"step": 151, "ahead": 3}).json()
    assert answer["window"]["lrs"] == [[0.01]] * 4


def test_scaling_to_infinity_twice_does_not_brick_the_run(http):
    assert _create(http, "scaled", {"type": "StepLR", "step_size": 1000}).status_code == 201
    http.post("/v1/runs/scaled/step", json={"step": 1}).raise_for_status()
    for _ in range(2):
        http.post("/v1/runs/scaled/control", json={"action": "scale", "factor": 1e308}).raise_for_status()
    _schedule_error(http.post("/v1/runs/scaled/step", json={"step": 2}), 2)
    http.post("/v1/runs/scaled/control", json={"action": "set_lr", "lr": 0.05}).raise_for_status()
    assert http.post("/v1/runs/scaled/step", json={"step": 2}).json()["lrs"] == [0.05]
    assert http.post("/v1/runs/scaled/step", json={"step": 3}).json()["lrs"] == [0.05]


def test_a_linear_decay_to_zero_is_served_to_its_end_as_torch_gives_it(http):
    """torch's ``LinearLR`` to ``end_factor=0`` from 0.1 over 4 steps ends at -5.55e-19: zero but
    for its arithmetic's rounding. Served bit for bit, and the run goes on (before: a 422
    ``schedule_error`` at step 4, and a training job stopped at the end of its decay)."""
    decay = {"type": "LinearLR", "start_factor": 0.1, "end_factor": 0.0, "total_iters": 4}
    assert _create(http, "decay-to-zero", decay).status_code == 201
    window = http.get("/v1/runs/decay-to-zero/lr", params={"step": 0, "ahead": 6}).json()["window"]
    assert [row[0] for row in window["lrs"]][4:] == [-5.551115123125785e-19] * 3  # torch's, steps 4..6


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    gamma=st.floats(min_value=1.0, max_value=1e308),
    base=st.floats(min_value=1e-12, max_value=1e12),
    ahead=st.integers(min_value=0, max_value=300),
)
def test_no_served_lr_is_negative_or_not_finite(http, gamma, base, ahead):
    """Whatever a growing schedule reaches, the server serves finite values or says which step fails."""
    run_id = f"grow-{gamma!r}-{base!r}-{ahead}".replace("+", "")[:120]
    created = _create(http, run_id, {"type": "ExponentialLR", "gamma": gamma}, base_lrs=[base])
    if created.status_code == 422:
        assert created.json()["code"] == "schedule_error"
        return
    assert created.status_code in (200, 201), created.text
    step = 0
    while step <= 300:
        answer = http.get(f"/v1/runs/{run_id}/lr", params={"step": step, "ahead": ahead})
        if answer.status_code == 422:
            assert answer.json()["code"] == "schedule_error"
            break
        rows = answer.json()["window"]["lrs"]
        assert all(isinstance(lr, float) and math.isfinite(lr) and lr >= 0 for row in rows for lr in row)
        step += len(rows)
