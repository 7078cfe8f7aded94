"""Runs that went quiet: ``last_seen``, ``stale``, ``?stale=true`` and the gauges, on two real replicas.

``LRSERVE_STALE_AFTER_S=2`` and ``LRSERVE_LAST_SEEN_FLUSH_S=0.2`` make the test take
seconds instead of minutes (the defaults, 300 s and 5 s, are tested in-process).
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from lrserve.client._cli import main as lrserve

from tests.live_server import ServerProcess

pytestmark = pytest.mark.slow

ENV = {"LRSERVE_STALE_AFTER_S": "2", "LRSERVE_LAST_SEEN_FLUSH_S": "0.2"}
STALE_AFTER = timedelta(seconds=2)
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


class Ranks(threading.Thread):
    """Ranks that keep asking about their runs (``alive``, may grow) until ``stop``."""

    def __init__(self, url: str, alive: set[str]) -> None:
        super().__init__(daemon=True)
        self.url, self.alive, self.stop = url, alive, threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self.stop.wait(0.1):
                for run_id in list(self.alive):
                    http.get(f"/v1/runs/{run_id}/lr", params={"step": 0}).raise_for_status()


def test_a_quiet_run_goes_stale_and_comes_back_when_a_rank_asks(database_url, tmp_path, capsys):
    db = database_url("postgres")
    a = ServerProcess(db, tmp_path, env=ENV).start()
    b = ServerProcess(db, tmp_path, env=ENV).start()
    ranks = Ranks(a.url, {"busy"})  # through replica a only
    try:
        for run_id in ("quiet", "busy", "paused"):
            body = {"run_id": run_id, "schedule": SPEC, "base_lrs": [0.1]}
            assert httpx.post(f"{a.url}/v1/runs", json=body, timeout=30).status_code == 201
        httpx.post(f"{a.url}/v1/runs/paused/control", json={"action": "hold"}, timeout=30).raise_for_status()
        httpx.get(f"{a.url}/v1/runs/paused/lr", params={"step": 1}, timeout=30).raise_for_status()
        requested = datetime.now(timezone.utc)
        created = _run(b.url, "quiet")
        answered = datetime.now(timezone.utc)
        assert created["last_seen"] is not None
        # fresh unless this machine took more than STALE_AFTER_S to get here (its clock is the
        # servers'): the answer is decided between `requested` and `answered`
        silent = datetime.fromisoformat(created["last_seen"])
        if answered - silent <= STALE_AFTER:
            assert created["stale"] is False
        elif requested - silent > STALE_AFTER:
            assert created["stale"] is True
        ranks.start()

        _until(lambda: _stale(b.url) == ["quiet"])  # b knows "busy" is alive from a's flushes
        quiet, busy, paused = (_run(b.url, r) for r in ("quiet", "busy", "paused"))
        assert quiet["stale"] is True and busy["stale"] is False
        assert paused["status"] == "held" and paused["stale"] is False  # a held job may be quiet
        assert datetime.fromisoformat(busy["last_seen"]) > datetime.fromisoformat(quiet["last_seen"])
        _until(lambda: _gauges(b.url) == {"active": 2, "held": 1, "stopped": 0, "stale": 1})
        assert lrserve(["runs", "list", "--stale", "--url", b.url]) == 0
        listed = capsys.readouterr().out.splitlines()
        assert [line.split()[:3] for line in listed[1:]] == [["quiet", "active", "(stale)"]]
        exposition = httpx.get(f"{b.url}/metrics", timeout=30).text
        assert 'run_id="' not in exposition and "quiet" not in exposition  # no label per run

        # a rank of "quiet" asks replica a (the fast path: step 0 is final and cached), and goes on
        httpx.get(f"{a.url}/v1/runs/quiet/lr", params={"step": 0}, timeout=30).raise_for_status()
        ranks.alive.add("quiet")
        assert _run(a.url, "quiet")["stale"] is False  # a knows at once
        _until(lambda: _stale(b.url) == [] and _run(b.url, "quiet")["stale"] is False)  # b after a flush
        _until(lambda: _gauges(b.url)["stale"] == 0)

        seen = _run(b.url, "paused")["last_seen"]
        httpx.get(f"{a.url}/v1/runs/paused", timeout=30).raise_for_status()  # not a rank: reads don't count
        httpx.get(f"{a.url}/v1/runs/paused/history", timeout=30).raise_for_status()
        httpx.get(f"{a.url}/v1/runs/nope/lr", params={"step": 0}, timeout=30)  # 404: counts for nothing
        time.sleep(0.5)
        assert _run(b.url, "paused")["last_seen"] == seen
        assert ranks.is_alive()  # every rank's request was answered
    finally:
        ranks.stop.set()
        if ranks.is_alive():
            ranks.join(30)
        a.stop()
        b.stop()
