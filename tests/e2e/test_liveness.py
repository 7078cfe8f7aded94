"""Runs that went quiet: ``last_seen``, ``stale``, ``?stale=true`` and the gauges, on two real replicas.

``LRSERVE_STALE_AFTER_S=2`` and ``LRSERVE_LAST_SEEN_FLUSH_S=0.2`` make the test take
seconds instead of minutes (the defaults, 300 s and 5 s, are tested in-process).
"""

from __future__ import annotations

import time
from datetime import datetime

import httpx
import pytest

from tests.live_server import ServerProcess

pytestmark = pytest.mark.slow

ENV = {"LRSERVE_STALE_AFTER_S": "2", "LRSERVE_LAST_SEEN_FLUSH_S": "0.2"}
SPEC = {"type": "StepLR", "step_size": 10}


def _run(url: str, run_id: str) -> dict:
    return httpx.get(f"{url}/v1/runs/{run_id}", timeout=30).json()


def _stale(url: str) -> list[str]:
    page = httpx.get(f"{url}/v1/runs", params={"stale": "true"}, timeout=30).json()
    return [r["run_id"] for r in page["data"]]


def _gauges(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    found = {}
    for line in text.splitlines():
        if line.startswith("lrserve_runs{"):
            name, value = line.rsplit(" ", 1)
            found[name.split('"')[1]] = float(value)
    return found


def _until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_quiet_run_goes_stale_and_comes_back_when_a_rank_asks(database_url, tmp_path):
    db = database_url("postgres")
    a = ServerProcess(db, tmp_path, env=ENV).start()
    b = ServerProcess(db, tmp_path, env=ENV).start()
    try:
        for run_id in ("quiet", "busy", "paused"):
            body = {"run_id": run_id, "schedule": SPEC, "base_lrs": [0.1]}
            assert httpx.post(f"{a.url}/v1/runs", json=body, timeout=30).status_code == 201
        httpx.post(f"{a.url}/v1/runs/paused/control", json={"action": "hold"}, timeout=30).raise_for_status()
        httpx.get(f"{a.url}/v1/runs/paused/lr", params={"step": 1}, timeout=30).raise_for_status()
        created = _run(b.url, "quiet")
        assert created["stale"] is False and created["last_seen"] is not None

        step = 0
        started = time.monotonic()
        while time.monotonic() - started < 3.0:  # only "busy" keeps stepping, through replica a
            step += 1
            httpx.post(f"{a.url}/v1/runs/busy/step", json={"step": step}, timeout=30).raise_for_status()
            time.sleep(0.1)
        _until(lambda: _stale(b.url) == ["quiet"])  # b knows "busy" is alive from a's flushes
        quiet, busy, paused = (_run(b.url, r) for r in ("quiet", "busy", "paused"))
        assert quiet["stale"] is True and busy["stale"] is False
        assert paused["status"] == "held" and paused["stale"] is False  # a held job may be quiet
        assert datetime.fromisoformat(busy["last_seen"]) > datetime.fromisoformat(quiet["last_seen"])
        _until(lambda: _gauges(b.url) == {"active": 2, "held": 1, "stopped": 0, "stale": 1})
        exposition = httpx.get(f"{b.url}/metrics", timeout=30).text
        assert 'run_id="' not in exposition and "quiet" not in exposition  # no label per run

        # a rank of "quiet" asks replica a (the fast path: step 0 is final and cached)
        httpx.get(f"{a.url}/v1/runs/quiet/lr", params={"step": 0}, timeout=30).raise_for_status()
        assert _run(a.url, "quiet")["stale"] is False  # a knows at once
        _until(lambda: _stale(b.url) == [] and _run(b.url, "quiet")["stale"] is False)  # b after a flush
        _until(lambda: _gauges(b.url)["stale"] == 0)

        seen = _run(b.url, "quiet")["last_seen"]
        httpx.get(f"{a.url}/v1/runs/quiet", timeout=30).raise_for_status()  # not a rank: reads don't count
        httpx.get(f"{a.url}/v1/runs/nope/lr", params={"step": 0}, timeout=30)  # 404: counts for nothing
        time.sleep(0.5)
        assert _run(b.url, "quiet")["last_seen"] == seen
    finally:
        a.stop()
        b.stop()
