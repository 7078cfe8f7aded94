"""A history of a run of many events, side by side: what each history of it costs, in process.

``python -m bench.history_reads [OTHER] [--events 20000] [--points 1000 3000] [--rounds 2]
[--db URL] [--json PATH]`` takes turns, in rotated rounds, between this checkout ("this")
and, when given, ``OTHER``, the root of another checkout of the repository ("other", e.g.
``git worktree add /tmp/base main``). Each turn is a process of its own, with that tree's
``lrserve`` first on its path: it creates a run (a new SQLite file, or on ``--db``'s
PostgreSQL database a run of its own, deleted after), gives it ``--events`` operator actions
(``scale`` by 1.0: each one event, no LR changed), and for each ``--points`` builds the run's
history as ``GET .../history?max_points=`` does (``history_json``): three times in a new
``RunManager`` (a new process's: its first history reads the events; the run loaded first),
then three times more (each built anew from what it keeps, as after any new step of an active
run). Prints the medians (ms) and the answer's size for each tree.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def measure(events: int, points: list[int], db: str | None) -> dict[str, Any]:
    """In this process, with whichever ``lrserve`` its path finds first."""
    from lrserve.service.api.responses import history_json
    from lrserve.service.runs.manager import RunManager
    from lrserve.service.settings import Settings
    from lrserve.service.store import open_store

    with tempfile.TemporaryDirectory(prefix="lrserve-hist-") as work:
        url = db or f"sqlite:///{work}/history.db"
        settings = Settings(db=url)
        run_id = f"events-{uuid.uuid4().hex[:8]}"
        writer = RunManager(open_store(url, create_db=True), settings)
        try:
            writer.create_run({"run_id": run_id, "schedule": {"type": "StepLR", "step_size": 10},
                               "base_lrs": [0.1]})
            for i in range(events):
                writer.control(run_id, {"action": "scale", "factor": 1.0}, None, reason=f"#{i}")
            gc.collect()  # the collector as a server has it (``app._warm_up_torch``): a full
            gc.freeze()  # collection of torch's objects took ~80 ms, at random, of a history here
            gc.set_threshold(20_000, 20, 10)
            result: dict[str, Any] = {}
            for n in points:
                first, again, size = [], [], 0
                for _ in range(3):
                    reader = RunManager(open_store(url), settings)
                    reader.state(run_id)
                    try:
                        started = time.perf_counter()
                        size = len(history_json(reader.history(run_id, n)))
                        first.append(time.perf_counter() - started)
                        started = time.perf_counter()
                        history_json(reader.history(run_id, n))
                        again.append(time.perf_counter() - started)
                    finally:
                        reader.close()
                        reader.store.close()
                result[str(n)] = {"first_ms": 1e3 * statistics.median(first),
                                  "again_ms": 1e3 * statistics.median(again), "bytes": size}
            return result
        finally:
            writer.delete_run(run_id)
            writer.close()
            writer.store.close()


def run(other: Path | None, events: int, points: list[int], rounds: int, db: str | None) -> dict[str, Any]:
    from bench.stats import rotations  # here: a turn runs this file with another tree's path first

    trees = {"this": ROOT, **({"other": other} if other is not None else {})}
    turns: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    loads = []
    for order in rotations(list(trees), rounds):
        for name in order:
            loads.append(os.getloadavg()[0])
            command = [sys.executable, str(Path(__file__).resolve()), "--measure", "--events", str(events),
                       "--points", *map(str, points), *(["--db", db] if db else [])]
            env = {**os.environ, "PYTHONPATH": str(trees[name])}
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True, timeout=600)
            turns[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {
        "events": events, "rounds": rounds, "load": [min(loads), max(loads)],
        "trees": {name: {n: {key: statistics.median(t[n][key] for t in got) for key in got[0][n]}
                         for n in map(str, points)} for name, got in turns.items()},
    }


def _print(result: dict[str, Any]) -> None:
    low, high = result["load"]
    print(f"{result['events']} operator actions, {result['rounds']} rounds, "
          f"load average {low:.1f}-{high:.1f}")
    for name, by_points in result["trees"].items():
        for n, got in by_points.items():
            print(f"  {name:5}  max_points={n:>6}  first in a process {got['first_ms']:8.1f} ms  "
                  f"built anew {got['again_ms']:8.1f} ms  {got['bytes'] / 1e6:6.2f} MB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", nargs="?", type=Path, help="the root of another checkout to compare with")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--points", type=int, nargs="+", default=[1000, 3000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--db", help="a PostgreSQL URL (default: a new SQLite file per turn)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one turn
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.events, args.points, args.db)))
        return
    result = run(args.other, args.events, args.points, args.rounds, args.db)
    _print(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
