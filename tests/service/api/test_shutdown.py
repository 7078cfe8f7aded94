"""A server stopping: the commits in progress end before what they need closes; later ones
get a 503 (``server_stopping``), never a 500."""

from __future__ import annotations

import contextlib
import threading

from fastapi.testclient import TestClient
from lrserve.service.app import create_app
from lrserve.service.settings import Settings
from lrserve.service.store import open_store

from tests.service.api.conftest import make_run


def test_a_commit_in_progress_at_shutdown_ends_before_big_work_closes(database_url):
    """PostgreSQL, a step still being committed in a commit thread as the server stops (its
    request gone: uvicorn ends the lifespan after the requests, the thread goes on): the manager
    waits for it before ``big_work`` (which a big commit runs on) closes; the step is durable."""
    url = database_url("postgres")
    app = create_app(Settings(db=url))
    entered, release = threading.Event(), threading.Event()
    seen: dict[str, bool] = {}
    with TestClient(app) as client:
        make_run(client, "x")
        client.get("/v1/runs/x/lr", params={"step": 0})
        manager, big_work = app.state.manager, app.state.big_work
        closed = {"big_work": False}
        window, close_manager, close_big_work = manager.window, manager.close, big_work.close

        def slow_window(*args, **kwargs):
            entered.set()
            release.wait(timeout=60)
            seen["big_work_closed"] = closed["big_work"]  # while this commit runs
            return window(*args, **kwargs)

        def closing_manager():
            release.set()  # the commit goes on once shutdown has begun
            close_manager()

        def closing_big_work():
            closed["big_work"] = True
            close_big_work()

        manager.window, manager.close, big_work.close = slow_window, closing_manager, closing_big_work

        def ask() -> None:
            with contextlib.suppress(BaseException):  # answered, or cut off as the test client stops
                client.get("/v1/runs/x/lr", params={"step": 3})

        asking = threading.Thread(target=ask)
        asking.start()
        assert entered.wait(timeout=60)
    asking.join()
    assert seen == {"big_work_closed": False}  # before: True (big_work closed first)
    assert closed["big_work"]
    store = open_store(url)
    try:
        assert store.read_run("x").horizon == 3
    finally:
        store.close()


def test_commits_after_shutdown_are_a_503_not_a_500(database_url):
    """PostgreSQL: requests still arriving once the manager closed (its commit threads stopped)
    get ``server_stopping``'s 503 (before: the executor's RuntimeError, a 500)."""
    url = database_url("postgres")
    app = create_app(Settings(db=url))
    with TestClient(app) as client:
        make_run(client, "x")
        client.get("/v1/runs/x/lr", params={"step": 0})
    late = TestClient(app, raise_server_exceptions=False)  # the app as it stops: no lifespan
    loss = {"records": [{"step": 1, "name": "loss", "value": 1.0}]}
    for answer in (late.get("/v1/runs/x/lr", params={"step": 2}),
                   late.get("/v1/runs/x/lr", params={"step": 2, "trace": "1"}),  # through the route
                   late.post("/v1/runs/x/metrics", json=loss),
                   late.post("/v1/runs/x/control", json={"action": "scale", "factor": 0.5})):
        assert (answer.status_code, answer.json()["code"]) == (503, "server_stopping"), answer.text
    store = open_store(url)
    try:
        assert store.read_run("x").horizon == 0
    finally:
        store.close()
