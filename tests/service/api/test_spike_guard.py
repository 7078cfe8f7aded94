"""The spike guard over HTTP: reports from .../metrics, .../step and the barrier, events,
windows that carry the spikes, the stop, replay after a restart, previews, the band."""

from __future__ import annotations

import asyncio
import json
import math
import threading

from fastapi.testclient import TestClient
from lrserve.service.app import create_app

from tests.service.api.conftest import make_run

INNER = {"type": "CosineAnnealingLR", "T_max": 500, "eta_min": 0.0}
GUARD = {"type": "SpikeGuard", "schedule": INNER}  # the documented defaults


def loss(k):
    return 3.0 * math.exp(-k / 200) + 0.2 + 0.02 * math.sin(1.3 * k)


def post(api, url, body):
    """POST with Python's JSON, which writes NaN (httpx refuses to), as the client does."""
    return api.post(url, content=json.dumps(body), headers={"content-type": "application/json"})


def log(api, run_id, records):
    response = post(api, f"/v1/runs/{run_id}/metrics", {"records": records})
    assert response.status_code == 202, response.text


def events(api, run_id, kind):
    history = api.get(f"/v1/runs/{run_id}/history").json()
    return [e for e in history["events"] if e["kind"] == kind]


def test_spike_logged_on_one_rank_backs_off_every_rank_at_the_first_free_step(api):
    make_run(api, "g", GUARD, base_lrs=[0.1], world_size=2)
    for k in range(1, 41):  # both ranks step and log, as a job with a window of 1 would
        api.get("/v1/runs/g/lr", params={"step": k})
        log(api, "g", [{"step": k, "name": "loss", "value": loss(k) * (5 if (k, r) == (40, 1) else 1),
                        "rank": r} for r in range(2)])
    windows = [api.get("/v1/runs/g/lr", params={"step": 38, "ahead": 10}).json() for _ in range(2)]
    assert windows[0] == windows[1]  # every rank, the same answer
    assert [s["applied_at"] for s in windows[0]["spikes"]] == [41]
    (spike,) = events(api, "g", "loss_spike")
    assert spike["step"] == 40 and spike["rank"] == 1 and spike["applied_at"] == 41
    assert spike["last_good_step"] == 39 and spike["value"] == loss(40) * 5 and spike["count"] == 1
    assert spike["baseline"] < spike["value"] / 3
    make_run(api, "plain", INNER, base_lrs=[0.1])
    inner = api.get("/v1/runs/plain/lr", params={"step": 38, "ahead": 10}).json()["window"]["lrs"]
    guarded = windows[0]["window"]["lrs"]
    assert guarded[:3] == inner[:3]  # bit-identical until the spike
    assert guarded[3:] == [[v * 0.5 for v in row] for row in inner[3:]]


def test_a_nan_sent_with_step_lands_at_that_step(api):
    make_run(api, "s", GUARD, base_lrs=[0.1])
    for k in range(1, 10):
        post(api, "/v1/runs/s/step", {"step": k, "metrics": {"loss": loss(k)}})
    answer = post(api, "/v1/runs/s/step", {"step": 10, "metrics": {"loss": float("nan")}}).json()
    assert answer["spikes"][0]["value"] == "NaN" and answer["spikes"][0]["applied_at"] == 10
    inner = api.post("/v1/schedules/preview", json={"schedule": INNER, "base_lrs": [0.1], "steps": 11}).json()
    assert answer["lrs"] == [inner["lrs"][10][0] * 0.5]
    (event,) = events(api, "s", "loss_spike")
    assert event["step"] == 10 and event["value"] in ("NaN", None)  # spelled once h13b's encoding lands


def test_reports_resent_are_judged_once(api):
    make_run(api, "r", GUARD, base_lrs=[0.1])
    batch = [{"step": 1, "name": "loss", "value": float("nan"), "rank": 0}]
    log(api, "r", batch)
    log(api, "r", batch)  # the client's retry after a lost answer
    api.get("/v1/runs/r/lr", params={"step": 3})
    assert len(events(api, "r", "loss_spike")) == 1


def test_max_spikes_exceeded_stops_the_run_naming_the_reason(api):
    make_run(api, "m", {**GUARD, "max_spikes": 1, "hold": 1, "ramp": 1}, base_lrs=[0.1])
    for k in (1, 3):
        api.get("/v1/runs/m/lr", params={"step": k})
        log(api, "m", [{"step": k, "name": "loss", "value": float("inf"), "rank": 0}])
    answer = api.get("/v1/runs/m/lr", params={"step": 4}).json()
    assert answer["status"] == "stopped" and answer["stopped_at"] == 4
    (status,) = events(api, "m", "status")
    assert status["status"] == "stopped" and "max_spikes" in status["reason"]
    assert [e["count"] for e in events(api, "m", "loss_spike")] == [1, 2]


def test_decisions_replay_identically_after_a_restart(settings):
    def drive(api, ks):
        for k in ks:
            api.get("/v1/runs/x/lr", params={"step": k, "ahead": 2})
            value = float("nan") if k == 30 else (9.0 if k == 70 else loss(k))
            log(api, "x", [{"step": k, "name": "loss", "value": value, "rank": k % 2}])

    with TestClient(create_app(settings)) as api:
        make_run(api, "x", GUARD, base_lrs=[0.1, 0.01])
        drive(api, range(1, 60))
        before = api.get("/v1/runs/x/lr", params={"step": 0, "ahead": 61}).json()
    with TestClient(create_app(settings)) as api:  # a fresh process: snapshot + log replay
        after = api.get("/v1/runs/x/lr", params={"step": 0, "ahead": 61}).json()
        assert after == before
        drive(api, range(62, 100))
        final = api.get("/v1/runs/x/lr", params={"step": 0, "ahead": 100}).json()
    with TestClient(create_app(settings)) as api:
        assert api.get("/v1/runs/x/lr", params={"step": 0, "ahead": 100}).json() == final
        guard = api.get("/v1/runs/x/spike-guard").json()
    assert [(s["step"], s["rank"]) for s in guard["spikes"]] == [(30, 0), (70, 0)]
    assert set(guard["band"]) == {"0", "1"} and guard["bands_through"] == guard["horizon"]
    band = guard["band"]["0"]
    assert len(band["steps"]) == len(band["baseline"]) == len(band["upper"]) == len(band["values"])
    assert band["upper"][0] is None and band["upper"][-1] > band["baseline"][-1]


def test_barrier_reports_feed_the_guard_per_rank(settings):
    schedule = {"type": "SpikeGuard", "schedule": {"type": "ReduceLROnPlateau", "patience": 100}}
    with TestClient(create_app(settings.model_copy(update={"barrier_timeout_s": 5}))) as api:
        make_run(api, "b", schedule, base_lrs=[0.1], world_size=2)
        for k in range(1, 25):
            answers = {}

            def rank(r, k=k, answers=answers):
                value = float("nan") if (k, r) == (24, 1) else loss(k)
                body = {"step": k, "rank": r, "metrics": {"val_loss": 1.0, "loss": value}}
                answers[r] = post(api, "/v1/runs/b/step", body).json()

            threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert answers[0] == answers[1]
        assert answers[0]["lrs"] == [0.05] and answers[0]["spikes"][0]["rank"] == 1


def test_preview_returns_the_spikes_a_run_would_see(api):
    losses = [loss(k) for k in range(1, 100)]
    losses[60] = 10.0
    body = {"schedule": GUARD, "base_lrs": [0.1], "steps": 100, "metrics": {"loss": losses}}
    first = post(api, "/v1/schedules/preview", body).json()
    assert first == post(api, "/v1/schedules/preview", body).json()
    assert [(s["step"], s["applied_at"], s["last_good_step"]) for s in first["spikes"]] == [(61, 61, 60)]
    make_run(api, "p", GUARD, base_lrs=[0.1])
    for k, value in enumerate(losses, start=1):
        post(api, "/v1/runs/p/step", {"step": k, "metrics": {"loss": value}})
    window = api.get("/v1/runs/p/lr", params={"step": 0, "ahead": 99}).json()
    assert window["window"]["lrs"] == first["lrs"]


def test_guard_inside_sequential_is_a_clear_422(api):
    spec = {"type": "SequentialLR", "milestones": [5], "schedulers": [{"type": "LinearLR"}, GUARD]}
    response = api.post("/v1/runs", json={"schedule": spec, "base_lrs": [0.1]})
    assert response.status_code == 422
    assert "schedule.schedulers.1" in response.text and "SpikeGuard must wrap" in response.text


def test_spike_guard_route_without_a_guard_is_409(api):
    make_run(api, "n", INNER)
    response = api.get("/v1/runs/n/spike-guard")
    assert response.status_code == 409 and "SpikeGuard" in response.json()["detail"]


def test_the_view_is_read_and_written_off_the_event_loop(api, monkeypatch):
    """A view's bands (up to the budget's points: ~8 MB of JSON) are read and written in a
    worker thread: the route's answer is bytes, none of its work on the loop."""
    from lrserve.service.api.routes import spike_guard as route

    where: list[bool] = []
    writing = route.spike_guard_json

    def spied(view):
        try:
            asyncio.get_running_loop()
            where.append(True)
        except RuntimeError:  # no loop in this thread
            where.append(False)
        return writing(view)

    monkeypatch.setattr(route, "spike_guard_json", spied)
    make_run(api, "g", GUARD, base_lrs=[0.1])
    log(api, "g", [{"step": k, "name": "loss", "value": loss(k), "rank": 0} for k in range(1, 30)])
    api.get("/v1/runs/g/lr", params={"step": 30})
    guard = api.get("/v1/runs/g/spike-guard").json()
    assert len(guard["band"]["0"]["steps"]) == 29 and where == [False]
