"""The benchmark tools that compare two trees run end to end, each against this same tree (as
the other one), at their smallest size, and write every figure.

No timing is asserted anywhere. These were in ``test_smoke.py``, beside the tiny suite: apart,
under ``--dist loadfile`` the two modules run on two workers at once (together they were the
suite's longest module: 19-20 minutes of one worker at load 30-50, the run 55).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.servers import pg_problem
from tests.bench.test_smoke import HANG_S, ROOT

pytestmark = pytest.mark.timeout(HANG_S + 60)


def _tool(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m bench.MODULE ROOT ARGS...`` (this tree as the other one), which must succeed."""
    command = [sys.executable, "-m", f"bench.{module}", str(ROOT), *args]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_side_by_side_compares_two_trees(tmp_path: Path) -> None:
    """``bench.side_by_side`` against this same tree (as the other one): every variant of both
    trees has its numbers, the server's CPU and wait per request among them."""
    out = tmp_path / "side.json"
    _tool("side_by_side", "--rounds", "1", "--calls", "3", "--json", str(out))
    data = json.loads(out.read_text())
    for figure, per_tree in (("report_decide", 3), ("routes", 3)):
        rows = [row for row in data[figure] if row["variant"].startswith(("this: ", "other: "))]
        assert len(rows) == 2 * per_tree, figure
        for row in rows:
            assert row["calls"] == 3, row
            for key in ("p50_ms", "server_cpu_us", "server_wait_us", "client_cpu_us"):
                assert math.isfinite(row[key]) and row[key] >= 0, (key, row)
            assert row["server_cpu_us"] > 0, row  # the server's threads were found and read


@pytest.mark.slow
def test_cold_start_times_the_yardstick_and_both_trees(tmp_path: Path) -> None:
    """``bench.cold_start`` against this same tree (as the other one): every start of each
    variant timed, each server's median over ``import torch`` reported."""
    out = tmp_path / "cold.json"
    proc = _tool("cold_start", "--rounds", "2", "--json", str(out))
    data = json.loads(out.read_text())
    assert set(data["variants"]) == {"torch", "this", "other"}
    for name, row in data["variants"].items():
        assert len(row["seconds"]) == 2 and all(s > 0 for s in row["seconds"]), name
        assert row["min_s"] <= row["median_s"] <= row["max_s"], name
        expected = row["median_s"] - data["variants"]["torch"]["median_s"]
        assert math.isclose(row["over_torch_s"], expected), name
    assert "import torch" in proc.stdout


@pytest.mark.slow
def test_plateau_loop_measures_each_report_of_both_trees(tmp_path: Path) -> None:
    """``bench.plateau_loop`` against this same tree (as the other one): every variant (tree x
    client mode x training step) has its reports, each with the training thread's time and
    CPU and the bare round trip beside it."""
    pytest.importorskip("torch")
    out = tmp_path / "plateau.json"
    _tool("plateau_loop", "--rounds", "1", "--reports", "2", "--epoch", "2", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    variants = {(r["tree"], r["client"], r["step_ms"]) for r in rows}
    modes = ("waits", "overlap")
    assert variants == {(t, c, s) for t in ("this", "other") for c in modes for s in (0.1, 5.0)}
    for row in rows:
        assert row["reports"] == 2, row
        for key in ("wall", "cpu", "tick_wall", "tick_cpu", "hook_wall", "hook_cpu", "rtt", "rtt_cpu"):
            assert math.isfinite(row[key]) and row[key] >= 0, (key, row)
        assert row["tick_cpu"] > 0 and row["rtt"] > 0, row  # step(metric) ran; the yardstick answered


@pytest.mark.slow
def test_commit_ab_commits_on_both_trees(tmp_path: Path) -> None:
    """``bench.commit_ab`` against this same tree (as the other one), on PostgreSQL: each
    tree's round committed without an error, with its server's and sessions' CPU per commit."""
    if problem := pg_problem():
        pytest.skip(problem)
    proc = _tool("commit_ab", "--rounds", "1", "--seconds", "1", "--workers", "1", "--connections", "4")
    for tree in ("this", "other"):
        (line,) = [x for x in proc.stdout.splitlines() if x.startswith(f"round 0 {tree:>5}:")]
        fields = dict(zip(line.split()[3::2], map(float, line.split()[4::2]), strict=True))
        assert fields["rps"] > 0 and fields["errors"] == 0, line
        assert fields["server_us"] > 0 and fields["sessions_us"] >= 0, line
    assert "this / other req/s per round" in proc.stdout


@pytest.mark.slow
def test_history_reads_builds_each_history_on_both_trees(tmp_path: Path) -> None:
    """``bench.history_reads`` against this same tree (as the other one): each tree's history
    of a run of operator actions, first in a process and built anew, timed at each size."""
    out = tmp_path / "history.json"
    _tool("history_reads", "--events", "30", "--points", "10", "50", "--rounds", "1", "--json", str(out))
    trees = json.loads(out.read_text())["trees"]
    assert set(trees) == {"this", "other"}
    for by_points in trees.values():
        assert set(by_points) == {"10", "50"}
        for got in by_points.values():
            assert got["first_ms"] > 0 and got["again_ms"] > 0, got
        assert by_points["10"]["bytes"] < by_points["50"]["bytes"]  # the latest 10 of 31 events, then all


@pytest.mark.slow
def test_stream_cost_measures_both_trees(tmp_path: Path) -> None:
    """``bench.stream_cost`` against this same tree (as the other one): each tree's server CPU
    per event per stream, with every event delivered to every stream (else it fails)."""
    out = tmp_path / "streams.json"
    _tool("stream_cost", "--streams", "3", "--events", "5", "--rounds", "1", "--json", str(out))
    trees = json.loads(out.read_text())["trees"]
    assert set(trees) == {"this", "other"}
    assert all(math.isfinite(t["us_per_delivery"]) and len(t["rounds_us"]) == 1 for t in trees.values())


@pytest.mark.slow
def test_spike_views_times_a_long_runs_first_view_on_both_trees(tmp_path: Path) -> None:
    """``bench.spike_views`` against this same tree (as the other one): a guarded run of more
    reports than a view may read in the request, its first view after a restart, the time to
    its bands (checked whole: else the tool fails) and another run's steps meanwhile."""
    out = tmp_path / "views.json"
    _tool("spike_views", "--reports", "16000", "--worst", "100", "--rounds", "1", "--json", str(out))
    trees = json.loads(out.read_text())["trees"]
    assert set(trees) == {"this", "other"}
    for got in trees.values():
        assert 0 < got["view_s"] <= got["bands_s"] and got["worst_s"] > 0, got
        assert all(got[f"{phase}_p99_ms"] > 0 for phase in ("idle", "busy")), got


@pytest.mark.slow
def test_a_server_dies_with_the_process_that_started_it_even_by_sigkill(tmp_path: Path) -> None:
    """A bench tool killed by SIGKILL (its test's timeout) took no ``atexit`` with it, and its
    server ran on, holding a port, a database and a core; now the kernel sends the server
    SIGTERM when its starter dies, and it stops."""
    starter = (
        "import sys, time\n"
        "from bench.servers import Server\n"
        f"server = Server('sqlite:///{tmp_path}/db.sqlite', '{tmp_path}').start()\n"
        "print(server.proc.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    command = [sys.executable, "-c", starter]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            server = int(proc.stdout.readline())
            assert _alive(server)
        finally:
            proc.kill()
    deadline = time.monotonic() + 60
    while _alive(server):
        assert time.monotonic() < deadline, "the server outlived its starter"
        time.sleep(0.1)


def test_a_refused_prctl_is_said_in_the_servers_log(monkeypatch) -> None:
    """Where a sandbox refuses ``prctl`` the server would outlive its starter silently; the child
    says so on its stderr (the server's log) and starts anyway."""
    import ctypes

    import bench.servers as servers

    class Refusing:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        @staticmethod
        def prctl(*args: object) -> int:
            ctypes.set_errno(1)
            return -1

    monkeypatch.setattr(servers.ctypes, "CDLL", Refusing)
    preexec = servers._dies_with_its_starter()
    assert preexec is not None
    proc = subprocess.run([sys.executable, "-c", "print('started')"], preexec_fn=preexec,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "started\n"
    assert "prctl(PR_SET_PDEATHSIG) refused (errno 1)" in proc.stderr


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet waited for by its new parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
