"""``GET /v1/events`` against real servers: resume after kill -9, across replicas, filters.

Truth is the database itself, read directly (``read_feed``): a consumer must end up with
exactly the events stored there, each once, in increasing id order.
"""

from __future__ import annotations

import os
import threading

import httpx
import pytest
from lrserve.service.store import open_store

from tests.live_server import ServerProcess
from tests.sse import read_stream

pytestmark = pytest.mark.slow

SCHEDULE = {"type": "StepLR", "step_size": 3, "gamma": 0.5}


def create(http: httpx.Client, run_id: str, **labels: str) -> None:
    http.post("/v1/runs", json={"run_id": run_id, "schedule": SCHEDULE, "base_lrs": [0.1],
                                "labels": labels}).raise_for_status()


def act(http: httpx.Client, run_id: str, factor: float) -> None:
    http.post(f"/v1/runs/{run_id}/control", json={"action": "scale", "factor": factor}).raise_for_status()


def stored_ids(db_url: str) -> list[tuple[int, str, int]]:
    store = open_store(db_url)
    try:
        return [(f.event.gid, f.run_id, f.event.seq) for f in store.read_feed(0, limit=100_000)]
    finally:
        store.close()


def received(messages) -> list[tuple[int, str, int]]:
    out = []
    for m in messages:
        body = m.json()
        assert m.id == str(body["id"])
        out.append((body["id"], body["run_id"], body["seq"]))
    return out


def test_a_consumer_resumes_after_kill_9_with_every_event_exactly_once(tmp_path):
    db = f"sqlite:///{tmp_path}/events.db"
    server = ServerProcess(db, tmp_path).start()
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            for name in ("a", "b", "c"):
                create(http, name, sweep="7")

            def write_while_streaming():
                with httpx.Client(base_url=server.url, timeout=10) as writer:
                    for i in range(12):
                        act(writer, "abc"[i % 3], 0.9)

            writer = threading.Thread(target=write_while_streaming)
            writer.start()
            first = read_stream(f"{server.url}/v1/events", lambda ms: len(ms) >= 10, params={"since": 0})
            writer.join()
            first_ids = received(first)
            # disconnected: these happen while no one listens, then the server dies without warning
            for i in range(4):
                act(http, "abc"[i], 0.8) if i < 3 else create(http, "d", sweep="8")
        server.kill()
        server = ServerProcess(db, tmp_path, port=server.port).start()
        with httpx.Client(base_url=server.url, timeout=10) as http:
            for name in "abcd":
                act(http, name, 0.7)
        truth = stored_ids(db)
        rest = read_stream(f"{server.url}/v1/events", lambda ms: len(first) + len(ms) >= len(truth),
                           headers={"Last-Event-ID": first[-1].id})
        got = first_ids + received(rest)
        assert got == truth
        assert [g for g, _, _ in got] == sorted({g for g, _, _ in got})
        assert len(truth) == 3 + 12 + 3 + 1 + 4
    finally:
        server.stop()


def test_filters_and_bad_parameters(tmp_path):
    db = f"sqlite:///{tmp_path}/filters.db"
    with ServerProcess(db, tmp_path) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        create(http, "a", sweep="7")
        create(http, "b", sweep="8")
        act(http, "a", 0.5)
        act(http, "b", 0.5)
        act(http, "a", 0.5)

        def everything(**params):
            # a marker event ends each read: run "z", created last
            return read_stream(f"{server.url}/v1/events", lambda ms: any(
                m.json()["run_id"] == "z" for m in ms), params={"since": 0, **params})

        create(http, "z", sweep="7")
        by_label = [(m.json()["run_id"], m.json()["kind"]) for m in everything(label="sweep:7")]
        assert by_label == [("a", "created"), ("a", "control"), ("a", "control"), ("z", "created")]
        by_kind = [m.json()["run_id"] for m in everything(kind=["created"])]
        assert by_kind == ["a", "b", "z"]
        both = [m.json()["run_id"] for m in everything(kind=["created"], label=["sweep:7"])]
        assert both == ["a", "z"]
        only_b = read_stream(f"{server.url}/v1/events", lambda ms: len(ms) == 2,
                             params={"since": 0, "run_id": "b"})
        assert [m.json()["kind"] for m in only_b] == ["created", "control"]
        first = only_b[0].json()
        assert set(first) >= {"id", "run_id", "seq", "kind", "step", "at", "spec"}

        bad = [({"kind": "nope"}, {}, "kind"), ({"label": "nocolon"}, {}, "label"),
               ({"since": -1}, {}, "since"), ({}, {"Last-Event-ID": "x1"}, "Last-Event-ID")]
        for params, headers, field in bad:
            response = http.get("/v1/events", params=params, headers=headers)
            assert response.status_code == 422, response.text
            assert field in response.text
            assert "Traceback" not in response.text


def test_a_stream_on_one_replica_sees_events_written_on_another_and_resumes_there(tmp_path, database_url):
    db = database_url("postgres")
    one = ServerProcess(db, tmp_path).start()
    two = ServerProcess(db, tmp_path).start()
    try:
        with httpx.Client(base_url=one.url, timeout=10) as http:
            create(http, "r", sweep="1")

        def write_on_two():
            with httpx.Client(base_url=two.url, timeout=10) as http:
                for _ in range(5):
                    act(http, "r", 0.9)

        writer = threading.Thread(target=write_on_two)
        writer.start()
        seen = read_stream(f"{one.url}/v1/events", lambda ms: len(ms) >= 4, params={"since": 0})
        writer.join()
        with httpx.Client(base_url=one.url, timeout=10) as http:
            act(http, "r", 0.5)
        truth = stored_ids(db)
        rest = read_stream(f"{two.url}/v1/events", lambda ms: len(seen) + len(ms) >= len(truth),
                           headers={"Last-Event-ID": seen[-1].id})
        assert received(seen) + received(rest) == truth
        assert len(truth) == 7
    finally:
        one.stop()
        two.stop()


def test_the_stream_needs_a_read_token(tmp_path):
    env = {"LRSERVE_TOKENS": "ops:read:r-token,admin:a-token"}
    with ServerProcess(f"sqlite:///{tmp_path}/auth.db", tmp_path, env=env) as server:
        assert httpx.get(f"{server.url}/v1/events", timeout=10).status_code == 401
        with httpx.Client(base_url=server.url, timeout=10,
                          headers={"Authorization": "Bearer a-token"}) as http:
            create(http, "a")
        got = read_stream(f"{server.url}/v1/events", lambda ms: len(ms) == 1, params={"since": 0},
                          headers={"Authorization": "Bearer r-token"})
        assert got[0].json()["run_id"] == "a"


def test_sigterm_ends_a_server_with_open_streams_by_itself(tmp_path):
    """Streams never end on their own; serve gives them a grace period on SIGTERM, then closes
    them and exits (no SIGKILL needed)."""
    import signal
    import subprocess

    server = ServerProcess(f"sqlite:///{tmp_path}/term.db", tmp_path).start()
    client = httpx.Client(timeout=httpx.Timeout(10.0, read=60.0))
    try:
        with client.stream("GET", f"{server.url}/v1/events") as response:
            assert response.status_code == 200
            os.killpg(server.proc.pid, signal.SIGTERM)
            try:
                server.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pytest.fail("the server did not exit within 30 s of SIGTERM with a stream open")
        assert server.proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    finally:
        client.close()
        server.kill()
