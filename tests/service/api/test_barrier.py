"""The metric barrier: N ranks report, one decision from their mean, identical answers."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient
from lrserve.service.app import create_app

from tests.specs import plateau_on_any_rise

PLATEAU = plateau_on_any_rise()


@pytest.fixture
def api(settings):
    """The API with a short barrier timeout, on each backend."""
    with TestClient(create_app(settings.model_copy(update={"barrier_timeout_s": 0.5}))) as client:
        yield client


def report_together(api, run_id, step, values):
    answers = {}

    def rank(r):
        answers[r] = api.post(f"/v1/runs/{run_id}/step",
                              json={"step": step, "rank": r, "metrics": {"val_loss": values[r]}}).json()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(values))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_ranks_wait_for_each_other_and_decide_on_the_mean(api):
    api.post("/v1/runs", json={"run_id": "b", "schedule": PLATEAU, "base_lrs": [0.1], "world_size": 3})
    first = report_together(api, "b", 1, [1.0, 2.0, 3.0])  # mean 2.0: the best so far
    second = report_together(api, "b", 2, [1.5, 2.5, 2.3])  # mean 2.1 > 2.0: no improvement -> reduce
    assert len({str(a["lrs"]) for a in first.values()}) == 1
    assert len({str(a["lrs"]) for a in second.values()}) == 1
    assert first[0]["lrs"] == [0.1] and second[0]["lrs"] == [0.05]
    events = api.get("/v1/runs/b/history").json()["events"]
    reduction = [e for e in events if e["kind"] == "plateau_reduction"]
    assert [(e["step"], e["value"]) for e in reduction] == [(2, (1.5 + 2.5 + 2.3) / 3)]


def test_a_missing_rank_times_out_into_an_event(api):
    api.post("/v1/runs", json={"run_id": "t", "schedule": PLATEAU, "base_lrs": [0.1], "world_size": 2})
    answer = api.post("/v1/runs/t/step", json={"step": 1, "rank": 1, "metrics": {"val_loss": 4.0}}).json()
    assert answer["step"] == 1
    late = api.post("/v1/runs/t/step", json={"step": 1, "rank": 0, "metrics": {"val_loss": 9.0}}).json()
    assert late["lrs"] == answer["lrs"]  # step 1 is final: the late report is history only
    events = api.get("/v1/runs/t/history").json()["events"]
    timeouts = [e for e in events if e["kind"] == "barrier_timeout"]
    assert len(timeouts) == 1 and timeouts[0]["missing_ranks"] == [0] and timeouts[0]["step"] == 1


def test_rank_beyond_world_size_is_422(api):
    api.post("/v1/runs", json={"run_id": "w", "schedule": PLATEAU, "base_lrs": [0.1], "world_size": 2})
    response = api.post("/v1/runs/w/step", json={"step": 1, "rank": 2, "metrics": {"val_loss": 1.0}})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "rank"
