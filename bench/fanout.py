"""Figure 6: the event stream's fan-out, 200 subscribers while 1,000 ranks step.

One server process on SQLite. Each round runs the same work twice, in rotated order:
once with nobody listening, once with ``fanout_subscribers`` streams of ``GET /v1/events``
open (``bench.drivers subscribers``, its own process). The work: the ranks of figure 4
(``bench.drivers ranks``: windows of final values and metric reports at a barrier, whose
decisions are events), an operator action every 50 ms on a side run (more events), then
the hot path's load (figure 2's ``GET .../lr`` of final steps).

Measured: each event's delivery delay to every subscriber (from the moment it was appended,
its ``at``, to its arrival), whether every subscriber got every event, and the ranks' and
the hot path's figures with and without the subscribers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx

from bench import report
from bench.hot_path import final_paths, load_row, paired_ratio, prepare_runs, settled_load
from bench.scale import _driver
from bench.servers import Pool, Server
from bench.sizes import Size
from bench.stats import median, rotations

NAME = "fanout"
TITLE = "Figure 6: event stream fan-out, subscribers while ranks step"
ROOT = Path(__file__).resolve().parent.parent
ACTION_EVERY_S = 0.05
TARGET_RATIO = 0.9


class _Actions:
    """An operator action on a side run every ``ACTION_EVERY_S``, in a thread, until stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30) as http:
            while not self.stop.wait(ACTION_EVERY_S):
                http.post("/v1/runs/fanout-side/control", json={"action": "scale", "factor": 1.0})
                self.sent += 1

    def __enter__(self) -> _Actions:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _subscribers(port: int, n: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "bench.drivers", "subscribers", "--port", str(port),
                             "--n", str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"subscribers did not connect: {line!r} {proc.stderr.read()[-2000:]}")
    return proc


def _finish(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate("stop\n", timeout=120)
    if proc.returncode:
        raise RuntimeError(f"bench.drivers subscribers failed: {err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def _one(server: Server, size: Size, ids: list[str], listeners: int, round_no: int) -> dict[str, Any]:
    proc = _subscribers(server.port, listeners) if listeners else None
    try:
        with _Actions(server.port):
            timeout = size.rank_epochs * size.rank_epoch_s * 10 + 120
            ranks = _driver("ranks", "--port", str(server.port), "--runs", str(size.rank_runs),
                            "--ranks", str(size.ranks), "--epochs", str(size.rank_epochs),
                            "--epoch-s", str(size.rank_epoch_s), "--timeout", str(timeout),
                            "--prefix", f"fan{round_no}{'s' if listeners else 'q'}", timeout=timeout + 30)
            lr = settled_load(server, final_paths(ids), size, size.load_seconds)
        server.settle()
    finally:
        streams = _finish(proc) if proc else None
    return {"ranks": ranks, "lr": lr, "streams": streams}


COLUMNS = [("variant", "variant"), ("delivery_p50_ms", "delivery p50 ms"),
           ("delivery_p99_ms", "delivery p99 ms"), ("deliveries", "deliveries"), ("missing", "missing"),
           ("ranks_p99_ms", "ranks p99 ms"), ("lr_rps", "lr req/s"), ("lr_p99_ms", "lr p99 ms"),
           ("vs_quiet", "lr vs quiet"), ("errors", "errors")]


def run(size: Size, work: Path, pool: Pool) -> dict[str, Any]:
    listeners = size.fanout_subscribers
    variants = {"no subscribers": 0, f"{listeners} subscribers": listeners}
    with pool.sqlite("fanout") as server:
        ids = prepare_runs(server.port, "fanout-hot", runs=size.hot_runs)
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as http:
            http.post("/v1/runs", json={"run_id": "fanout-side", "base_lrs": [0.1],
                                        "schedule": {"type": "StepLR", "step_size": 10}})
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
        for round_no, order in enumerate(rotations(list(variants), size.load_rounds)):
            for name in order:
                results[name].append(_one(server, size, ids, variants[name], round_no))
    quiet = [r["lr"] for r in results["no subscribers"]]
    rows = []
    for name, rounds in results.items():
        lr = load_row(name, [r["lr"] for r in rounds])
        streams = [r["streams"] for r in rounds if r["streams"]]
        rows.append({
            "variant": name,
            "delivery_p50_ms": median([s["delivery_p50_ms"] for s in streams]) if streams else None,
            "delivery_p99_ms": median([s["delivery_p99_ms"] for s in streams]) if streams else None,
            "deliveries": sum(s["deliveries"] for s in streams) if streams else None,
            "missing": sum(s["missing"] for s in streams) if streams else None,
            "ranks_p99_ms": median([r["ranks"]["all_p99_ms"] for r in rounds]),
            "lr_rps": lr["rps"], "lr_p99_ms": lr["p99_ms"],
            "vs_quiet": paired_ratio([r["lr"] for r in rounds], quiet),
            "errors": sum(r["ranks"]["errors"] for r in rounds) + lr["errors"]
            + sum(s["errors"] for s in streams),
        })
    loud = rows[1]
    holds = loud["missing"] == 0 and all(r["errors"] == 0 for r in rows) and loud["vs_quiet"] >= TARGET_RATIO
    return report.figure(
        NAME, TITLE,
        ran=f"lrserve under uvicorn, 1 process, SQLite; per round and variant: {size.ranks:,} ranks over "
            f"{size.rank_runs} runs ({size.rank_epochs} epochs of {size.rank_epoch_s:g} s, bench.drivers "
            f"ranks), an action every {ACTION_EVERY_S * 1000:g} ms, then {size.load_seconds:g} s of "
            f"GET .../lr ({size.load_connections} connections); {size.load_rounds} rounds, "
            "variants in rotated order",
        target=f"every subscriber gets every event, no errors, and the hot path with {listeners} subscribers "
               f">= {TARGET_RATIO} x without (unchanged within this machine's noise)",
        holds=holds, columns=COLUMNS, rows=rows,
        notes=["delivery: from the event's `at` (set as it is appended, before its commit) to its arrival "
               "at the subscriber process; every event of every subscriber counts",
               "ranks p99: all requests of the ranks (windows, reports at the barrier, creates); lr: the "
               "hot path's GET of final steps, medians over rounds; 'lr vs quiet' pairs a round's variants",
               "subscribers and ranks run in their own processes on the same 2 shared cores as the server"],
        extra={"rounds": {name: [{"ranks": r["ranks"], "streams": r["streams"],
                                  "lr": {k: r["lr"][k] for k in ("rps", "p99_ms", "errors")}}
                                 for r in rounds] for name, rounds in results.items()}},
    )
