"""A server stopping: the commits in progress end before what they need closes; later ones
get a 503 (``server_stopping``), never a 500."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient
from lrserve.service.app import create_app
from lrserve.service.settings import Settings
from lrserve.service.store import open_store

from tests.service.api.conftest import make_run


@pytest.mark.parametrize(("committing", "query"), [
    ("window", {"step": 3, "trace": "1"}),  # the route's commit of its own
    ("windows_grouped", {"step": 3}),  # the fast path's group of windows asked together
])
def test_a_commit_in_progress_at_shutdown_ends_before_big_work_closes(database_url, committing, query):
    """PostgreSQL, a step still being committed in a commit thread as the server stops (alone,
    or in the fast path's group): the manager waits for it before ``big_work`` (which a big
    commit runs on) closes; its answer is given (a 200) and the step is durable.

    As uvicorn stops (the lifespan ends after the requests), the request must end before the
    test client stops: the client's portal stopping while ``ask`` still reads the answer's body
    (load can hold that thread that long) left ``ask`` with "This portal is not running" and its
    stream's close setting an event of the portal's loop from ``ask``'s thread, a wake-up the
    loop never saw: the client's exit waited for that loop forever (pytest-timeout). So shutdown
    waits here, once the manager closed, for ``ask`` to have its answer; ``hold`` has ``ask`` read
    the body only then (without that wait: once ``big_work`` closes, the race forced, and this
    test fails every time)."""
    url = database_url("postgres")
    app = create_app(Settings(db=url))
    entered, release = threading.Event(), threading.Event()
    read_answer = threading.Event()  # ask reads its answer's body (the race, forced: see hold)
    seen: dict[str, bool] = {}
    answers: list[tuple[int, int, bool]] = []
    windows: list = []  # what the slowed commit made final (the group's: not left to the route)
    with TestClient(app) as client:
        make_run(client, "x")
        client.get("/v1/runs/x/lr", params={"step": 0})
        manager, big_work = app.state.manager, app.state.big_work
        closed = {"big_work": False}
        commit, close_manager, close_big_work = getattr(manager, committing), manager.close, big_work.close

        def slow_commit(*args, **kwargs):
            entered.set()
            release.wait(timeout=60)
            seen["big_work_closed"] = closed["big_work"]  # while this commit runs
            result = commit(*args, **kwargs)
            windows.extend(result if isinstance(result, list) else [result])
            return result

        def closing_manager():
            release.set()  # the commit goes on once shutdown has begun
            close_manager()
            read_answer.set()
            asking.join(timeout=60)  # its answer read while the client's portal still runs

        def closing_big_work():
            closed["big_work"] = True
            read_answer.set()  # (without the wait above: the answer read as the server stops)
            close_big_work()

        setattr(manager, committing, slow_commit)
        manager.close, big_work.close = closing_manager, closing_big_work

        def hold(response) -> None:  # the answer's head came; its body is read after this
            read_answer.wait(timeout=60)

        client.event_hooks["response"] = [hold]  # for ask alone: the only request after this

        def ask() -> None:
            answer = client.get("/v1/runs/x/lr", params=query)
            answers.append((answer.status_code, answer.json()["step"], closed["big_work"]))

        asking = threading.Thread(target=ask)
        asking.start()
        assert entered.wait(timeout=60)
    asking.join()
    assert seen == {"big_work_closed": False}  # before: True (big_work closed first)
    assert answers == [(200, 3, False)]  # answered in full before big_work closed
    assert [w.start for w in windows] == [3]  # by the slowed commit itself
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
