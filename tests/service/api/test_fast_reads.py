"""``GET /v1/runs/{id}`` and ``GET .../history`` answered before FastAPI, and kept history answers:
the route's own answers, never one that a change of the run (in any process) made old."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import httpx
import pytest
from fastapi.testclient import TestClient
from lrserve.service.api import fast_reads
from lrserve.service.api.fast_reads import HistoryAnswers, _max_points
from lrserve.service.app import create_app
from lrserve.service.background import BACKGROUND_NICE, THREAD_NAME, Background
from lrserve.service.runs.read_models import SHOWN
from lrserve.service.store.base import HistoryMark

from tests.service.api.conftest import make_run

ROUTED = {"trace": "1"}  # a query the fast layer leaves to the route (FastAPI ignores the name)


def _built(app, monkeypatch) -> list[int]:
    """Counts the histories ``app`` builds (a kept answer given again builds none)."""
    manager = app.state.manager
    calls: list[int] = []
    real = manager.history

    def counted(run_id, max_points, mark=None):
        calls.append(max_points)
        return real(run_id, max_points, mark)

    monkeypatch.setattr(manager, "history", counted)
    return calls


def test_run_read_answers_equal_the_routes(api):
    make_run(api, "r", labels={"team": "a"})
    api.get("/v1/runs/r/lr", params={"step": 0, "ahead": 30})
    fast = api.get("/v1/runs/r")
    routed = api.get("/v1/runs/r", params=ROUTED)
    assert fast.status_code == routed.status_code == 200
    assert fast.json() == routed.json()
    assert fast.json()["horizon"] == 30 and fast.json()["labels"] == {"team": "a"}
    assert fast.headers["content-type"] == "application/json"
    assert 'route="/v1/runs/{run_id}",status="200"} 2.0' in api.get("/metrics").text
    assert api.get("/v1/runs/nope").status_code == 404


def test_history_is_kept_while_nothing_changes_and_rebuilt_after_each_change(api, monkeypatch):
    make_run(api, "h")
    api.get("/v1/runs/h/lr", params={"step": 0, "ahead": 40})
    built = _built(api.app, monkeypatch)
    first = api.get("/v1/runs/h/history", params={"max_points": 7})
    again = api.get("/v1/runs/h/history", params={"max_points": 7})
    routed = api.get("/v1/runs/h/history", params={"max_points": 7, **ROUTED})
    assert first.status_code == again.status_code == routed.status_code == 200
    assert first.content == again.content == routed.content
    assert built == [7]  # kept, and given by the fast layer and by the route alike
    assert api.get("/v1/runs/h/history").json()["lrs"]["steps"] == list(range(41))  # max_points=1000
    assert built == [7, 1000]

    # each change moves the mark: a new final step, an action (an event), a metric row
    api.get("/v1/runs/h/lr", params={"step": 41})
    assert api.get("/v1/runs/h/history", params={"max_points": 7}).json()["lrs"]["steps"][-1] == 41
    api.post("/v1/runs/h/control", json={"action": "scale", "factor": 0.5})
    shown = api.get("/v1/runs/h/history", params={"max_points": 7}).json()
    assert [e["kind"] for e in shown["events"]] == ["created", "control"]
    api.post("/v1/runs/h/metrics", json={"records": [{"step": 3, "name": "loss", "value": 0.25, "rank": 0}]})
    shown = api.get("/v1/runs/h/history", params={"max_points": 7}).json()
    assert shown["metrics"]["loss"]["values"] == [0.25]
    assert built == [7, 1000, 7, 7, 7]
    assert shown == api.get("/v1/runs/h/history", params={"max_points": 7, **ROUTED}).json()


def test_a_replica_change_is_seen_and_a_recreated_run_is_not_mistaken_for_the_old(settings):
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        make_run(a, "x")
        a.get("/v1/runs/x/lr", params={"step": 0, "ahead": 10})
        assert a.get("/v1/runs/x/history").json()["metrics"] == {}
        assert a.get("/v1/runs/x").json()["horizon"] == 10
        b.post("/v1/runs/x/metrics", json={"records": [{"step": 1, "name": "acc", "value": 0.5, "rank": 0}]})
        assert a.get("/v1/runs/x/history").json()["metrics"]["acc"]["values"] == [0.5]
        b.get("/v1/runs/x/lr", params={"step": 11, "ahead": 9})  # the other process goes further
        assert a.get("/v1/runs/x/history").json()["lrs"]["steps"][-1] == 20
        assert a.get("/v1/runs/x").json()["horizon"] == 20

        admin = create_app(settings)
        with TestClient(admin) as c:
            assert c.delete("/v1/runs/x").status_code == 204
        assert a.get("/v1/runs/x/history").status_code == 404
        assert a.get("/v1/runs/x").status_code == 404
        make_run(b, "x", base_lrs=(0.3,))
        shown = a.get("/v1/runs/x/history").json()
        assert shown["lrs"] == {"steps": [0], "values": [[0.3]]} and shown["metrics"] == {}


def test_fast_reads_leave_auth_and_bad_input_to_the_route(settings):
    app = create_app(settings.model_copy(update={"tokens": "read:r,admin:a"}))
    with TestClient(app) as client:
        admin, reader = {"Authorization": "Bearer a"}, {"Authorization": "Bearer r"}
        client.post("/v1/runs", json={"run_id": "x", "schedule": {"type": "StepLR", "step_size": 2},
                                      "base_lrs": [0.1]}, headers=admin)
        for path in ("/v1/runs/x", "/v1/runs/x/history"):
            assert client.get(path, headers=reader).status_code == 200
            assert client.get(path, headers=reader).status_code == 200  # kept / fast this time
            assert client.get(path).status_code == 401
            assert client.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401
        for bad in ("0", "100001", "abc", "1.5", ""):
            answer = client.get(f"/v1/runs/x/history?max_points={bad}", headers=reader)
            assert answer.status_code == 422, bad
            assert answer.json()["errors"][0]["field"] == "max_points"
        twice = client.get("/v1/runs/x/history?max_points=5&max_points=6", headers=reader)
        assert twice.status_code == 422
        # a run id ending in a newline is the route's 422 (a regex `$` here had matched it as "x")
        newline = client.get("/v1/runs/x%0A", headers=reader)
        assert newline.status_code == 422 and newline.json()["errors"][0]["field"] == "run_id", newline.text


def test_max_points_parsing_is_strict():
    assert _max_points(b"") == 1000
    assert _max_points(b"max_points=200") == 200
    for raw in (b"max_points=0", b"max_points=100001", b"max_points=-1", b"max_points=", b"max_points=%31",
                b"max_points=5&x=1", b"x=5", b"max_points=1234567"):
        assert _max_points(raw) is None, raw


def test_kept_answers_are_bounded_and_need_the_same_mark():
    from datetime import datetime, timezone

    mark = HistoryMark(datetime(2026, 1, 1, tzinfo=timezone.utc), 10, 3, 0)
    answers = HistoryAnswers(most_bytes=400, most=3)
    answers.put("a", 5, mark, b"x" * 100)
    assert answers.get("a", 5, mark) == b"x" * 100
    assert answers.get("a", 5, HistoryMark(mark.created_at, 11, 3, 0)) is None  # the run moved
    assert answers.get("a", 6, mark) is None
    answers.put("big", 5, mark, b"y" * 101)  # over a quarter of the bound: not kept
    assert answers.get("big", 5, mark) is None
    for i in range(4):
        answers.put(f"r{i}", 5, mark, b"z" * 100)
    assert len(answers) == 3 and answers.get("a", 5, mark) is None  # least recently used out


@pytest.mark.parametrize("groups", [1, 3])
def test_history_values_are_the_windows(api, groups):
    base_lrs = [0.1 * (i + 1) for i in range(groups)]
    make_run(api, "v", {"type": "CosineAnnealingLR", "T_max": 17}, base_lrs=base_lrs)
    window = api.get("/v1/runs/v/lr", params={"step": 0, "ahead": 60}).json()["window"]
    shown = api.get("/v1/runs/v/history", params={"max_points": 9}).json()["lrs"]
    assert shown["values"] == [window["lrs"][s] for s in shown["steps"]]



def test_a_history_of_many_groups_is_the_windows(api):
    base_lrs = [0.001 * (i + 1) for i in range(300)]
    make_run(api, "wide", {"type": "CosineAnnealingLR", "T_max": 90}, base_lrs=base_lrs)
    window = api.get("/v1/runs/wide/lr", params={"step": 0, "ahead": 400}).json()["window"]
    shown = api.get("/v1/runs/wide/history", params={"max_points": 200}).json()["lrs"]  # 200 x 300: in slices
    assert shown["values"] == [window["lrs"][s] for s in shown["steps"]]


def test_a_history_reads_each_event_once(settings, monkeypatch):
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        make_run(a, "e")
        a.get("/v1/runs/e/lr", params={"step": 0, "ahead": 5})
        store = a.app.state.manager.store
        asked: list[int] = []
        real = store.read_events_of

        def spied(run_id, kinds, **how):
            if tuple(kinds) == SHOWN:  # a history's (not a load's, nor a catch-up's)
                asked.append(how.get("after_seq", 0))
            return real(run_id, kinds, **how)

        monkeypatch.setattr(store, "read_events_of", spied)
        assert [e["kind"] for e in a.get("/v1/runs/e/history").json()["events"]] == ["created"]
        b.post("/v1/runs/e/control", json={"action": "scale", "factor": 0.5, "reason": "b"})  # another one
        a.post("/v1/runs/e/step", json={"step": 9, "metrics": {"loss": 1.0}})  # a metric event: not shown
        shown = a.get("/v1/runs/e/history").json()["events"]
        assert [(e["kind"], e.get("reason")) for e in shown] == [("created", None), ("control", "b")]
        assert asked == [0, 1]  # the second read began after the first mark's last_seq
        with TestClient(create_app(settings)) as c:
            c.delete("/v1/runs/e")
            make_run(c, "e", base_lrs=(0.2,))
        assert [e["kind"] for e in a.get("/v1/runs/e/history").json()["events"]] == ["created"]
        assert asked[-1] == 0  # created again: read from its start


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own nice value is Linux's")
def test_a_big_historys_json_is_written_in_a_background_thread_its_reads_are_not(api, monkeypatch):
    """A history of more than ``BACKGROUND_VALUES`` LRs is written (its JSON) in ``Background``'s
    threads, which the kernel runs after the event loop's (service/background.py); its reads, and
    any load or catch-up under the run's lock, stay at the server's priority; a small one is
    written where it is read. The answers are the same bytes."""
    groups = 50
    make_run(api, "big", base_lrs=[0.1] * groups)
    make_run(api, "small", base_lrs=[0.1])
    for run_id in ("big", "small"):
        api.get(f"/v1/runs/{run_id}/lr", params={"step": 0, "ahead": 99})
    manager = api.app.state.manager
    read, written = [], []
    real_history, real_json = manager.history, fast_reads.history_json

    def reading(run_id, max_points, mark=None):
        read.append((run_id, threading.current_thread().name, _nice()))
        return real_history(run_id, max_points, mark)

    def writing(history):
        written.append((history.run_id, threading.current_thread().name, _nice()))
        return real_json(history)

    monkeypatch.setattr(manager, "history", reading)
    monkeypatch.setattr(fast_reads, "history_json", writing)
    mine = _nice()
    big = api.get("/v1/runs/big/history", params={"max_points": 100, **ROUTED})
    small = api.get("/v1/runs/small/history", params={"max_points": 100, **ROUTED})
    assert big.status_code == small.status_code == 200
    rows = big.json()["lrs"]["values"]
    assert len(rows) * len(rows[0]) == 100 * groups > fast_reads.BACKGROUND_VALUES
    assert [(run, nice) for run, _, nice in read] == [("big", mine), ("small", mine)]
    assert not any(name.startswith(THREAD_NAME) for _, name, _ in read)
    (big_run, big_thread, big_nice), (small_run, small_thread, small_nice) = written
    assert big_run == "big" and big_thread.startswith(THREAD_NAME) and big_nice == max(mine, BACKGROUND_NICE)
    assert small_run == "small" and small_thread == read[1][1] and small_nice == mine
    monkeypatch.undo()
    kept = api.get("/v1/runs/big/history", params={"max_points": 100})
    assert kept.content == big.content  # kept: the same bytes


class _RecordingLock:
    """A lock that records the threads taking it."""

    def __init__(self, lock) -> None:
        self._lock, self.threads = lock, []

    def __enter__(self):
        self.threads.append(threading.current_thread().name)
        return self._lock.__enter__()

    def __exit__(self, *exc):
        return self._lock.__exit__(*exc)


def test_a_background_thread_never_takes_the_kept_answers_lock(api):
    """The event loop takes ``HistoryAnswers``' lock (the fast layer's ``get``): a background
    thread (at a lower priority) preempted while holding it would keep the loop waiting. So the
    background thread only writes the bytes; the answer is kept after, out of it."""
    make_run(api, "big", base_lrs=[0.1] * 50)
    api.get("/v1/runs/big/lr", params={"step": 0, "ahead": 99})
    answers = api.app.state.history_answers
    answers._kept._lock = recording = _RecordingLock(answers._kept._lock)  # (its ``Lru``'s)
    first = api.get("/v1/runs/big/history", params={"max_points": 100, **ROUTED})
    again = api.get("/v1/runs/big/history", params={"max_points": 100})
    assert first.status_code == again.status_code == 200 and again.content == first.content
    assert answers.get("big", 100, api.app.state.manager.history_mark("big")) == first.content  # kept
    assert recording.threads and not any(name.startswith(THREAD_NAME) for name in recording.threads)


def test_at_most_the_backgrounds_slots_hold_a_big_history_at_once(api, monkeypatch):
    """Big histories asked at once, their JSON slow to write (a busy machine, where the background
    threads run last): at most ``Background.slots`` are read and held at once; the rest wait on
    the loop holding nothing (before: each read at once, every ``History`` held until a
    background thread was free). Every answer is the route's."""
    make_run(api, "big", base_lrs=[0.1] * 50)
    api.get("/v1/runs/big/lr", params={"step": 0, "ahead": 99})
    app = api.app
    background = app.state.background = Background(workers=1)  # 2 slots
    manager = app.state.manager
    held, lock, release = [0, 0], threading.Lock(), threading.Event()
    real_history, real_json = manager.history, fast_reads.history_json

    def reading(run_id, max_points, mark=None):
        with lock:
            held[0] += 1
            held[1] = max(held[1], held[0])
        return real_history(run_id, max_points, mark)

    def writing(history):
        release.wait(30)
        try:
            return real_json(history)
        finally:
            with lock:
                held[0] -= 1

    monkeypatch.setattr(manager, "history", reading)
    monkeypatch.setattr(fast_reads, "history_json", writing)
    points, path = range(90, 96), "/v1/runs/big/history"  # 90 x 50 groups: over BACKGROUND_VALUES

    async def all_at_once() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as http:
            asked = [asyncio.ensure_future(http.get(path, params={"max_points": p, **ROUTED}))
                     for p in points]
            await asyncio.sleep(0.5)  # every request in: read, or waiting for a slot
            release.set()
            return list(await asyncio.gather(*asked))

    try:
        got = api.portal.call(all_at_once)
    finally:
        release.set()
        background.close()
    assert [a.status_code for a in got] == [200] * len(points)
    assert [len(a.json()["lrs"]["steps"]) for a in got] == list(points)
    assert held[1] == background.slots == 2


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own nice value is Linux's")
def test_background_nice_zero_writes_a_big_history_at_the_servers_priority(settings, monkeypatch):
    """``LRSERVE_BACKGROUND_NICE=0``: the background threads keep the server's priority."""
    monkeypatch.setenv("LRSERVE_BACKGROUND_NICE", "0")
    assert type(settings)().background_nice == 0
    assert type(settings).model_fields["background_nice"].default == BACKGROUND_NICE == 5
    app = create_app(settings.model_copy(update={"background_nice": 0}))
    written = []
    real_json = fast_reads.history_json

    def writing(history):
        written.append((threading.current_thread().name, _nice()))
        return real_json(history)

    with TestClient(app) as api:
        assert api.app.state.background.nice == 0
        make_run(api, "big", base_lrs=[0.1] * 50)
        api.get("/v1/runs/big/lr", params={"step": 0, "ahead": 99})
        monkeypatch.setattr(fast_reads, "history_json", writing)
        assert api.get("/v1/runs/big/history", params={"max_points": 100, **ROUTED}).status_code == 200
    [(thread, nice)] = written
    assert thread.startswith(THREAD_NAME) and nice == _nice()
