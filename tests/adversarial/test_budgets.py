"""Work budgets against a real server with the default settings: every request's work is
bounded before it starts; windows are cut to fit, everything else over it is a 422."""

from __future__ import annotations

import time

import pytest
from lrserve.service.api.schemas import SpikeGuardPublic
from lrserve.service.engine import cost
from lrserve.service.engine.spec import parse_schedule
from lrserve.service.settings import Settings

pytestmark = pytest.mark.slow

BUDGET = Settings().work_budget
GROUPS = 1024


def _over_budget(response, field: str) -> dict:
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "work_budget_exceeded"
    assert body["errors"][0]["field"] == field
    message = body["errors"][0]["message"]
    assert f"work budget of {BUDGET}" in message and "costs" in message
    return body


def _wide_run(http, run_id: str, schedule: dict | None = None) -> None:
    body = {"run_id": run_id, "schedule": schedule or {"type": "StepLR", "step_size": 7},
            "base_lrs": [0.1] * GROUPS}
    assert http.post("/v1/runs", json=body).status_code == 201


def test_a_preview_of_many_groups_times_many_steps_is_refused(http):
    # Steps and groups are each within their limit; their product is 1024 x 4000 values (164 MB).
    body = {"schedule": {"type": "StepLR", "step_size": 7}, "base_lrs": [0.1] * GROUPS, "steps": 4000}
    _over_budget(http.post("/v1/schedules/preview", json=body), "steps")
    body["steps"] = 50
    answer = http.post("/v1/schedules/preview", json=body)
    assert answer.status_code == 200 and len(answer.json()["lrs"]) == 50


def test_a_window_far_ahead_on_many_groups_is_cut_to_the_budget(http):
    _wide_run(http, "wide-window")
    spec = parse_schedule({"type": "StepLR", "step_size": 7}, n_groups=GROUPS)
    fits = cost.steps_within(spec, n_groups=GROUPS, budget=BUDGET)
    for _ in range(2):  # computed, then from memory: the same cut
        window = http.get("/v1/runs/wide-window/lr", params={"step": 0, "ahead": 10_000}).json()["window"]
        assert len(window["lrs"]) == fits
        assert cost.cost(spec, n_groups=GROUPS, steps=len(window["lrs"])) <= BUDGET
    answer = http.post("/v1/runs/wide-window/step", json={"step": 1, "ahead": 10_000}).json()
    assert len(answer["window"]["lrs"]) == fits


def test_a_step_jump_beyond_the_budget_is_refused_and_changes_nothing(http):
    _wide_run(http, "wide-jump")
    _over_budget(http.get("/v1/runs/wide-jump/lr", params={"step": 5000}), "step")
    _over_budget(http.post("/v1/runs/wide-jump/step", json={"step": 5000}), "step")
    assert http.get("/v1/runs/wide-jump").json()["horizon"] == 0
    assert http.get("/v1/runs/wide-jump/lr", params={"step": 100}).status_code == 200


def test_a_dearer_schedule_placed_ahead_is_priced_from_where_it_applies(http):
    """An operator's ``replace_schedule`` placed ahead of the horizon switches the run to a dearer
    schedule on the way: windows across it are cut, and step jumps across it refused, at the
    dearer schedule's price from that step on (before: every step at the cheap schedule's
    price, ~10x the budget's work here), and nothing before it is refused."""
    groups = 64  # few groups: a new schedule's own check (206 steps) lets this one be ~10x as dear
    cheap = parse_schedule({"type": "StepLR", "step_size": 7}, n_groups=groups)
    dear_json = {"type": "LambdaLR", "lr_lambda": "+".join(["step"] * 99)}  # ~200 terms: ~11 steps' work
    dear = parse_schedule(dear_json, n_groups=groups)
    at = 100
    left = BUDGET - cost.cost(cheap, n_groups=groups, steps=at)  # after the cheap steps up to the switch
    fits = at + cost.steps_within(dear, n_groups=groups, budget=left)
    assert fits < cost.steps_within(cheap, n_groups=groups, budget=BUDGET) // 5
    for run_id in ("ahead-window", "ahead-jump"):
        body = {"run_id": run_id, "schedule": {"type": "StepLR", "step_size": 7}, "base_lrs": [0.1] * groups}
        assert http.post("/v1/runs", json=body).status_code == 201
        placed = http.post(f"/v1/runs/{run_id}/control",
                           json={"action": "replace_schedule", "schedule": dear_json, "at_step": at})
        assert placed.status_code == 200 and placed.json()["applied_at"] == at, placed.text
    window = http.get("/v1/runs/ahead-window/lr", params={"step": 0, "ahead": 10_000}).json()["window"]
    assert len(window["lrs"]) == fits
    _over_budget(http.get("/v1/runs/ahead-jump/lr", params={"step": fits + 50}), "step")
    assert http.get("/v1/runs/ahead-jump").json()["horizon"] == 0
    assert http.get("/v1/runs/ahead-jump/lr", params={"step": at - 1}).status_code == 200  # before it: cheap


def test_a_create_whose_expressions_cost_too_much_to_check_is_refused(http):
    # 1024 different 199-term expressions: each is evaluated at 101 steps before the run exists.
    lambdas = [f"{i + 1}/({i + 1}+step)" + "+0*step" * 48 for i in range(GROUPS)]
    body = {"run_id": "wide-exprs", "schedule": {"type": "LambdaLR", "lr_lambda": lambdas},
            "base_lrs": [0.1] * GROUPS}
    _over_budget(http.post("/v1/runs", json=body), "schedule")
    assert http.get("/v1/runs/wide-exprs").status_code == 404


def test_many_distinct_short_expressions_fit_and_step(http):
    lambdas = [f"0.999 ** step * {i + 1} / {i + 2}" for i in range(GROUPS)]
    body = {"run_id": "distinct-exprs", "schedule": {"type": "LambdaLR", "lr_lambda": lambdas},
            "base_lrs": [0.1] * GROUPS}
    assert http.post("/v1/runs", json=body).status_code == 201
    window = http.get("/v1/runs/distinct-exprs/lr", params={"step": 0, "ahead": 100}).json()["window"]
    assert len(window["lrs"]) == 101
    assert window["lrs"][100][3] == pytest.approx(0.1 * 0.999**100 * 4 / 5)


def test_a_history_of_too_many_points_on_many_groups_is_refused(http):
    _wide_run(http, "wide-history")
    horizon = 0
    while horizon < 1000:  # windows are cut: several requests
        horizon = http.post("/v1/runs/wide-history/step", json={"step": horizon + 1, "ahead": 10_000}).json()
        horizon = http.get("/v1/runs/wide-history").json()["horizon"]
    _over_budget(http.get("/v1/runs/wide-history/history", params={"max_points": 1000}), "max_points")
    history = http.get("/v1/runs/wide-history/history", params={"max_points": 100}).json()
    assert len(history["lrs"]["steps"]) == 100


def test_a_history_of_a_run_of_many_events_shows_the_latest_within_the_budget(http):
    """An operator's 2,000 actions on one run: a history shows the latest ``max_points`` of them
    (the tree before: every one, in every answer). Events over the budget are a 422 before any
    is read (tests/service/runs/test_history_events.py: 31,251 of them here would take a minute)."""
    body = {"run_id": "many-actions", "schedule": {"type": "StepLR", "step_size": 7}, "base_lrs": [0.1]}
    assert http.post("/v1/runs", json=body).status_code == 201
    for i in range(2000):
        answer = http.post("/v1/runs/many-actions/control",
                           json={"action": "scale", "factor": 1.0, "reason": f"#{i}"})
        assert answer.status_code == 200, answer.text
    history = http.get("/v1/runs/many-actions/history", params={"max_points": 100}).json()
    assert history["events_total"] == 2001 and len(history["events"]) == 100
    assert [e["reason"] for e in history["events"]] == [f"#{i}" for i in range(1900, 2000)]
    history = http.get("/v1/runs/many-actions/history", params={"max_points": 5000}).json()
    assert history["events_total"] == len(history["events"]) == 2001


def test_a_spike_guard_view_of_a_long_run_is_replayed_in_the_background(http):
    """A guarded run of 20,000 reports: reading and judging them all costs more than the budget
    (~1.5x), so the first view in the server answers at once without bands while one background
    thread replays them; the views after it show every report's band (the tree before: the
    first view of a run in a process replayed its whole log in the request, however long)."""
    guard = {"type": "SpikeGuard", "schedule": {"type": "StepLR", "step_size": 100}}
    body = {"run_id": "long-guarded", "schedule": guard, "base_lrs": [0.1]}
    assert http.post("/v1/runs", json=body).status_code == 201
    for first in (1, 10_001):  # a request of 10,000 records: 10,000 reports, each placed at its step
        records = [{"step": step, "name": "loss", "value": 1.0 + 0.01 * (step % 7), "rank": 0}
                   for step in range(first, first + 10_000)]
        answer = http.post("/v1/runs/long-guarded/metrics", json={"records": records})
        assert answer.status_code == 202, answer.text
    for step in (10_000, 20_000):  # every report applies at or below the horizon
        assert http.get("/v1/runs/long-guarded/lr", params={"step": step}).status_code == 200
    first_view = http.get("/v1/runs/long-guarded/spike-guard")
    assert first_view.status_code == 200, first_view.text
    shown = SpikeGuardPublic.model_validate(first_view.json())
    assert (shown.band, shown.bands_through, shown.horizon) == ({}, None, 20_000)
    deadline = time.monotonic() + 120
    while (view := http.get("/v1/runs/long-guarded/spike-guard").json())["bands_through"] is None:
        assert time.monotonic() < deadline, "the background replay did not end"
        time.sleep(0.05)
    assert view["bands_through"] == view["horizon"] == 20_000
    band = view["band"]["0"]
    assert len(band["steps"]) == 1000 and band["steps"][0] == 1 and band["steps"][-1] == 20_000
