"""Every JSON answer agrees with the pydantic model the OpenAPI document names for it.

The routes build their bodies in ``service/api/responses.py`` and return them as they are
(no response validation at run time: it would cost the hot path), so nothing else keeps a
body and its documented model together. Here each route answers real requests, in every
shape it has (a window with spikes and a provisional tail and divergence, a dry and a real
fleet action, each error status, the fast path's answer), and each body must parse as its
model *and* dump back to itself: a field missing, of another type, or not documented fails.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from fastapi.testclient import TestClient
from lrserve.service.api import schemas
from lrserve.service.app import create_app
from lrserve.service.settings import Settings
from pydantic import BaseModel

TOKENS = {"read": "r-token", "write": "w-token", "admin": "a-token"}
ADMIN = {"Authorization": f"Bearer {TOKENS['admin']}"}
COSINE = {"type": "CosineAnnealingLR", "T_max": 100}
GUARD = {"type": "SpikeGuard", "warmup_reports": 5, "schedule": COSINE}
PLATEAU = {"type": "ReduceLROnPlateau", "factor": 0.5, "patience": 0}
ONE_CYCLE = {"type": "OneCycleLR", "max_lr": 0.1, "total_steps": 10}
RANGE = {"type": "LRRangeTest", "min_lr": 1e-5, "max_lr": 10.0, "num_steps": 40, "then": COSINE}


def conforms(model: type[BaseModel], body: Any) -> None:
    """``body`` parses as ``model`` and says nothing the model does not (nested too)."""
    parsed = model.model_validate(body)
    assert parsed.model_dump(mode="json", exclude_unset=True) == body, model.__name__


MODELS = {name: model for name, model in vars(schemas).items()
          if isinstance(model, type) and issubclass(model, BaseModel)}


def documented_models(app) -> dict[tuple[str, str], dict[int, type[BaseModel]]]:
    """Per route of the OpenAPI document: the model of each JSON answer it documents."""
    found = {}
    for path, operations in app.openapi()["paths"].items():
        for method, operation in operations.items():
            models = {}
            for status, answer in operation["responses"].items():
                ref = answer.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref")
                if ref is not None:
                    models[int(status)] = MODELS[ref.rsplit("/", 1)[-1]]
            found[(method.upper(), path)] = models
    return found


class Checker:
    """Sends requests and checks each answer against its route's documented model."""

    def __init__(self, app, client: TestClient) -> None:
        self.client = client
        self.models = documented_models(app)
        self.seen: set[tuple[str, str, int]] = set()
        self.bodies: dict[str, list[tuple[str, Any]]] = {}

    def __call__(self, method: str, template: str, status: int, *, path: str | None = None,
                 headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
        response = self.client.request(method, path or template, headers=headers or ADMIN, **kwargs)
        assert response.status_code == status, response.text
        models = self.models[(method, template)]
        model = models.get(status)
        assert model is not None, f"{method} {template} answers {status}, which its document does not name"
        body = response.json()
        self.seen.add((method, template, status))
        self.bodies.setdefault(model.__name__, []).append((f"{method} {path or template} {status}", body))
        return body


def nan_post(client: TestClient, url: str, body: Any) -> None:
    """POST with Python's JSON, which writes NaN (httpx refuses to)."""
    headers = {**ADMIN, "content-type": "application/json"}
    response = client.post(url, content=json.dumps(body), headers=headers)
    assert response.status_code < 300, response.text


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("shapes")
    hooks = json.dumps([{"url": "http://127.0.0.1:9/hook", "secret": "s" * 32}])  # a port nobody serves
    tokens = ",".join(f"ops:{role}:{token}" if role == "admin" else f"{role}:{token}"
                      for role, token in TOKENS.items())
    settings = Settings(db=f"sqlite:///{tmp_path}/shapes.db", tokens=tokens, webhooks=hooks,
                        max_body_bytes=50_000)
    app = create_app(settings)
    with TestClient(app) as client:
        yield Checker(app, client)


@pytest.fixture(scope="module")
def answered(check) -> Checker:
    """Every route answered, in each of its shapes; the bodies kept by documented model."""
    scenario(check)
    return check


def scenario(check: Checker) -> None:
    runs, one, lr = "/v1/runs", "/v1/runs/{run_id}", "/v1/runs/{run_id}/lr"
    # runs: created (201), joined (200), read, listed
    created = check("POST", runs, 201, json={"run_id": "g", "schedule": GUARD, "base_lrs": [0.1],
                                             "labels": {"team": "a"}, "world_size": 1})
    assert created["status"] == "active"
    check("POST", runs, 200, json={"run_id": "g", "schedule": GUARD, "base_lrs": [0.1],
                                   "labels": {"team": "a"}})
    check("POST", runs, 201, json={"run_id": "p", "schedule": PLATEAU, "base_lrs": [0.1, 0.2],
                                   "base_momentums": [0.9, 0.9]})
    check("POST", runs, 201, json={"run_id": "rt", "schedule": RANGE, "base_lrs": [0.1]})
    check("GET", one, 200, path="/v1/runs/g")
    check("GET", runs, 200, params={"label": "team:a", "limit": 1})

    # windows: plain, then the same answer from the fast path (cached, final), with spikes
    plain = check("GET", lr, 200, path="/v1/runs/g/lr", params={"step": 0, "ahead": 3})
    assert check("GET", lr, 200, path="/v1/runs/g/lr", params={"step": 0, "ahead": 3}) == plain
    for k in range(1, 12):
        nan_post(check.client, "/v1/runs/g/metrics", {"records": [
            {"step": k, "name": "loss", "value": math.nan if k == 10 else 1.0 + 0.01 * k}]})
        check("POST", "/v1/runs/{run_id}/step", 200, path="/v1/runs/g/step", json={"step": k})
    spiked = check("GET", lr, 200, path="/v1/runs/g/lr", params={"step": 10, "ahead": 5})
    assert spiked["spikes"] and spiked["spikes"][0]["value"] == "NaN"
    check("POST", "/v1/runs/{run_id}/metrics", 202, path="/v1/runs/g/metrics",
          json={"records": [{"step": 12, "name": "acc", "value": 0.5}]})

    # a provisional tail, an action during the outage, and the divergence it caused
    tail = check("GET", lr, 200, path="/v1/runs/p/lr", params={"step": 0, "ahead": 1, "provisional": 5})
    control = check("POST", "/v1/runs/{run_id}/control", 200, path="/v1/runs/p/control",
                    json={"action": "scale", "factor": 0.5, "reason": "shapes"})
    assert control["event"]["kind"] == "control" and control["event"]["reason"] == "shapes"
    back = check("GET", lr, 200, path="/v1/runs/p/lr", params={
        "step": 4, "provisional_from": 2, "provisional_id": tail["provisional"]["id"], "provisional": 2})
    assert back["provisional_divergence"]["kind"] == "provisional_divergence"
    decided = check("POST", "/v1/runs/{run_id}/step", 200, path="/v1/runs/p/step",
                    json={"step": 5, "metrics": {"val_loss": math.pi}, "provisional": 3})
    assert decided["watched"] == ["val_loss"]
    check("POST", runs, 201, json={"run_id": "m", "schedule": ONE_CYCLE, "base_lrs": [0.1],
                                   "base_momentums": [0.9]})
    cycled = check("GET", lr, 200, path="/v1/runs/m/lr", params={"step": 0, "ahead": 2})
    assert cycled["momentums"] is not None and len(cycled["window"]["momentums"]) == 3

    # the range test, history (NaN metrics, every event kind so far), the spike guard
    for k in range(1, 45):
        check("POST", "/v1/runs/{run_id}/step", 200, path="/v1/runs/rt/step",
              json={"step": k, "metrics": {"loss": 2.0 - k / 100}})
    finder = check("GET", "/v1/runs/{run_id}/lr-finder", 200, path="/v1/runs/rt/lr-finder")
    assert finder["done"]
    history = check("GET", "/v1/runs/{run_id}/history", 200, path="/v1/runs/g/history")
    assert "NaN" in history["metrics"]["loss"]["values"]
    check("GET", "/v1/runs/{run_id}/history", 200, path="/v1/runs/p/history", params={"max_points": 2})
    guard = check("GET", "/v1/runs/{run_id}/spike-guard", 200, path="/v1/runs/g/spike-guard")
    assert guard["count"] == 1 and "NaN" in guard["band"]["0"]["values"]

    # fleet: a dry run, then a real one that some runs refuse (two LRs for their one group)
    dry = check("POST", "/v1/control", 200, json={"selector": {"status": ["active", "stopped"]},
                                                  "action": {"action": "hold"}, "dry_run": True})
    assert {r["run_id"] for r in dry["results"]} == {"g", "p", "m", "rt"}
    done = check("POST", "/v1/control", 200, json={"selector": {"status": ["active"]}, "reason": "shapes",
                                                   "action": {"action": "set_lr", "lrs": [0.1, 0.2]}})
    assert [r["run_id"] for r in done["results"] if "error" not in r] == ["p"]

    # schedules, operations, who asks
    preview = check("POST", "/v1/schedules/preview", 200, json={
        "schedule": GUARD, "base_lrs": [0.1], "steps": 12, "metrics": {"loss": [1.0] * 8 + [None, 50.0]}})
    assert preview["spikes"]
    check("POST", "/v1/schedules/preview", 200, json={
        "schedule": ONE_CYCLE, "base_lrs": [0.1],
        "base_momentums": [0.9], "steps": 10})
    check("GET", "/v1/schedules/catalog", 200)
    webhooks = check("GET", "/v1/webhooks", 200)
    assert len(webhooks["data"]) == 1
    check("GET", "/healthz", 200)
    check("GET", "/readyz", 200)
    assert check("GET", "/v1/whoami", 200) == {"name": "ops", "role": "admin"}
    read = {"Authorization": f"Bearer {TOKENS['read']}"}
    assert check("GET", "/v1/whoami", 200, headers=read) == {"name": "read", "role": "read"}

    # errors: each status a route documents, in the one error shape
    check("GET", "/v1/whoami", 401, headers={"Authorization": "Bearer nope"})
    check("DELETE", one, 403, path="/v1/runs/g", headers=read)
    check("GET", one, 404, path="/v1/runs/none")
    check("POST", runs, 409, json={"run_id": "g", "schedule": COSINE, "base_lrs": [0.1]})
    invalid = check("POST", runs, 422, json={"run_id": "x", "schedule": COSINE, "base_lrs": [-1], "extra": 1})
    assert invalid["errors"][0] == {"field": "base_lrs.0", "message": "expected a value >= 0, got -1"}
    check("POST", runs, 400, content=b"\xff", headers={**ADMIN, "content-type": "application/json"})
    check("POST", runs, 413, json={"schedule": COSINE, "base_lrs": [0.1] * 20_000})
    check("GET", lr, 422, path="/v1/runs/g/lr", params={"step": -1})
    check("GET", "/v1/events", 422, params={"kind": "unknown"})  # errors come before a stream starts



SHAPES = ["RunPublic", "RunsPublic", "StepResult", "MetricsAccepted", "ControlResult", "FleetControlResult",
          "HistoryPublic", "LRFinderPublic", "SpikeGuardPublic", "PreviewResult", "CatalogPublic",
          "WebhooksPublic", "HealthPublic", "WhoAmI", "Message"]


def test_every_documented_shape_is_checked_below(answered):
    documented = {model.__name__ for models in answered.models.values() for model in models.values()}
    assert documented == set(SHAPES)


def test_every_route_with_a_json_answer_was_asked(answered):
    asked = {(method, template) for method, template, _ in answered.seen}
    assert {route for route, models in answered.models.items() if models} - asked == set()


@pytest.mark.parametrize("shape", SHAPES)
def test_each_answer_is_its_documented_model(answered, shape):
    bodies = answered.bodies.get(shape)
    assert bodies, f"no answer of shape {shape} was seen"
    for request, body in bodies:
        try:
            conforms(getattr(schemas, shape), body)
        except (AssertionError, ValueError) as exc:
            raise AssertionError(f"{request}: {exc}") from exc
