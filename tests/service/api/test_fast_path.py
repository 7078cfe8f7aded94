"""The hot path answered before FastAPI gives exactly the route's answers."""

from __future__ import annotations

from fastapi.testclient import TestClient
from lrserve.service.api.fast_path import _parse_query
from lrserve.service.app import create_app

from tests.service.api.conftest import make_run


def test_fast_answers_equal_the_routes(api):
    make_run(api, "f", {"type": "OneCycleLR", "max_lr": 0.5, "total_steps": 100}, base_momentums=[0.9])
    committed = api.get("/v1/runs/f/lr", params={"step": 0, "ahead": 50}).json()  # through the route
    fast = api.get("/v1/runs/f/lr", params={"step": 3, "ahead": 20})
    routed = api.get("/v1/runs/f/lr", params={"step": 3, "ahead": 20, "trace": "1"})  # not for the fast path
    assert fast.status_code == routed.status_code == 200
    assert fast.json() == routed.json()
    assert fast.json()["window"]["lrs"] == committed["window"]["lrs"][3:24]
    assert fast.headers["content-type"] == "application/json"
    metrics = api.get("/metrics").text
    assert 'route="/v1/runs/{run_id}/lr",status="200"} 3.0' in metrics


def test_fast_path_leaves_errors_and_auth_to_the_route(settings):
    app = create_app(settings.model_copy(update={"tokens": "read:r,admin:a"}))
    with TestClient(app) as client:
        client.post("/v1/runs", json={"run_id": "x", "schedule": {"type": "StepLR", "step_size": 2},
                                      "base_lrs": [0.1]}, headers={"Authorization": "Bearer a"})
        assert client.get("/v1/runs/x/lr", params={"step": 0}).status_code == 401
        assert client.get("/v1/runs/x/lr", params={"step": 0},
                          headers={"Authorization": "Bearer r"}).status_code == 200
        assert client.get("/v1/runs/x/lr", params={"step": -1},
                          headers={"Authorization": "Bearer r"}).status_code == 422


def test_query_parsing_is_strict():
    assert _parse_query(b"step=5&ahead=10") == (5, 10)
    assert _parse_query(b"step=5") == (5, 0)
    for raw in (b"", b"ahead=3", b"step=-1", b"step=1.5", b"step=1&step=2", b"step=1&x=2", b"step=%C2%B9",
                b"step=" + str(2**53 + 1).encode()):
        assert _parse_query(raw) is None, raw
