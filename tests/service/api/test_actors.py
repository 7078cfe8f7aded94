"""Who did what: every event names its actor (API.md, Fleet control); actions keep their reason."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from lrserve.service.app import create_app

from tests.service.api.conftest import make_run
from tests.specs import plateau

SECRETS = {"ops-alice": "al1ce-s3cret", "ci-job": "j0b-s3cret"}
TOKENS = f"ops-alice:admin:{SECRETS['ops-alice']},ci-job:write:{SECRETS['ci-job']},admin:bare-s3cret"
ALICE = {"Authorization": f"Bearer {SECRETS['ops-alice']}"}
JOB = {"Authorization": f"Bearer {SECRETS['ci-job']}"}
BARE = {"Authorization": "Bearer bare-s3cret"}
ACTIONS = [
    {"action": "set_lr", "lr": 0.05},
    {"action": "scale", "factor": 0.5},
    {"action": "hold"},
    {"action": "resume"},
    {"action": "replace_schedule", "schedule": {"type": "ConstantLR", "factor": 0.5, "total_iters": 2}},
    {"action": "stop"},
]


@pytest.fixture
def secured(settings):
    with TestClient(create_app(settings.model_copy(update={"tokens": TOKENS}))) as client:
        yield client


def _events(client, run_id="r"):
    return client.get(f"/v1/runs/{run_id}/history", headers=ALICE).json()["events"]


def test_every_action_kind_records_its_actor_and_reason(secured):
    created = secured.post("/v1/runs", headers=JOB, json={
        "run_id": "r", "schedule": {"type": "StepLR", "step_size": 3}, "base_lrs": [0.1]})
    assert created.status_code == 201
    for n, action in enumerate(ACTIONS, start=1):
        answer = secured.post("/v1/runs/r/control", headers=ALICE, json={**action, "reason": f"why {n}"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["event"]["actor"] == "ops-alice"
        assert answer.json()["event"]["reason"] == f"why {n}"
        secured.get("/v1/runs/r/lr", params={"step": n}, headers=JOB)  # the job takes the step: it applies
    events = _events(secured)
    assert events[0]["kind"] == "created" and events[0]["actor"] == "ci-job"
    controls = [e for e in events if e["kind"] == "control"]
    assert [e["action"] for e in controls] == [a["action"] for a in ACTIONS]
    assert [(e["actor"], e["reason"]) for e in controls] == [("ops-alice", f"why {n}") for n in range(1, 7)]
    statuses = [(e["status"], e["actor"], e["reason"]) for e in events if e["kind"] == "status"]
    assert statuses == [("held", "ops-alice", "why 3"), ("active", "ops-alice", "why 4"),
                        ("stopped", "ops-alice", "why 6")]  # what an action caused is its actor's doing
    everything = json.dumps(events)
    assert not any(secret in everything for secret in [*SECRETS.values(), "bare-s3cret"])


def test_an_unnamed_token_acts_as_its_role_and_a_reason_is_optional(secured):
    body = {"run_id": "r", "schedule": {"type": "StepLR", "step_size": 3}, "base_lrs": [0.1]}
    secured.post("/v1/runs", headers=BARE, json=body)
    event = secured.post("/v1/runs/r/control", headers=BARE, json={"action": "hold"}).json()["event"]
    assert (event["actor"], event["reason"]) == ("admin", None)
    assert [(e["kind"], e["actor"]) for e in _events(secured)] == [("created", "admin"), ("control", "admin")]


def test_server_decisions_are_the_servers(api):
    make_run(api, "p", schedule=plateau())
    for step, loss in enumerate([1.0, 2.0, 3.0], start=1):
        api.post("/v1/runs/p/step", json={"step": step, "metrics": {"val_loss": loss}})
    events = api.get("/v1/runs/p/history").json()["events"]
    assert [(e["kind"], e["actor"]) for e in events] == [
        ("created", "local"), ("plateau_reduction", "server"), ("plateau_reduction", "server")]
    assert all("reason" not in e for e in events)  # only actions (and what they cause) have one


@pytest.mark.parametrize("reason", ["", "x" * 1001, 7])
def test_a_bad_reason_is_422_naming_it(api, reason):
    make_run(api, "r")
    answer = api.post("/v1/runs/r/control", json={"action": "hold", "reason": reason})
    assert answer.status_code == 422
    assert answer.json()["errors"][0]["field"] == "reason"
    assert [e["kind"] for e in api.get("/v1/runs/r/history").json()["events"]] == ["created"]
