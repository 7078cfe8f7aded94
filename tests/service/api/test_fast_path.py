"""The hot path answered before FastAPI gives exactly the route's answers."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient
from lrserve.service.api.fast_path import FastWindows, _parse_query
from lrserve.service.app import create_app

from tests.service.api.conftest import make_run

GUARD_S = 60  # only so that a broken wake-up fails instead of hanging; nothing is timed


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


def _held_first_request(app, client, run_id, ranks, first_fails=False):
    """``ranks`` concurrent requests for windows from step 1; the first one's commit (in the
    route) is held until all the others wait in the fast path. Returns the answers (the
    first one first) and the route's commits."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from lrserve.service.errors import StoreUnavailable

    manager = app.state.manager
    fast = next(m for m in _middlewares(app) if isinstance(m, FastWindows))
    released = threading.Event()
    routed = []
    real_window = manager.window

    def window(run_id, step, ahead):
        routed.append((run_id, step, ahead))
        if len(routed) == 1:
            assert released.wait(GUARD_S)
            if first_fails:
                raise StoreUnavailable("the database failed")
        return real_window(run_id, step, ahead)

    manager.window = window

    def ask(rank):
        return client.get(f"/v1/runs/{run_id}/lr", params={"step": 1, "ahead": 9 - rank % 2})

    try:
        with ThreadPoolExecutor(ranks) as pool:
            first = pool.submit(ask, 0)
            deadline = time.monotonic() + GUARD_S
            while run_id not in fast._misses and time.monotonic() < deadline:
                time.sleep(0.01)
            others = [pool.submit(ask, rank) for rank in range(1, ranks)]
            while fast._misses[run_id].waiting < ranks - 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            released.set()
            answers = [first.result(GUARD_S)] + [f.result(GUARD_S) for f in others]
    finally:
        manager.window = real_window
    assert fast._misses == {}
    return answers, routed


def test_ranks_asking_a_window_under_commit_are_answered_from_that_commit(settings):
    """The first request for a window not yet final goes to the route and commits it; the
    others asking for it meanwhile wait for that request and are answered from memory."""
    app = create_app(settings)
    with TestClient(app) as client:
        make_run(client, "w")
        answers, routed = _held_first_request(app, client, "w", ranks=6)
        assert routed == [("w", 1, 9)]  # one commit, through the route
        assert all(a.status_code == 200 for a in answers)
        lrs = answers[0].json()["window"]["lrs"]
        assert [len(a.json()["window"]["lrs"]) for a in answers] == [10, 9, 10, 9, 10, 9]
        assert all(a.json()["window"]["lrs"] == lrs[:len(a.json()["window"]["lrs"])] for a in answers)
        assert client.get("/metrics").text.count('route="/v1/runs/{run_id}/lr",status="200"} 6.0') == 1


def test_when_the_first_request_fails_the_others_go_to_the_route(settings):
    app = create_app(settings)
    with TestClient(app) as client:
        make_run(client, "v")
        answers, routed = _held_first_request(app, client, "v", ranks=4, first_fails=True)
        assert answers[0].status_code == 503
        assert [a.status_code for a in answers[1:]] == [200, 200, 200]
        assert len(routed) == 4  # each asked the route itself: nothing was final for them
        assert client.get("/v1/runs/v/lr", params={"step": 1, "ahead": 9}).json()["window"]["lrs"] == \
            answers[2].json()["window"]["lrs"]


def _middlewares(app):
    layer = app.middleware_stack
    while layer is not None:
        yield layer
        layer = getattr(layer, "app", None)
