"""Stepping: the three rules (finality, first free step, parity) through the API."""

from __future__ import annotations

import json
import multiprocessing

import pytest

from tests.service.api.conftest import make_run
from tests.service.engine import reference
from tests.specs import plateau, plateau_max_acc, warmup_then

PLATEAU = plateau(patience=1, threshold=0.01)
LOSSES = [1.0, 0.8, 0.81, 0.82, 0.83, 0.5, 0.51, 0.52, 0.53, 0.54, 0.55, float("nan"), 0.6, 0.6]


def post(api, url, body):
    """POST with Python's JSON, which writes NaN (httpx refuses to): a diverged loss is real input."""
    return api.post(url, content=json.dumps(body), headers={"content-type": "application/json"})


def lr_at(api, run_id, step, ahead=0):
    response = api.get(f"/v1/runs/{run_id}/lr", params={"step": step, "ahead": ahead})
    assert response.status_code == 200, response.text
    return response.json()


def test_window_commits_and_matches_torch(api):
    spec = {"type": "OneCycleLR", "max_lr": [0.5, 0.05], "total_steps": 80}
    make_run(api, "w", spec, base_lrs=(0.1, 0.01), base_momentums=[0.9, 0.9])
    answer = lr_at(api, "w", 0, ahead=40)
    assert answer["window"]["start"] == 0 and len(answer["window"]["lrs"]) == 41
    assert answer["lrs"] == answer["window"]["lrs"][0]
    theirs = reference.trajectory(spec, [0.1, 0.01], 41)
    assert answer["window"]["lrs"] == [lrs for lrs, _ in theirs]
    assert answer["window"]["momentums"] == [moms for _, moms in theirs]
    assert api.get("/v1/runs/w").json()["horizon"] == 40


def test_values_are_final(api):
    make_run(api, "f", {"type": "ExponentialLR", "gamma": 0.9})
    first = lr_at(api, "f", 5, ahead=10)["window"]["lrs"]
    api.post("/v1/runs/f/control", json={"action": "scale", "factor": 0.5})
    again = lr_at(api, "f", 5, ahead=10)["window"]["lrs"]
    assert again == first


def test_plateau_through_post_step_equals_torch(api):
    make_run(api, "p", PLATEAU, base_lrs=(0.1, 0.2))
    got = [api.get("/v1/runs/p").json()["lrs"]]
    for k, loss in enumerate(LOSSES, start=1):
        response = post(api, "/v1/runs/p/step", {"step": k, "metrics": {"val_loss": loss}})
        assert response.status_code == 200, response.text
        got.append(response.json()["lrs"])
    assert got == [lrs for lrs, _ in reference.trajectory(PLATEAU, [0.1, 0.2], len(LOSSES) + 1, LOSSES)]
    kinds = [e["kind"] for e in api.get("/v1/runs/p/history").json()["events"]]
    assert "plateau_reduction" in kinds


def test_warmup_then_plateau_reduces_after_the_warmup(api):
    make_run(api, "wp", warmup_then(PLATEAU, steps=3))
    lrs = [
        api.post("/v1/runs/wp/step", json={"step": k, "metrics": {"val_loss": 1.0}}).json()["lrs"][0]
        for k in range(1, 10)
    ]
    assert lrs[0] < lrs[2] == 0.1  # warming up to the base LR at the milestone
    assert lrs[-1] < 0.1  # then the plateau stage reduced it


def test_metric_for_a_final_step_is_history_only(api):
    make_run(api, "h", PLATEAU)
    lr_at(api, "h", 0, ahead=5)  # steps 0..5 are final
    answer = api.post("/v1/runs/h/step", json={"step": 3, "metrics": {"val_loss": 9.0}}).json()
    assert answer["lrs"] == [0.1]
    history = api.get("/v1/runs/h/history").json()
    assert history["metrics"]["val_loss"]["steps"] == [3]


def test_control_lands_on_the_first_free_step_and_nothing_before(api):
    make_run(api, "c", {"type": "ExponentialLR", "gamma": 0.5}, base_lrs=(1.0,))
    before = lr_at(api, "c", 0, ahead=4)["window"]["lrs"]
    result = api.post("/v1/runs/c/control", json={"action": "set_lr", "lr": 0.3}).json()
    assert result["applied_at"] == 5
    after = lr_at(api, "c", 0, ahead=7)["window"]["lrs"]
    assert after[:5] == before
    assert after[5] == [0.3] and after[6] == [0.3 * 0.5]


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        pytest.param({"action": "scale", "factor": 0.1}, [0.0625 * 0.1, 0.0625 * 0.1 * 0.5], id="scale"),
        pytest.param({"action": "hold"}, [0.0625, 0.0625], id="hold"),
        pytest.param(
            {
                "action": "replace_schedule",
                "schedule": {"type": "ConstantLR", "factor": 0.5, "total_iters": 5},
            },
            [0.0625 * 0.5, 0.0625 * 0.5],
            id="replace",
        ),
        pytest.param({"action": "stop"}, [0.0625, 0.0625 * 0.5], id="stop"),
    ],
)
def test_every_action_applies_from_applied_at(api, action, expected):
    make_run(api, "a", {"type": "ExponentialLR", "gamma": 0.5}, base_lrs=(1.0,))
    lr_at(api, "a", 0, ahead=3)
    result = api.post("/v1/runs/a/control", json={**action, "at_step": 4}).json()
    assert result["applied_at"] == 4
    window = lr_at(api, "a", 0, ahead=5)
    assert [v[0] for v in window["window"]["lrs"][4:6]] == expected
    assert [v[0] for v in window["window"]["lrs"][:4]] == [1.0, 0.5, 0.25, 0.125]
    if action["action"] == "stop":
        assert window["status"] == "stopped" and window["stopped_at"] == 4


def test_hold_then_resume_changes_status(api):
    make_run(api, "s")
    api.post("/v1/runs/s/control", json={"action": "hold"})
    assert lr_at(api, "s", 1)["status"] == "held"
    api.post("/v1/runs/s/control", json={"action": "resume"})
    assert lr_at(api, "s", 2)["status"] == "active"
    kinds = [e["kind"] for e in api.get("/v1/runs/s/history").json()["events"]]
    assert kinds.count("status") == 2 and kinds.count("control") == 2


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({"action": "set_lr", "lrs": [0.1, 0.2]}, "lrs", id="wrong-group-count"),
        pytest.param({"action": "set_lr"}, "body", id="set-lr-without-value"),
        pytest.param({"action": "scale", "factor": -1}, "factor", id="negative-factor"),
        pytest.param({"action": "scale", "factor": 0.5, "at_step": 0}, "at_step", id="at-step-not-free"),
        pytest.param(
            {"action": "replace_schedule", "schedule": {"type": "StepLR"}},
            "schedule.step_size",
            id="bad-new-schedule",
        ),
        pytest.param({"action": "explode"}, "action", id="unknown-action"),
    ],
)
def test_invalid_control_is_422_and_changes_nothing(api, body, field):
    make_run(api, "x")
    response = api.post("/v1/runs/x/control", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == field
    assert [e["kind"] for e in api.get("/v1/runs/x/history").json()["events"]] == ["created"]


def test_step_jump_limit(api, settings):
    make_run(api, "j")
    response = api.get("/v1/runs/j/lr", params={"step": settings.max_jump + 1})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "step"
    assert lr_at(api, "j", settings.max_jump)["step"] == settings.max_jump


def test_one_cycle_past_its_end_is_422_not_500(api):
    make_run(api, "oc", {"type": "OneCycleLR", "max_lr": 0.1, "total_steps": 10})
    response = api.get("/v1/runs/oc/lr", params={"step": 20})
    assert response.status_code == 422
    assert response.json()["code"] == "schedule_error"
    assert api.get("/v1/runs/oc").json()["horizon"] == 0


def test_metrics_are_idempotent(api):
    make_run(api, "m")
    records = [{"step": s, "name": "train_loss", "value": 1.0 / (s + 1), "rank": 0} for s in range(10)]
    first = api.post("/v1/runs/m/metrics", json={"records": records})
    again = api.post("/v1/runs/m/metrics", json={"records": records})
    assert first.status_code == 202 and first.json() == {"accepted": 10, "new": 10}
    assert again.json() == {"accepted": 10, "new": 0}
    history = api.get("/v1/runs/m/history", params={"max_points": 4}).json()
    assert history["metrics"]["train_loss"]["steps"] == [0, 3, 6, 9]


def test_history_downsamples_lrs(api):
    make_run(api, "d", {"type": "ExponentialLR", "gamma": 0.99})
    lr_at(api, "d", 0, ahead=999)
    history = api.get("/v1/runs/d/history", params={"max_points": 11}).json()
    assert len(history["lrs"]["steps"]) == 11
    assert history["lrs"]["steps"][0] == 0 and history["lrs"]["steps"][-1] == 999


def test_preview_matches_torch_and_simulates_plateau(api):
    spec = {"type": "CosineAnnealingWarmRestarts", "T_0": 7}
    body = {"schedule": spec, "base_lrs": [0.1, 0.3], "steps": 30}
    answer = api.post("/v1/schedules/preview", json=body).json()
    assert answer["lrs"] == [lrs for lrs, _ in reference.trajectory(spec, [0.1, 0.3], 30)]
    plateau = post(
        api,
        "/v1/schedules/preview",
        {"schedule": PLATEAU, "base_lrs": [0.1], "steps": len(LOSSES) + 1, "metrics": {"val_loss": LOSSES}},
    ).json()
    assert plateau["lrs"] == [lrs for lrs, _ in reference.trajectory(PLATEAU, [0.1], len(LOSSES) + 1, LOSSES)]


def test_a_preview_over_the_budget_whatever_its_schedule_is_refused_without_a_worker_process(api):
    # 4000 steps x 1024 groups is over the default budget at one unit per step and group: it was
    # given to a worker process (spawned by this first big request: its torch import took 18 s
    # at load 22, past a client's timeout) only to be refused there.
    body = {"schedule": {"type": "StepLR", "step_size": 7}, "base_lrs": [0.1] * 1024, "steps": 4000}
    before = multiprocessing.active_children()
    answer = api.post("/v1/schedules/preview", json=body)
    assert answer.status_code == 422, answer.text
    error = answer.json()["errors"][0]
    assert answer.json()["code"] == "work_budget_exceeded" and error["field"] == "steps"
    assert "costs 4120000 work units, over the work budget of 500000" in error["message"]
    bad_spec = dict(body, schedule={"type": "StepLR", "step_size": 0})  # a bad field: named as before
    refused = api.post("/v1/schedules/preview", json=bad_spec)
    assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "schedule.step_size"
    assert not set(multiprocessing.active_children()) - set(before)  # no process started


def test_catalog_lists_every_type(api):
    types = {t["type"] for t in api.get("/v1/schedules/catalog").json()["types"]}
    assert {"StepLR", "SequentialLR", "ReduceLROnPlateau", "LambdaLR"} <= types


def test_health_ready_and_metrics(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").json() == {"status": "ready"}
    make_run(api, "t")
    lr_at(api, "t", 0, ahead=3)
    text = api.get("/metrics").text
    assert "lrserve_requests_total" in text and "lrserve_steps_committed_total 3.0" in text


def test_replaced_schedule_watches_its_own_metric(api):
    make_run(api, "rw", {"type": "ExponentialLR", "gamma": 0.9})
    schedule = plateau_max_acc(patience=0, factor=0.5)
    api.post("/v1/runs/rw/control", json={"action": "replace_schedule", "schedule": schedule})
    lrs = [api.post("/v1/runs/rw/step", json={"step": k, "metrics": {"val_acc": 0.5}}).json()["lrs"][0]
           for k in range(1, 5)]
    assert lrs[-1] < lrs[1]  # val_acc did not improve: the new plateau stage reduced the LR
