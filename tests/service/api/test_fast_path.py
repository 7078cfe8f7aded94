"""The hot path answered before FastAPI gives exactly the route's answers."""

from __future__ import annotations

import asyncio
import sqlite3

import orjson
from fastapi.testclient import TestClient
from lrserve.service.api.fast_path import FastWindows, _parse_query
from lrserve.service.app import create_app
from lrserve.service.settings import Settings

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


def _fast_get(app, path: str, query: bytes) -> tuple[int, bytes, list[str]]:
    """One GET through ``FastWindows`` alone (on this thread's own event loop): its status and
    body, and which layer answered (``route`` when it passed the request on)."""
    answered: list[str] = []

    async def route(scope, receive, send):
        answered.append("route")
        await send({"type": "http.response.start", "status": 599, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    messages: list[dict] = []

    async def send(message):
        messages.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "GET", "path": path, "query_string": query, "headers": [], "app": app}
    asyncio.run(FastWindows(route)(scope, receive, send))
    if not answered:
        answered.append("fast")
    return messages[0]["status"], messages[1]["body"], answered


def test_a_new_step_is_committed_by_the_fast_path_with_the_routes_answer(settings):
    """``GET .../lr`` of a step not final yet: on SQLite the fast layer commits it on the event
    loop (durable before the answer) with the bytes the route gives a twin run; on PostgreSQL
    (every statement a round trip) it goes on to the route."""
    app = create_app(settings)
    schedule = {"type": "OneCycleLR", "max_lr": 0.5, "total_steps": 100}
    with TestClient(app) as client:
        for run_id in ("fast", "routed"):
            make_run(client, run_id, schedule, base_momentums=[0.9])
            client.get(f"/v1/runs/{run_id}/lr", params={"step": 0, "trace": "1"})
        store = app.state.manager.store
        sqlite = settings.db.startswith("sqlite")
        for step, ahead in ((1, 0), (2, 3), (9, 2)):
            query = f"step={step}&ahead={ahead}".encode()
            status, body, answered = _fast_get(app, "/v1/runs/fast/lr", query)
            assert answered == (["fast"] if sqlite else ["route"])
            if not sqlite:
                continue
            assert status == 200
            assert store.read_run("fast").horizon == step + ahead  # durable before the answer
            routed = client.get("/v1/runs/routed/lr", params={"step": step, "ahead": ahead, "trace": "1"})
            assert orjson.loads(body) == routed.json() | {"run_id": "fast"}
        if sqlite:
            fast, routed = (client.get(f"/v1/runs/{r}/history").json() for r in ("fast", "routed"))
            for history in (fast, routed):
                history.pop("run_id")
                for event in history["events"]:
                    event.pop("at")
            assert fast == routed


def test_the_fast_path_leaves_refused_commits_to_the_route(database_url):
    """SQLite (where it commits): a step too far ahead (the route's 422), a run not loaded in this
    process, and a write slot held by another connection (as another process holds it) go on
    to the route, changing nothing."""
    settings = Settings(db=database_url("sqlite"), max_jump=10)
    app = create_app(settings)
    with TestClient(app) as client:
        make_run(client, "x")
        client.get("/v1/runs/x/lr", params={"step": 0, "trace": "1"})
        store = app.state.manager.store
        assert _fast_get(app, "/v1/runs/x/lr", b"step=50")[2] == ["route"]
        assert client.get("/v1/runs/x/lr", params={"step": 50}).status_code == 422
        assert _fast_get(app, "/v1/runs/nope/lr", b"step=1")[2] == ["route"]
        path = settings.db.split("///", 1)[1]
        other = sqlite3.connect(path, timeout=0)
        try:
            other.execute("BEGIN IMMEDIATE")  # the file's write slot, held elsewhere
            assert _fast_get(app, "/v1/runs/x/lr", b"step=1")[2] == ["route"]
            assert store.read_run("x").horizon == 0
            state = app.state.manager.loaded("x")
            assert state is not None and state.horizon == state.engine.step == 0
        finally:
            other.rollback()
            other.close()
        assert _fast_get(app, "/v1/runs/x/lr", b"step=1")[2] == ["fast"]
        assert store.read_run("x").horizon == 1
