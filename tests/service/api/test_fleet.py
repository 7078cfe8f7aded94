"""``POST /v1/control``: one action on every run a selector matches, each at its own first free step."""

from __future__ import annotations

import pytest

from tests.service.api.conftest import make_run


def _fleet(api, **body):
    return api.post("/v1/control", json={"action": {"action": "scale", "factor": 0.5}, **body})


def test_each_matching_run_takes_the_action_at_its_own_first_free_step(api):
    for run_id, horizon in (("a", 3), ("b", 7), ("c", 0)):
        make_run(api, run_id, labels={"sweep": "7"})
        api.get(f"/v1/runs/{run_id}/lr", params={"step": horizon})
    make_run(api, "other", labels={"sweep": "8"})
    answer = _fleet(api, selector={"labels": {"sweep": "7"}}, reason="lr too high")
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"matched": 3, "dry_run": False, "results": [
        {"run_id": "a", "applied_at": 4}, {"run_id": "b", "applied_at": 8}, {"run_id": "c", "applied_at": 1}]}
    for run_id in ("a", "b", "c"):
        events = api.get(f"/v1/runs/{run_id}/history").json()["events"]
        [control] = [e for e in events if e["kind"] == "control"]
        assert (control["action"], control["factor"], control["actor"], control["reason"]) == (
            "scale", 0.5, "local", "lr too high")
    assert [e["kind"] for e in api.get("/v1/runs/other/history").json()["events"]] == ["created"]


def test_a_run_that_refuses_is_reported_and_the_others_still_act(api):
    for run_id in ("a", "b", "c"):
        make_run(api, run_id, labels={"team": "x"})
    api.post("/v1/runs/b/control", json={"action": "stop"})
    api.get("/v1/runs/b/lr", params={"step": 1})  # b is stopped from step 1
    make_run(api, "d", base_lrs=(0.1, 0.2), labels={"team": "x"})  # two groups: lrs of one is wrong for it
    answer = api.post("/v1/control", json={"selector": {"labels": {"team": "x"}},
                                           "action": {"action": "set_lr", "lrs": [0.01]}}).json()
    by_run = {r["run_id"]: r for r in answer["results"]}
    assert answer["matched"] == 4
    assert by_run["a"] == {"run_id": "a", "applied_at": 1} and by_run["c"] == {"run_id": "c", "applied_at": 1}
    assert by_run["b"]["error"]["code"] == "run_conflict" and "stopped" in by_run["b"]["error"]["detail"]
    assert by_run["d"]["error"]["errors"][0]["field"] == "lrs"


def test_status_filter_and_dry_run(api):
    for run_id in ("a", "b", "c"):
        make_run(api, run_id, labels={"sweep": "7"})
    api.post("/v1/runs/b/control", json={"action": "hold"})
    api.get("/v1/runs/b/lr", params={"step": 2})
    dry = _fleet(api, selector={"labels": {"sweep": "7"}, "status": ["held"]}, dry_run=True).json()
    assert dry == {"matched": 1, "dry_run": True,
                   "results": [{"run_id": "b", "status": "held", "horizon": 2}]}
    kinds = [e["kind"] for e in api.get("/v1/runs/b/history").json()["events"]]
    assert kinds == ["created", "control", "status"]
    active = api.post("/v1/control", json={"selector": {"status": ["active"]}, "action": {"action": "stop"}})
    assert [r["run_id"] for r in active.json()["results"]] == ["a", "c"]
    assert _fleet(api, selector={"labels": {"sweep": "nope"}}).json() == {
        "matched": 0, "dry_run": False, "results": []}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        pytest.param({"selector": {}}, "selector", id="empty-selector"),
        pytest.param({"selector": {"status": []}}, "selector.status", id="no-statuses"),
        pytest.param({"selector": {"status": ["paused"]}}, "selector.status.0", id="unknown-status"),
        pytest.param({"selector": {"labels": {"a": "b"}}, "action": {"action": "hold", "at_step": 5}},
                     "action.at_step", id="at-step"),
        pytest.param({"selector": {"labels": {"a": "b"}}, "action": {"action": "scale"}}, "action",
                     id="scale-without-factor"),
        pytest.param({"selector": {"labels": {"a": "b"}}, "reason": ""}, "reason", id="empty-reason"),
        pytest.param({"selector": {"labels": {"a": "b"}}, "dry_run": "yes"}, "dry_run", id="dry-run-text"),
        pytest.param({"action": {"action": "hold"}}, "selector", id="no-selector"),
    ],
)
def test_bad_requests_are_422_naming_the_field(api, body, field):
    make_run(api, "a", labels={"a": "b"})
    answer = api.post("/v1/control", json={"action": {"action": "hold"}, **body})
    assert answer.status_code == 422, answer.text
    assert answer.json()["errors"][0]["field"] == field
    assert [e["kind"] for e in api.get("/v1/runs/a/history").json()["events"]] == ["created"]


def test_a_selector_matching_more_than_the_cap_is_422_before_anything_changes(settings):
    from fastapi.testclient import TestClient
    from lrserve.service.app import create_app

    with TestClient(create_app(settings.model_copy(update={"max_fleet_runs": 2}))) as api:
        for run_id in ("a", "b", "c"):
            make_run(api, run_id, labels={"sweep": "7"})
        answer = _fleet(api, selector={"labels": {"sweep": "7"}})
        assert answer.status_code == 422
        assert answer.json()["errors"][0]["field"] == "selector" and "more than 2" in answer.json()["detail"]
        assert _fleet(api, selector={"labels": {"sweep": "7"}}, dry_run=True).status_code == 422
        assert all(len(api.get(f"/v1/runs/{r}/history").json()["events"]) == 1 for r in "abc")


def test_an_action_after_a_stop_placed_ahead_is_409_for_the_run_and_for_the_fleet(api):
    """A stop placed ahead stops the run after its step: an action placed at or after it is the
    conflict a stopped run's is, through the route and through fleet control, and nothing is
    stored; an action before it still goes in."""
    make_run(api, "a", labels={"team": "y"})
    assert api.post("/v1/runs/a/control", json={"action": "stop", "at_step": 5}).status_code == 200
    events = api.get("/v1/runs/a/history").json()["events"]
    refused = api.post("/v1/runs/a/control", json={"action": "set_lr", "lr": 0.7, "at_step": 8})
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "run_conflict" and "stops after step 5" in refused.json()["detail"]
    assert api.get("/v1/runs/a/history").json()["events"] == events
    make_run(api, "b", labels={"team": "y"})
    assert api.post("/v1/runs/b/control", json={"action": "stop"}).status_code == 200  # after step 1
    answer = api.post("/v1/control", json={"selector": {"labels": {"team": "y"}},
                                           "action": {"action": "resume"}}).json()
    by_run = {r["run_id"]: r for r in answer["results"]}
    assert by_run["a"] == {"run_id": "a", "applied_at": 1}  # before a's stop: taken
    refusal = by_run["b"]["error"]
    assert refusal["code"] == "run_conflict" and "stops after step 1" in refusal["detail"]
