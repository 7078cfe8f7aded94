"""On PostgreSQL, every API commit runs in the manager's commit threads (``RunManager.
in_commit_thread``), as many as the store has connections: the rest queue for a thread rather
than hold one of the event loop's shared threads (up to 40) while they wait for a connection."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi.testclient import TestClient
from lrserve.service.app import create_app
from lrserve.service.settings import Settings

from tests.service.api.conftest import CallsAtOnce, make_run
from tests.specs import plateau_on_any_rise

RUNS = 40  # as many as the loop's shared threads: before, all of them at once


def _requests(kind: str, run_id: str) -> list[tuple[str, dict]]:
    """The requests of one run that commit through ``kind``'s path (what ``_COUNTED`` counts)."""
    if kind == "metrics":
        return [(f"/v1/runs/{run_id}/metrics", {"records": [{"step": 1, "name": "loss", "value": 0.5}]})]
    if kind == "control":
        return [(f"/v1/runs/{run_id}/control", {"action": "scale", "factor": 0.5})]
    if kind == "step":
        return [(f"/v1/runs/{run_id}/step", {"step": 1})]
    return [(f"/v1/runs/{run_id}/step", {"step": 1, "rank": rank, "metrics": {"val_loss": 1.0}})
            for rank in (0, 1)]  # barrier: two ranks report


_COUNTED = {"metrics": "record_metrics", "control": "control", "step": "step_run",
            "barrier": "report_ranks_to_barrier"}


@pytest.mark.parametrize("kind", list(_COUNTED))
def test_on_postgresql_api_commits_run_in_the_commit_threads(database_url, monkeypatch, kind):
    """Forty runs' commits at once (metrics, control, a step, a barrier's reports) on PostgreSQL:
    at most ``store.connections`` run at once, all in the commit threads; each answered, durable."""
    app = create_app(Settings(db=database_url("postgres")))
    runs = [f"r{i}" for i in range(RUNS)]
    with TestClient(app) as client:
        for run_id in runs:
            if kind == "barrier":
                make_run(client, run_id, plateau_on_any_rise(), world_size=2)
            else:
                make_run(client, run_id)
        manager = app.state.manager
        limit = manager.store.connections
        assert 1 < limit < RUNS
        at_once = CallsAtOnce(monkeypatch, manager, _COUNTED[kind], limit)

        async def all_at_once() -> list[httpx.Response]:
            transport = httpx.ASGITransport(app=app)  # on the app's own loop (its lifespan's)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as http:
                return list(await asyncio.gather(*(
                    http.post(path, json=body) for run_id in runs for path, body in _requests(kind, run_id))))

        answers = client.portal.call(all_at_once)
        assert all(a.status_code in (200, 202) for a in answers), [a.text for a in answers if a.is_error]
        assert at_once.most == limit
        assert len(at_once.threads) == limit and all(t.startswith("lrserve-commit") for t in at_once.threads)
        if kind in ("step", "barrier"):
            assert {manager.store.read_run(run_id).horizon for run_id in runs} == {1}
