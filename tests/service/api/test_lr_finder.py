"""The LR range test through the API: curve, suggestions, switch to `then` on the same step."""

from __future__ import annotations

import math

from tests.service.api.conftest import make_run

RANGE = {
    "type": "LRRangeTest",
    "min_lr": 1e-5,
    "max_lr": 10.0,
    "num_steps": 80,
    "then": {"type": "CosineAnnealingLR", "T_max": 50},
}


def synthetic_loss(lr: float) -> float:
    """Falls fastest near lr = 0.01, flat below, explodes above 1."""
    return 2.0 - math.tanh(math.log10(lr / 0.01) + 1.0) + (50.0 * lr if lr > 1 else 0.0)


def test_range_test_suggests_and_switches(api):
    make_run(api, "rt", RANGE, base_lrs=(0.1, 0.01))
    lrs = [api.get("/v1/runs/rt").json()["lrs"]]
    switched_at = None
    for k in range(1, 120):
        answer = api.post(
            "/v1/runs/rt/step", json={"step": k, "metrics": {"loss": synthetic_loss(lrs[-1][0])}}
        )
        assert answer.status_code == 200, answer.text
        lrs.append(answer.json()["lrs"])
        if answer.json()["switched_at"] is not None:
            switched_at = answer.json()["switched_at"]
            break
    finder = api.get("/v1/runs/rt/lr-finder").json()
    assert finder["done"] and finder["switched_at"] == switched_at
    assert switched_at < 80  # the loss exploded: the test stopped early
    assert finder["chosen"] == finder["suggestions"]["steepest"]
    assert 1e-4 < finder["chosen"] < 1e-2  # where the loss falls fastest per unit of LR (Lightning)
    assert lrs[switched_at] == [finder["chosen"], finder["chosen"] * (0.01 / 0.1)]  # group ratio kept
    events = api.get("/v1/runs/rt/history").json()["events"]
    switch = [e for e in events if e["kind"] == "schedule_switch"]
    assert len(switch) == 1 and switch[0]["step"] == switched_at and switch[0]["chosen"] == finder["chosen"]
    after = api.get("/v1/runs/rt/lr", params={"step": switched_at, "ahead": 3}).json()["window"]["lrs"]
    assert after[1][0] < after[0][0]  # the cosine schedule runs from the chosen LR


def test_lr_finder_on_another_schedule_is_409(api):
    make_run(api, "plain")
    response = api.get("/v1/runs/plain/lr-finder")
    assert response.status_code == 409


def test_range_test_cannot_be_a_stage(api):
    spec = {
        "type": "SequentialLR",
        "milestones": [5],
        "schedulers": [{"type": "LinearLR"}, {"type": "LRRangeTest", "min_lr": 1e-4, "max_lr": 1.0}],
    }
    response = api.post("/v1/runs", json={"schedule": spec, "base_lrs": [0.1]})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "schedule.schedulers.1"
