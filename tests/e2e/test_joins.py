"""``POST /v1/runs`` as a job's ranks send it, against real server processes: every rank
creates its run at once; one builds it, the others join it (``Creates``, ``CheckedSpecs``).

A join answers only for a run that is stored with the same spec now: a different spec is
the documented 409, a refused spec a 422, and a run that another process deleted is made
anew rather than joined (the spec a process kept checked changes none of that).
"""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.conftest import BACKENDS
from tests.live_server import ServerProcess

pytestmark = pytest.mark.slow

RANKS = 24
SPEC = {"run_id": "job", "base_lrs": [0.1], "world_size": RANKS,
        "schedule": {"type": "SequentialLR", "milestones": [50], "schedulers": [
            {"type": "LinearLR", "start_factor": 0.1, "total_iters": 50},
            {"type": "ReduceLROnPlateau", "factor": 0.5, "patience": 1}]}}


def _create(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/runs", json=body, timeout=60)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_job_s_ranks_create_their_run_together(backend, database_url, tmp_path):
    """Two worker processes on PostgreSQL (connections spread over both), one on SQLite."""
    server = ServerProcess(database_url(backend), tmp_path, workers=2 if backend == "postgres" else 1)
    with server:
        start = threading.Barrier(RANKS)
        answers: list[httpx.Response | None] = [None] * RANKS

        def rank(r: int) -> None:
            start.wait()
            answers[r] = _create(server.url, SPEC)

        threads = [threading.Thread(target=rank, args=(r,)) for r in range(RANKS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(a.status_code for a in answers if a is not None)
        assert codes == [200] * (RANKS - 1) + [201], [a.text for a in answers if a is not None][:3]
        bodies = [a.json() for a in answers if a is not None]
        assert {(b["run_id"], b["created_at"], b["world_size"]) for b in bodies} == {
            ("job", bodies[0]["created_at"], RANKS)}
        again = _create(server.url, SPEC)  # a rank that comes later
        assert again.status_code == 200 and again.json()["created_at"] == bodies[0]["created_at"]

        other = _create(server.url, {**SPEC, "base_lrs": [0.2]})
        assert other.status_code == 409 and other.json()["code"] == "run_conflict"
        refused = _create(server.url, {**SPEC, "schedule": {"type": "StepLR", "step_size": 0}})
        assert refused.status_code == 422 and "schedule" in refused.text
        assert _create(server.url, SPEC).status_code == 200  # neither changed the run


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_run_another_process_deleted_is_made_anew_not_joined(backend, database_url, tmp_path):
    """Process A created and keeps the run (and its spec, checked); B deletes it: A's next
    create of it makes a new run (201, a later ``created_at``, its log one ``created`` event),
    which B then joins."""
    db = database_url(backend)
    a = ServerProcess(db, tmp_path).start()
    b = ServerProcess(db, tmp_path).start()
    try:
        first = _create(a.url, SPEC)
        assert first.status_code == 201
        assert _create(a.url, SPEC).status_code == 200
        assert _create(b.url, SPEC).json()["created_at"] == first.json()["created_at"]
        assert httpx.delete(f"{b.url}/v1/runs/job", timeout=60).status_code == 204

        anew = _create(a.url, SPEC)
        assert anew.status_code == 201, anew.text
        assert anew.json()["created_at"] > first.json()["created_at"]
        joined = _create(b.url, SPEC)
        assert joined.status_code == 200 and joined.json()["created_at"] == anew.json()["created_at"]
        history = httpx.get(f"{a.url}/v1/runs/job/history", timeout=60).json()
        assert [e["kind"] for e in history["events"]] == ["created"]
        assert _create(a.url, {**SPEC, "base_lrs": [0.2]}).status_code == 409
    finally:
        a.stop()
        b.stop()
