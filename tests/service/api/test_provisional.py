"""The provisional tail (API.md, "Outages: the provisional tail"), ``watched`` and ``max_ahead``.

A tail is the values after a window as if no input arrived; not committed. A job that rode
one names its first step in ``provisional_from``: the steps are committed, and an input
placed on them meanwhile is recorded once as ``provisional_divergence``.
"""

from __future__ import annotations

import pytest
import torch
from lrserve.service.engine import expr

from tests.service.api.conftest import make_run
from tests.specs import plateau, plateau_max_acc

COSINE = {"type": "CosineAnnealingLR", "T_max": 40, "eta_min": 0.001}
PLATEAU = plateau()


def torch_lrs(steps):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40, eta_min=0.001)
    out = [sched.get_last_lr()]
    for _ in range(steps):
        opt.step()
        sched.step()
        out.append(sched.get_last_lr())
    return out


def history_kinds(api, run_id):
    events = api.get(f"/v1/runs/{run_id}/history").json()["events"]
    return [e for e in events if e["kind"] == "provisional_divergence"]


def test_the_tail_follows_the_window_is_torchs_and_is_not_committed(api):
    make_run(api, "t", COSINE)
    answer = api.get("/v1/runs/t/lr", params={"step": 0, "ahead": 4, "provisional": 20}).json()
    tail = answer["provisional"]
    assert tail["start"] == 5 and len(tail["lrs"]) == 20 and tail["momentums"] is None
    assert answer["window"]["lrs"] + tail["lrs"] == torch_lrs(24)
    assert api.get("/v1/runs/t").json()["horizon"] == 4  # not committed
    assert answer["watched"] == [] and answer["max_ahead"] == 10_000


def test_without_provisional_no_tail_is_computed(api):
    make_run(api, "t", COSINE)
    answer = api.get("/v1/runs/t/lr", params={"step": 0, "ahead": 2}).json()
    assert "provisional" not in answer and answer["watched"] == []


def test_the_tail_is_capped_by_the_setting(settings):
    from fastapi.testclient import TestClient
    from lrserve.service.app import create_app

    with TestClient(create_app(settings.model_copy(update={"max_provisional": 7}))) as api:
        make_run(api, "t", COSINE)
        tail = api.get("/v1/runs/t/lr", params={"step": 0, "provisional": 1000}).json()["provisional"]
    assert len(tail["lrs"]) == 7


def test_the_tail_ends_where_the_schedule_does(api):
    make_run(api, "o", {"type": "OneCycleLR", "max_lr": 0.1, "total_steps": 10})
    answer = api.get("/v1/runs/o/lr", params={"step": 0, "ahead": 2, "provisional": 100}).json()
    assert len(answer["provisional"]["lrs"]) == 8  # steps 3..10; torch raises at 11
    assert answer["provisional"]["momentums"] is not None


def test_post_step_carries_a_tail_and_the_watched_metric(api):
    make_run(api, "p", PLATEAU)
    body = {"step": 1, "metrics": {"val_loss": 1.0}, "provisional": 5}
    answer = api.post("/v1/runs/p/step", json=body).json()
    assert answer["watched"] == ["val_loss"]
    assert answer["provisional"]["start"] == 2 and answer["provisional"]["lrs"] == [[0.1]] * 5


def test_the_tail_includes_an_action_already_placed(api):
    make_run(api, "t", COSINE)
    api.get("/v1/runs/t/lr", params={"step": 0, "ahead": 2})
    response = api.post("/v1/runs/t/control", json={"action": "set_lr", "lr": 0.05, "at_step": 6})
    assert response.status_code == 200, response.text
    answer = api.get("/v1/runs/t/lr", params={"step": 2, "provisional": 10}).json()
    after = api.get("/v1/runs/t/lr", params={"step": 3, "ahead": 9}).json()
    assert answer["provisional"]["lrs"] == after["window"]["lrs"]  # the tail was right
    assert answer["provisional"]["lrs"][3] == [0.05]


def test_riding_a_tail_no_input_changed_commits_it_and_records_nothing(api):
    make_run(api, "t", COSINE)
    first = api.get("/v1/runs/t/lr", params={"step": 0, "ahead": 2, "provisional": 10}).json()
    tail = first["provisional"]
    # the job took steps 3..7 on the tail; its first request after names them
    back = api.get("/v1/runs/t/lr", params={"step": 7, "ahead": 2, "provisional_from": 3,
                                            "provisional_id": tail["id"]}).json()
    assert "provisional_divergence" not in back
    assert back["lrs"] == tail["lrs"][4]
    assert api.get("/v1/runs/t/lr", params={"step": 3, "ahead": 4}).json()["window"]["lrs"] == tail["lrs"][:5]
    assert history_kinds(api, "t") == []


def test_an_action_placed_during_the_outage_is_a_divergence_recorded_once(api):
    make_run(api, "t", COSINE)
    tail = api.get("/v1/runs/t/lr", params={"step": 0, "ahead": 2, "provisional": 10}).json()["provisional"]
    # another replica took an operator action while this job rode the tail (first free step: 3)
    assert api.post("/v1/runs/t/control", json={"action": "scale", "factor": 0.5}).status_code == 200
    params = {"step": 6, "provisional_from": 3, "provisional_id": tail["id"], "rank": 1}
    back = api.get("/v1/runs/t/lr", params=params).json()
    divergence = back["provisional_divergence"]
    assert divergence["step"] == 3 and divergence["rank"] == 1
    assert divergence["from_step"] == 3 and divergence["to_step"] == 6 and divergence["input_steps"] == [3]
    assert back["lrs"][0] < tail["lrs"][3][0]  # the final values, not the tail's
    again = api.get("/v1/runs/t/lr", params=params).json()  # the answer was lost: asked again
    assert again["provisional_divergence"] == divergence
    events = history_kinds(api, "t")
    assert len(events) == 1 and events[0]["input_steps"] == [3]


def test_provisional_from_past_the_step_asked_is_a_422_naming_it(api):
    make_run(api, "t", COSINE)
    response = api.get("/v1/runs/t/lr", params={"step": 2, "provisional_from": 5})
    assert response.status_code == 422
    assert "provisional_from" in response.text


@pytest.mark.parametrize("field", ["provisional", "provisional_from", "provisional_id"])
def test_negative_provisional_fields_are_422s(api, field):
    make_run(api, "t", COSINE)
    response = api.post("/v1/runs/t/step", json={"step": 1, field: -1})
    assert response.status_code == 422 and field in response.text
    response = api.get("/v1/runs/t/lr", params={"step": 1, field: -1})
    assert response.status_code == 422 and field in response.text


def test_watched_follows_a_replaced_schedule(api):
    make_run(api, "w", COSINE)
    assert api.get("/v1/runs/w/lr", params={"step": 0}).json()["watched"] == []
    response = api.post("/v1/runs/w/control",
                        json={"action": "replace_schedule", "schedule": plateau_max_acc()})
    assert response.status_code == 200, response.text
    assert api.get("/v1/runs/w/lr", params={"step": 1}).json()["watched"] == ["val_acc"]
    # the fast path (a cached window) says it too
    assert api.get("/v1/runs/w/lr", params={"step": 1}).json()["watched"] == ["val_acc"]


def test_the_tail_and_max_ahead_are_bounded_by_the_work_budget(settings):
    from fastapi.testclient import TestClient
    from lrserve.service.app import create_app

    with TestClient(create_app(settings.model_copy(update={"work_budget": 10_000}))) as api:
        make_run(api, "t", {"type": "CosineAnnealingLR", "T_max": 100_000})
        answer = api.get("/v1/runs/t/lr", params={"step": 0, "provisional": 100_000}).json()
    assert 0 < len(answer["provisional"]["lrs"]) < 10_000
    assert 0 < answer["max_ahead"] < 10_000  # what a window may hold under this budget


def test_a_held_tail_is_continued_not_repeated_while_it_is_valid(api):
    make_run(api, "t", COSINE)
    first = api.get("/v1/runs/t/lr", params={"step": 0, "ahead": 2, "provisional": 10}).json()["provisional"]
    assert first["start"] == 3
    held = {"provisional_id": first["id"], "provisional_after": 12}
    more = api.get("/v1/runs/t/lr", params={"step": 3, "ahead": 2, "provisional": 10, **held}).json()
    assert more["provisional"]["start"] == 13  # after the held tail
    assert first["lrs"] + more["provisional"]["lrs"] == torch_lrs(22)[3:]
    # an input changes what follows: the held tail is no longer valid, a new one is sent
    assert api.post("/v1/runs/t/control", json={"action": "scale", "factor": 0.5}).status_code == 200
    held = {"provisional_id": first["id"], "provisional_after": 22}
    again = api.get("/v1/runs/t/lr", params={"step": 6, "provisional": 5, **held}).json()
    assert again["provisional"]["start"] == 7 and again["provisional"]["id"] > first["id"]
    after = api.get("/v1/runs/t/lr", params={"step": 7, "ahead": 4}).json()["window"]["lrs"]
    assert again["provisional"]["lrs"] == after


def test_a_tail_compiles_no_expression_again(api, monkeypatch):
    """The tail's engine is restored from the run's snapshot with the run's spec: a LambdaLR's
    expressions, compiled when the run was made, are not compiled again for each new tail."""
    make_run(api, "lam", {"type": "LambdaLR", "lr_lambda": ["0.99**step", "1/(1+step)"]}, base_lrs=[0.1, 0.2])
    api.get("/v1/runs/lam/lr", params={"step": 0, "ahead": 4}).raise_for_status()
    compiled = []
    real = expr._compile
    monkeypatch.setattr(expr, "_compile", lambda source: compiled.append(source) or real(source))
    for step in (5, 10):  # each commit makes a new tail
        answer = api.get("/v1/runs/lam/lr", params={"step": step, "ahead": 4, "provisional": 20}).json()
        assert answer["provisional"]["start"] == step + 5
        assert answer["provisional"]["lrs"][0] == [0.1 * 0.99 ** (step + 5), 0.2 / (step + 6)]
    assert compiled == []


def test_the_tail_includes_a_spike_guard_report_already_placed(api):
    """A loss logged before the tail is computed is an input already placed (a spike-guard
    report, judged at the first free step): the tail backs off as the final steps will, so a
    job riding it takes the final values, as ``settle`` assumes of every tail (no divergence is
    recorded for an input older than the tail)."""
    import json as stdjson

    make_run(api, "g", {"type": "SpikeGuard", "schedule": COSINE})
    for k in range(1, 10):
        api.get("/v1/runs/g/lr", params={"step": k})
        body = {"records": [{"step": k, "name": "loss", "value": 1.0 if k < 9 else float("nan"), "rank": 0}]}
        response = api.post("/v1/runs/g/metrics", content=stdjson.dumps(body),
                            headers={"content-type": "application/json"})
        assert response.status_code == 202, response.text
    answer = api.get("/v1/runs/g/lr", params={"step": 9, "provisional": 6}).json()
    tail = answer["provisional"]
    assert tail["start"] == 10
    after = api.get("/v1/runs/g/lr", params={"step": 10, "ahead": 5}).json()
    assert [s["applied_at"] for s in after["spikes"]] == [10]  # the NaN at step 9, applied at 10
    assert tail["lrs"] == after["window"]["lrs"]  # the tail was right


def _plateau_run(api, run_id, steps):
    """A plateau run with its watched metric reported at each of ``steps`` steps: one input
    event per step, as a long training run's log holds."""
    make_run(api, run_id, PLATEAU)
    for k in range(1, steps + 1):
        response = api.post(f"/v1/runs/{run_id}/step", json={"step": k, "metrics": {"val_loss": 1.0}})
        assert response.status_code == 200, response.text


def test_settling_reads_the_inputs_since_the_tail_not_the_whole_log(api, monkeypatch):
    """A settle read the run's whole event log, every time (a 20,000-step plateau run: 0.65-1 s
    per request, any read token may send ``provisional_from``): now the database finds the
    steps of the inputs since the tail (or on the steps ridden) and the divergence already
    recorded, and a divergence is still found and recorded once."""
    _plateau_run(api, "p", 60)
    tail = api.get("/v1/runs/p/lr", params={"step": 60, "provisional": 10}).json()["provisional"]
    assert api.post("/v1/runs/p/control", json={"action": "scale", "factor": 0.5}).status_code == 200
    store = api.app.state.manager.store
    read = []

    def counted(method):
        def call(*args, **kwargs):
            found = method(*args, **kwargs)
            read.append(len(found))
            return found
        return call

    def whole_log(*args, **kwargs):
        raise AssertionError("a settle read the run's whole log")

    monkeypatch.setattr(store, "read_events", whole_log)
    monkeypatch.setattr(store, "steps_of", counted(store.steps_of))
    monkeypatch.setattr(store, "read_events_of", counted(store.read_events_of))
    params = {"step": 64, "provisional_from": 61, "provisional_id": tail["id"]}
    back = api.get("/v1/runs/p/lr", params=params).json()
    again = api.get("/v1/runs/p/lr", params=params).json()
    after = api.get("/v1/runs/p/lr", params={"step": 64, "provisional_from": 62}).json()
    on = api.get("/v1/runs/p/lr", params={"step": 64, "provisional_from": 61}).json()
    assert back["provisional_divergence"]["input_steps"] == [61]
    assert again["provisional_divergence"] == back["provisional_divergence"]
    assert "provisional_divergence" not in after  # without the id: inputs on the steps ridden (62..64)
    assert on["provisional_divergence"] == back["provisional_divergence"]  # on 61..64: the one recorded
    assert read and max(read) <= 1  # a step or a record, never the 60 metric events before


def test_a_settle_names_the_first_input_steps_and_is_never_refused(api, monkeypatch):
    """However many inputs landed on the steps of a ride (a ride from step 0 of a long run
    without the tail's id, or a thousand ranks' reports since an old tail), the settle answers,
    naming the first ``MOST_INPUT_STEPS`` of their steps: a job's request after an outage is
    never refused for what other ranks did."""
    from lrserve.service.runs import provisional

    monkeypatch.setattr(provisional, "MOST_INPUT_STEPS", 5)
    _plateau_run(api, "p", 30)
    response = api.get("/v1/runs/p/lr", params={"step": 30, "provisional_from": 0})
    assert response.status_code == 200, response.text
    assert response.json()["provisional_divergence"]["input_steps"] == [1, 2, 3, 4, 5]
