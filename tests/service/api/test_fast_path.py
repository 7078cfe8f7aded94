"""The hot path and the hot writes answered before FastAPI give exactly the routes' answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
import time

import orjson
import pytest
from fastapi.testclient import TestClient
from lrserve.service.api.fast_path import FastPath, _parse_query
from lrserve.service.api.routes.runs import CONTROL, CREATE
from lrserve.service.api.routes.steps import METRICS, STEP
from lrserve.service.app import create_app
from lrserve.service.settings import Settings

from tests.conftest import BACKENDS
from tests.service.api.conftest import CallsAtOnce, make_run


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


async def _ask_fast(app, fast: FastPath, path: str, query: bytes) -> tuple[int, bytes, str]:
    """One GET through ``fast``: its status and body, and which layer answered (``route`` when
    it passed it on: ``_passed_on``, a 599)."""
    messages: list[dict] = []

    async def send(message):
        messages.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "GET", "path": path, "query_string": query, "headers": [], "app": app}
    await fast(scope, receive, send)
    return messages[0]["status"], messages[1]["body"], "route" if scope.get("routed") else "fast"


async def _passed_on(scope, receive, send):
    scope["routed"] = True
    await send({"type": "http.response.start", "status": 599, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def _fast_gets(app, requests: list[tuple[str, bytes]]) -> list[tuple[int, bytes, str]]:
    """GETs through one ``FastPath`` alone, all at once on this thread's own event loop: each
    one's status and body, and which layer answered (``route`` when it passed it on)."""

    async def all_at_once() -> list[tuple[int, bytes, str]]:
        fast = FastPath(_passed_on)
        return list(await asyncio.gather(*(_ask_fast(app, fast, path, query) for path, query in requests)))

    return asyncio.run(all_at_once())


def _fast_gets_in_two_waves(app, first, then, entered: threading.Event, release: threading.Event,
                            gathered: int) -> list[tuple[int, bytes, str]]:
    """``_fast_gets`` in two waves on one ``FastPath``: ``then`` once ``entered`` is set (the
    first wave's group under way, held), ``release`` set once ``gathered`` asks wait for the
    next group. Every answer, the first wave's first."""

    async def until(done) -> None:
        deadline = time.monotonic() + GUARD_S
        while not done():
            assert time.monotonic() < deadline, "never happened"
            await asyncio.sleep(0.005)

    async def waves() -> list[tuple[int, bytes, str]]:
        fast = FastPath(_passed_on)
        firsts = [asyncio.ensure_future(_ask_fast(app, fast, path, query)) for path, query in first]
        await until(entered.is_set)
        thens = [asyncio.ensure_future(_ask_fast(app, fast, path, query)) for path, query in then]
        await until(lambda: fast._commits is not None and len(fast._commits._asks) == gathered)
        release.set()
        return list(await asyncio.gather(*firsts, *thens))

    return asyncio.run(waves())


def _fast_get(app, path: str, query: bytes) -> tuple[int, bytes, list[str]]:
    """One GET through ``FastPath`` alone (``_fast_gets``)."""
    ((status, body, answered),) = _fast_gets(app, [(path, query)])
    return status, body, [answered]


def test_a_new_step_is_committed_by_the_fast_path_with_the_routes_answer(settings):
    """``GET .../lr`` of a step not final yet: the fast layer commits it (durable before the
    answer) with the bytes the route gives a twin run: on SQLite on the event loop, on
    PostgreSQL (every statement a round trip) in a worker thread, as the route would."""
    app = create_app(settings)
    schedule = {"type": "OneCycleLR", "max_lr": 0.5, "total_steps": 100}
    with TestClient(app) as client:
        for run_id in ("fast", "routed"):
            make_run(client, run_id, schedule, base_momentums=[0.9])
            client.get(f"/v1/runs/{run_id}/lr", params={"step": 0, "trace": "1"})
        store = app.state.manager.store
        for step, ahead in ((1, 0), (2, 3), (9, 2)):
            query = f"step={step}&ahead={ahead}".encode()
            status, body, answered = _fast_get(app, "/v1/runs/fast/lr", query)
            assert answered == ["fast"]  # before, on PostgreSQL: the route
            assert status == 200
            assert store.read_run("fast").horizon == step + ahead  # durable before the answer
            routed = client.get("/v1/runs/routed/lr", params={"step": step, "ahead": ahead, "trace": "1"})
            assert orjson.loads(body) == routed.json() | {"run_id": "fast"}
        fast, routed = (client.get(f"/v1/runs/{r}/history").json() for r in ("fast", "routed"))
        for history in (fast, routed):
            history.pop("run_id")
            for event in history["events"]:
                event.pop("at")
        assert fast == routed


def test_on_postgresql_commits_run_in_as_many_threads_as_the_store_has_connections(database_url, monkeypatch):
    """Forty windows asked at once on PostgreSQL, each too much work to share a transaction
    (past a snapshot: ``windows_grouped`` leaves them), so each commits in a thread of its own:
    at most ``store.connections`` commit at once (the pool's size), the rest queue for a thread
    rather than hold one while they wait for a connection (before: the loop's shared threads,
    up to 40, which then waited for the pool); each answer is its own run's step, durable."""
    app = create_app(Settings(db=database_url("postgres"), snapshot_every=2))
    runs = [f"r{i}" for i in range(40)]
    with TestClient(app) as client:
        for run_id in runs:
            make_run(client, run_id, {"type": "ExponentialLR", "gamma": 0.5})
            client.get(f"/v1/runs/{run_id}/lr", params={"step": 0, "trace": "1"})
        manager = app.state.manager
        limit = manager.store.connections
        assert 1 < limit < len(runs)
        at_once = CallsAtOnce(monkeypatch, manager, "window", limit)
        answers = _fast_gets(app, [(f"/v1/runs/{run_id}/lr", b"step=3") for run_id in runs])
        assert [(status, who) for status, _, who in answers] == [(200, "fast")] * len(runs)
        assert all(orjson.loads(body)["window"]["lrs"] == [[0.1 * 0.5**3]] for _, body, _ in answers)
        assert at_once.most == limit
        assert len(at_once.threads) == limit and all(t.startswith("lrserve-commit") for t in at_once.threads)
        assert {manager.store.read_run(run_id).horizon for run_id in runs} == {3}


def test_on_postgresql_the_commits_errors_are_the_routes(database_url):
    """PostgreSQL, where the fast layer commits in a worker thread: a step too far ahead, a run
    that does not exist and one not loaded in this process get the route's answers, status and
    body, from the fast layer (the app's exception handlers), changing nothing."""
    app = create_app(Settings(db=database_url("postgres"), max_jump=10))
    with TestClient(app) as client:
        make_run(client, "x")
        client.get("/v1/runs/x/lr", params={"step": 0, "trace": "1"})
        for path, query in (("/v1/runs/x/lr", "step=50"), ("/v1/runs/nope/lr", "step=1")):
            status, body, answered = _fast_get(app, path, query.encode())
            routed = client.get(path, params=dict(p.split("=") for p in query.split("&")) | {"trace": "1"})
            assert (status, answered) == (routed.status_code, ["fast"])
            assert orjson.loads(body) == routed.json()
        assert app.state.manager.store.read_run("x").horizon == 0
        app.state.manager.runs.evict(app.state.manager.loaded("x"))
        status, body, answered = _fast_get(app, "/v1/runs/x/lr", b"step=2")
        assert (status, answered) == (200, ["fast"])
        assert orjson.loads(body)["window"]["start"] == 2


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


# -- the hot writes: POST .../step, .../metrics, .../control ----------------------------------

PLATEAU = {"type": "ReduceLROnPlateau", "factor": 0.5, "patience": 1}
TOKENS = "read:r,write:w,admin:a"


def _routed_only(app):
    """``app`` without the fast path: every request through FastAPI's routing (the yardstick)."""
    app.user_middleware = [m for m in app.user_middleware if m.cls is not FastPath]
    return app


@contextlib.contextmanager
def _pair(settings, database_url, backend, **update):
    """Two clients on two fresh databases: the app as users get it, and the same app without
    the fast path; and how many requests the first one's fast path passed on to FastAPI."""
    fast_app = create_app(settings.model_copy(update=update))
    routed_app = _routed_only(create_app(settings.model_copy(update={**update, "db": database_url(backend)})))
    with TestClient(fast_app) as fast, TestClient(routed_app) as routed:
        layer = fast_app.middleware_stack
        while not isinstance(layer, FastPath):
            layer = layer.app
        passed_on = []
        inner = layer.app

        async def counting(scope, receive, send):
            passed_on.append(scope["path"])
            await inner(scope, receive, send)

        layer.app = counting
        yield fast, routed, passed_on


def _both(fast, routed, method, path, **kwargs):
    """The same request to both apps: (fast answer, routed answer)."""
    return fast.request(method, path, **kwargs), routed.request(method, path, **kwargs)


def _same(a, b, context):
    answers = [(r.status_code, r.json() if r.content else None) for r in (a, b)]
    assert answers[0] == answers[1], context
    assert a.headers.get("content-type") == b.headers.get("content-type"), context
    assert a.headers.get("retry-after") == b.headers.get("retry-after"), context


def test_fast_writes_equal_the_routes(settings, database_url, backend):
    with _pair(settings, database_url, backend) as (fast, routed, passed_on):
        for client in (fast, routed):
            make_run(client, "p", PLATEAU)
            make_run(client, "s", {"type": "StepLR", "step_size": 3, "gamma": 0.5}, base_lrs=(0.1, 0.2))
        passed_on.clear()
        job = {"run_id": "job", "schedule": PLATEAU, "base_lrs": [0.1, 0.2], "world_size": 4,
               "labels": {"team": "a"}}
        calls = [
            ("POST", "/v1/runs", {"json": job}),  # the first rank creates it (201)
            *[("POST", "/v1/runs", {"json": job}) for _ in range(3)],  # the others join (200)
            ("POST", "/v1/runs", {"json": {**job, "labels": {"team": "a"}, "base_momentums": None}}),
            ("POST", "/v1/runs", {"json": {"schedule": PLATEAU, "base_lrs": [0.1]}}),  # a new id (201)
            *[("POST", "/v1/runs/p/step", {"json": {"step": k, "metrics": {"val_loss": 1.0}}})
              for k in range(1, 6)],
            ("POST", "/v1/runs/p/step", {"json": {"step": 5, "metrics": {"val_loss": 9.0}}}),  # again: final
            ("POST", "/v1/runs/s/step", {"json": {"step": 2, "ahead": 7}}),
            ("POST", "/v1/runs/s/step", {"json": {"step": 12, "provisional": 3}}),
            ("POST", "/v1/runs/s/step", {"content": json.dumps({"step": 13}).encode(),
                                         "headers": {"content-type": "application/json; charset=utf-8"}}),
            ("POST", "/v1/runs/p/metrics", {"json": {"records": [{"step": 3, "name": "acc", "value": 0.5}]}}),
            ("POST", "/v1/runs/p/metrics", {"json": {"records": [{"step": 3, "name": "acc", "value": 0.5}]}}),
            ("POST", "/v1/runs/s/control", {"json": {"action": "scale", "factor": 0.5, "reason": "why"}}),
            ("POST", "/v1/runs/s/control", {"json": {"action": "hold"}}),
            ("POST", "/v1/runs/s/step", {"json": {"step": 20}}),  # held
        ]
        for method, path, kwargs in calls:
            a, b = _both(fast, routed, method, path, **kwargs)
            assert a.status_code < 300, a.text
            if path == "/v1/runs" and "run_id" not in kwargs["json"]:  # ids made by the server differ
                a, b = _without_times(a), _without_times(b)
                a._body.pop("run_id"), b._body.pop("run_id")
            else:
                a, b = _without_times(a), _without_times(b)
            _same(a, b, (path, kwargs))
        assert passed_on == []  # all answered by the fast path
        assert fast.get("/v1/runs/p").json()["last_seen"] is not None  # a rank's writes mark its run seen
        for path in ("/v1/runs/p", "/v1/runs/s", "/v1/runs/p/history", "/v1/runs/s/lr?step=0&ahead=25"):
            a, b = _both(fast, routed, "GET", path)
            _same(_without_times(a), _without_times(b), path)
        assert [r.status_code for r in (fast.get("/v1/runs/job"), routed.get("/v1/runs/job"))] == [200, 200]
        metrics = fast.get("/metrics").text
        assert 'method="POST",route="/v1/runs",status="201"} 4.0' in metrics  # with make_run's two
        assert 'method="POST",route="/v1/runs",status="200"} 4.0' in metrics
        assert 'method="POST",route="/v1/runs/{run_id}/step",status="200"} 10.0' in metrics
        assert 'method="POST",route="/v1/runs/{run_id}/metrics",status="202"} 2.0' in metrics
        assert 'method="POST",route="/v1/runs/{run_id}/control",status="200"} 2.0' in metrics


class _Times:
    """A response whose JSON body has its times left out (they differ between two apps)."""

    def __init__(self, response):
        self.status_code, self.headers = response.status_code, response.headers
        self.content = response.content
        self._body = _drop_times(response.json())

    def json(self):
        return self._body


def _without_times(response):
    return _Times(response)


def _drop_times(value):
    if isinstance(value, dict):
        return {k: _drop_times(v) for k, v in value.items()
                if k not in ("created_at", "updated_at", "last_seen", "at", "id")}
    if isinstance(value, list):
        return [_drop_times(v) for v in value]
    return value


BAD_WRITES = [
    # (path, request arguments): each is the route's to answer, with the route's 4xx
    ("/v1/runs/p/step", {"json": {"step": -1}}),
    ("/v1/runs/p/step", {"json": {"step": "3"}}),
    ("/v1/runs/p/step", {"json": {"step": 1.5}}),
    ("/v1/runs/p/step", {"json": {"step": 1, "metrics": {"val_loss": "low"}}}),
    ("/v1/runs/p/step", {"json": {"step": 1, "metrics": [1.0]}}),
    ("/v1/runs/p/step", {"json": {"step": 1, "metric": {"val_loss": 1.0}}}),
    ("/v1/runs/p/step", {"json": {"step": 1, "rank": -2}}),
    ("/v1/runs/p/step", {"json": {"step": 1, "ahead": -1}}),
    ("/v1/runs/p/step", {"json": {"step": 10**30}}),
    ("/v1/runs/p/step", {"json": {}}),
    ("/v1/runs/p/step", {"json": [1]}),
    ("/v1/runs/p/step", {"content": b"null", "headers": {"content-type": "application/json"}}),
    ("/v1/runs/p/step", {"content": b""}),
    ("/v1/runs/p/step", {"content": b"{\"step\": 1", "headers": {"content-type": "application/json"}}),
    ("/v1/runs/p/step", {"content": b"[" * 100_000, "headers": {"content-type": "application/json"}}),
    ("/v1/runs/p/step", {"content": b'{"step": ' + b"9" * 5000 + b"}",
                         "headers": {"content-type": "application/json"}}),
    ("/v1/runs/p/step", {"content": b"step=1", "headers": {"content-type": "text/plain"}}),
    ("/v1/runs/p/step", {"content": b'{"step": 1}',
                         "headers": {"content-type": "application/x-www-form-urlencoded"}}),
    ("/v1/runs/nope/step", {"json": {"step": 1}}),  # no such run: raised by the answer itself
    ("/v1/runs/p/step", {"json": {"step": 1, "rank": 5, "metrics": {"val_loss": 1.0}}}),
    ("/v1/runs/p/step", {"json": {"step": 10**9}}),  # past max_jump
    ("/v1/runs/bad$id/step", {"json": {"step": 1}}),
    ("/v1/runs/" + "x" * 200 + "/step", {"json": {"step": 1}}),
    ("/v1/runs/p/metrics", {"json": {"records": []}}),
    ("/v1/runs/p/metrics", {"json": {"records": [{"step": 1, "name": "a b", "value": 1.0}]}}),
    ("/v1/runs/p/metrics", {"json": {"records": [{"step": 1, "name": "acc", "value": "x"}]}}),
    ("/v1/runs/p/metrics", {"json": {"records": [{"step": 1, "name": "acc"}]}}),
    ("/v1/runs/p/metrics", {"json": {"records": [{"step": 1, "name": "acc", "value": 1.0, "extra": 1}]}}),
    ("/v1/runs/nope/metrics", {"json": {"records": [{"step": 1, "name": "acc", "value": 1.0}]}}),
    ("/v1/runs/p/control", {"json": {"action": "explode"}}),
    ("/v1/runs/p/control", {"json": {"action": "set_lr", "lr": 0.1, "lrs": [0.1]}}),
    ("/v1/runs/p/control", {"json": {"action": "scale"}}),
    ("/v1/runs/p/control", {"json": {"action": "scale", "factor": -1}}),
    ("/v1/runs/p/control", {"json": {"action": "scale", "factor": 1.0, "at_step": 0}}),  # the horizon
    ("/v1/runs/nope/control", {"json": {"action": "hold"}}),
    ("/v1/runs", {"json": {"run_id": "p", "schedule": PLATEAU, "base_lrs": [0.1]}}),  # 409: another spec
    ("/v1/runs", {"json": {"run_id": "p", "schedule": PLATEAU, "base_lrs": [0.1], "world_size": 3}}),
    ("/v1/runs", {"json": {"run_id": "q", "schedule": {"type": "Nope"}, "base_lrs": [0.1]}}),
    ("/v1/runs", {"json": {"run_id": "q", "schedule": PLATEAU, "base_lrs": []}}),
    ("/v1/runs", {"json": {"run_id": "q", "schedule": PLATEAU, "base_lrs": [0.1], "world_size": 0}}),
    ("/v1/runs", {"json": {"run_id": "bad id", "schedule": PLATEAU, "base_lrs": [0.1]}}),
    ("/v1/runs", {"json": {"run_id": "q", "schedule": PLATEAU}}),
    ("/v1/runs", {"json": {"run_id": "q", "schedule": PLATEAU, "base_lrs": [0.1], "extra": 1}}),
    ("/v1/runs", {"content": b"{", "headers": {"content-type": "application/json"}}),
    ("/v1/runs", {"content": b"run_id=q", "headers": {"content-type": "text/plain"}}),
]


def test_bad_writes_get_the_routes_answers(settings, database_url, backend):
    with _pair(settings, database_url, backend) as (fast, routed, _):
        for client in (fast, routed):
            make_run(client, "p", PLATEAU, world_size=2)
            assert client.post("/v1/runs/p/step", json={"step": 0}).status_code == 200
        for path, kwargs in BAD_WRITES:
            a, b = _both(fast, routed, "POST", path, **kwargs)
            assert 400 <= a.status_code < 500, (path, kwargs, a.status_code, a.text)
            _same(a, b, (path, kwargs))
        a, b = _both(fast, routed, "GET", "/v1/runs/p")
        _same(_without_times(a), _without_times(b), "the run after the bad writes")
        assert a.json()["horizon"] == 0
        assert [r.status_code for r in (fast.get("/v1/runs/q"), routed.get("/v1/runs/q"))] == [404, 404]


BAD_READS = [
    # queries the fast layers leave to the routes, each a 422 naming the field: integers are
    # decimal digits (API.md), not what int() or pydantic's lax parsing also take
    *[f"/v1/runs/p/lr?step={v}"
      for v in ("1_0", "-0", "%2B5", "%205", "5%20", "%D9%A5", "0x10", "5.0", "1e3")],
    *[f"/v1/runs/p/lr?step=1&ahead={v}" for v in ("", "1_0", "%2B5", "%205", "5.0")],
    *[f"/v1/runs/p/history?max_points={v}" for v in ("", "1_0", "%2B5", "%205", "5.0", "0")],
    "/v1/runs/p/lr?step=" + "9" * 5000,
]


def test_bad_reads_get_the_routes_answers(settings, database_url, backend):
    with _pair(settings, database_url, backend) as (fast, routed, passed_on):
        for client in (fast, routed):
            make_run(client, "p", PLATEAU)
            assert client.get("/v1/runs/p/lr?step=0&ahead=5").status_code == 200
            assert client.get("/v1/runs/p/history").status_code == 200
        for path in BAD_READS:
            field = path.split("?")[1].rsplit("&", 1)[-1].split("=")[0]
            a, b = _both(fast, routed, "GET", path)
            assert a.status_code == 422, (path, a.text)
            assert [e["field"] for e in a.json()["errors"]] == [field], (path, a.text)
            _same(a, b, path)
        a, b = _both(fast, routed, "GET", "/v1/runs/p")
        _same(_without_times(a), _without_times(b), "the run after the bad reads")
        assert a.json()["horizon"] == 5


def test_fast_writes_check_the_routes_roles(settings, database_url, backend):
    with _pair(settings, database_url, backend, tokens=TOKENS) as (fast, routed, passed_on):
        for client in (fast, routed):
            created = client.post("/v1/runs", json={"run_id": "p", "schedule": PLATEAU, "base_lrs": [0.1]},
                                  headers={"Authorization": "Bearer a"})
            assert created.status_code == 201, created.text
        cases = [
            ("/v1/runs/p/step", {"step": 1}, None, 401),
            ("/v1/runs/p/step", {"step": 1}, "Bearer nope", 401),
            ("/v1/runs/p/step", {"step": 1}, "r", 401),
            ("/v1/runs/p/step", {"step": 1}, "Bearer r", 403),
            ("/v1/runs/p/step", {"step": 1}, "Bearer w", 200),
            ("/v1/runs/p/metrics", {"records": [{"step": 1, "name": "a", "value": 1.0}]}, "Bearer r", 403),
            ("/v1/runs/p/metrics", {"records": [{"step": 1, "name": "a", "value": 1.0}]}, "Bearer w", 202),
            ("/v1/runs/p/control", {"action": "hold"}, "Bearer w", 403),
            ("/v1/runs/p/control", {"action": "hold", "reason": "who"}, "Bearer a", 200),
            ("/v1/runs", {"run_id": "p", "schedule": PLATEAU, "base_lrs": [0.1]}, None, 401),
            ("/v1/runs", {"run_id": "p", "schedule": PLATEAU, "base_lrs": [0.1]}, "Bearer r", 403),
            ("/v1/runs", {"run_id": "p", "schedule": PLATEAU, "base_lrs": [0.1]}, "Bearer w", 200),
        ]
        for path, body, authorization, status in cases:
            headers = {} if authorization is None else {"Authorization": authorization}
            passed_on.clear()
            a, b = _both(fast, routed, "POST", path, json=body, headers=headers)
            assert a.status_code == status, (path, authorization, a.text)
            _same(*map(_without_times, (a, b)) if a.status_code < 300 else (a, b), (path, authorization))
            assert passed_on == ([] if status < 300 else [path])


def test_fast_writes_read_a_body_in_parts_and_keep_the_size_limit(settings):
    """A body that comes in several messages is read whole; one that grows past the limit
    without declaring its length is refused with the limit's 413 (nothing stored)."""
    app = create_app(settings.model_copy(update={"max_body_bytes": 1000}))
    with TestClient(app) as client:
        make_run(client, "p", PLATEAU)

        def post(chunks, complete=True):
            messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1 or not complete}
                        for i, c in enumerate(chunks)]
            sent = []

            async def receive():
                return messages.pop(0) if messages else {"type": "http.disconnect"}

            async def send(message):
                sent.append(message)

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": "/v1/runs/p/step", "raw_path": b"/v1/runs/p/step",
                     "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
                     "server": ("127.0.0.1", 2), "headers": [(b"content-type", b"application/json")]}
            client.portal.call(app, scope, receive, send)
            return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))

        status, body = post([b'{"step": 1, "metr', b'ics": {"val_loss": 0.5}}'])
        assert status == 200 and body["step"] == 1
        status, body = post([b'{"step": 2, "metrics": {"val_loss": 0.5}, "x": "', b"y" * 600, b"y" * 600,
                             b'"}'])
        assert status == 413 and body["code"] == "limit_exceeded"
        post([b'{"step": 2, "metrics": {"val_loss": 0.5}}'], complete=False)  # then the client went away
        assert client.get("/v1/runs/p").json()["horizon"] == 1


@pytest.mark.parametrize("write", [STEP, METRICS, CONTROL], ids=lambda write: write.route)
def test_fast_write_routes_are_documented_as_before(write):
    """The routes the fast path answers stay FastAPI's in the OpenAPI document (one definition),
    at the path their ``FastWrite`` names (spelled in both places: a change to one alone fails here)."""
    app = create_app(Settings(db="sqlite:///never-opened.db"))
    operation = app.openapi()["paths"][write.route]["post"]
    assert operation["requestBody"]["required"] is True
    assert [p["name"] for p in operation["parameters"]] == ["run_id", "authorization"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_new_steps_asked_in_one_turn_of_the_loop_share_one_transaction(database_url, monkeypatch, backend):
    """Requests that arrive together (one turn of the event loop) share one transaction (SQLite:
    on the event loop; PostgreSQL: in one commit thread); each answer is its run's window,
    durable; a request the group cannot take goes on to the route."""
    app = create_app(Settings(db=database_url(backend)))
    with TestClient(app) as client:
        for run_id in ("a", "b", "c"):
            make_run(client, run_id, {"type": "ExponentialLR", "gamma": 0.5})
            client.get(f"/v1/runs/{run_id}/lr", params={"step": 0, "trace": "1"})
        store = app.state.manager.store
        opened: list[list[str]] = []
        lock_runs = store.lock_runs

        def opening(ids, **how):
            opened.append(sorted(ids))
            return lock_runs(ids, **how)

        monkeypatch.setattr(store, "lock_runs", opening)
        answers = _fast_gets(app, [("/v1/runs/a/lr", b"step=1"), ("/v1/runs/b/lr", b"step=2&ahead=1"),
                                   ("/v1/runs/c/lr", b"step=0"), ("/v1/runs/a/lr", b"step=1"),
                                   ("/v1/runs/zz/lr", b"step=1")])
        assert opened == [["a", "b"]]
        # zz, no such run: SQLite's route answers; PostgreSQL's fast path gives the route's answer
        assert [who for _, _, who in answers] == ["fast"] * 4 + ["route" if backend == "sqlite" else "fast"]
        assert [status for status, _, _ in answers[:4]] == [200] * 4
        if backend == "postgres":
            assert answers[4][0] == 404
        windows = [orjson.loads(body)["window"] for _, body, _ in answers[:4]]
        assert [w["lrs"] for w in windows] == [[[0.05]], [[0.025], [0.0125]], [[0.1]], [[0.05]]]
        assert [store.read_run(r).horizon for r in ("a", "b", "c")] == [1, 3, 0]


def test_the_create_route_is_documented_as_before():
    app = create_app(Settings(db="sqlite:///never-opened.db"))
    operation = app.openapi()["paths"][CREATE.route]["post"]
    assert operation["requestBody"]["required"] is True
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/RunCreate"}
    assert [p["name"] for p in operation["parameters"]] == ["authorization"]
    assert set(operation["responses"]) >= {"200", "201", "401", "403", "409", "422"}


GUARD_S = 60  # only so that a broken wake-up fails instead of hanging; nothing is timed


def _held_first_request(app, client, run_id, ranks, first_fails=False):
    """``ranks`` concurrent requests for windows from step 1; the first one's commit (in the
    route) is held until all the others wait in the fast path. Returns the answers (the
    first one first) and the route's commits."""
    from concurrent.futures import ThreadPoolExecutor

    from lrserve.service.errors import StoreUnavailable

    manager = app.state.manager
    fast = next(m for m in _middlewares(app) if isinstance(m, FastPath))
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
    # as when the write slot is taken: the route's thread (the fast path's and the route's own try)
    manager.windows_now = lambda asks, **kwargs: [None] * len(asks)
    manager.windows_grouped = manager.windows_now  # PostgreSQL's group: as when another thread holds the run
    manager.window_now = lambda *args, **kwargs: None

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
        del manager.window_now, manager.windows_now, manager.windows_grouped
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


def test_on_postgresql_windows_asked_while_a_group_commits_wait_for_it(database_url, monkeypatch):
    """PostgreSQL, a group committing in its commit thread (held here): another request for a
    window it commits waits for it and is answered from it (no commit of its own), and the
    windows of other runs asked meanwhile gather into the next group, one transaction."""
    app = create_app(Settings(db=database_url("postgres")))
    with TestClient(app) as client:
        for run_id in ("a", "b", "c"):
            make_run(client, run_id, {"type": "ExponentialLR", "gamma": 0.5})
            client.get(f"/v1/runs/{run_id}/lr", params={"step": 0, "trace": "1"})
        manager = app.state.manager
        entered, release = threading.Event(), threading.Event()
        groups: list[list[str]] = []
        grouped = manager.windows_grouped

        def held(asks, **how):
            groups.append([run_id for run_id, _, _ in asks])
            if len(groups) == 1:
                entered.set()
                assert release.wait(GUARD_S)
            return grouped(asks, **how)

        monkeypatch.setattr(manager, "windows_grouped", held)
        answers = _fast_gets_in_two_waves(
            app, [("/v1/runs/a/lr", b"step=1")],
            [("/v1/runs/a/lr", b"step=1"), ("/v1/runs/b/lr", b"step=1"), ("/v1/runs/c/lr", b"step=2")],
            entered, release, gathered=2)
        assert groups == [["a"], ["b", "c"]]
        assert [(status, who) for status, _, who in answers] == [(200, "fast")] * 4
        assert answers[0][1] == answers[1][1]
        lrs = [orjson.loads(body)["window"]["lrs"] for _, body, _ in answers]
        assert lrs == [[[0.05]], [[0.05]], [[0.05]], [[0.025]]]
        assert [manager.store.read_run(r).horizon for r in ("a", "b", "c")] == [1, 1, 2]
