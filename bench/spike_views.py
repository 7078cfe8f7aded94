"""A spike guard's first view after a restart, side by side: the view's own time, the time until
it shows the bands, and another run's steps meanwhile.

``python -m bench.spike_views [OTHER] [--reports 100000] [--rounds 2] [--backend sqlite|postgres]
[--json PATH]`` takes turns, in rotated rounds, between this checkout ("this") and, when given,
``OTHER``, the root of another checkout of the repository ("other", e.g. ``git worktree add
/tmp/base main``). Each turn starts a real ``lrserve serve`` of that tree (default settings; a
new SQLite file, or a PostgreSQL schema of its own) and gives a ``SpikeGuard`` run ``--reports``
reports of one rank (``POST .../metrics``, 10,000 a request, each placed at its step), all final
(step jumps), and a victim run. Then it restarts the server, so the guarded run's first view
is a new process's (as after a deploy), and while a victim steps another run (``POST
.../step``, one at a time, all along):

- **idle**: 3 s of the victim's steps alone;
- **first view**: ``GET .../spike-guard`` once, timed (the tree before this change replays the
  run's whole log in it); then, where the answer has no bands yet (``bands_through`` null: this
  tree hands a replay over the budget to a background thread), asks every 50 ms until it has;
  ``bands_s`` is from the first view's start to the answer with bands;
- **worst allowed**: ``--worst`` (13,000) more reports, all final, then one view (it reads and
  judges them all in the request: as many as the default budget lets a view do; timed).

Prints per tree the medians over rounds of: the first view's time, the time to its bands, the
worst allowed view's, and the victim's step p50/p99/max while the first view's bands were
made, against its idle figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.servers import Server, pg_schema, sqlite_url, workdir
from bench.stats import p99, percentile, rotations

ROOT = Path(__file__).resolve().parent.parent
GUARD = {"type": "SpikeGuard", "schedule": {"type": "StepLR", "step_size": 100}}
PER_REQUEST = 10_000  # records a POST .../metrics takes (its limit)
MAX_JUMP = 10_000  # steps a request may move the horizon (the default ``max_jump``)


def _report(http: httpx.Client, first: int, last: int) -> None:
    """Reports of steps ``first..last`` (rank 0), then every step up to ``last`` made final."""
    for start in range(first, last + 1, PER_REQUEST):
        records = [{"step": step, "name": "loss", "value": 1.0 + 0.01 * (step % 7), "rank": 0}
                   for step in range(start, min(last, start + PER_REQUEST - 1) + 1)]
        http.post("/v1/runs/long/metrics", json={"records": records}).raise_for_status()
    horizon = http.get("/v1/runs/long").json()["horizon"]
    while horizon < last:
        horizon = min(last, horizon + MAX_JUMP)
        http.get("/v1/runs/long/lr", params={"step": horizon}).raise_for_status()


class _Victim:
    """Another run's ``POST .../step``, one after another, each timed, in a thread of its own."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=60)
        self.samples: list[tuple[float, float]] = []  # (ended at, seconds)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        step = self.http.get("/v1/runs/victim").json()["horizon"]
        while not self.stop.is_set():
            step += 1
            started = time.perf_counter()
            self.http.post("/v1/runs/victim/step", json={"step": step}).raise_for_status()
            ended = time.perf_counter()
            self.samples.append((ended, ended - started))

    def between(self, start: float, end: float) -> list[float]:
        return [took for ended, took in self.samples if start <= ended <= end]

    def __enter__(self) -> _Victim:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.http.close()


def _latencies(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": 1e3 * percentile(values, 50), "p99_ms": 1e3 * p99(values),
            "max_ms": 1e3 * max(values)}


def _turn(tree: Path, db: str, work: Path, reports: int, worst: int) -> dict[str, Any]:
    with Server(db, work, tree=tree) as server:
        with httpx.Client(base_url=server.url, timeout=300) as http:
            for run_id, schedule in (("long", GUARD), ("victim", {"type": "StepLR", "step_size": 10})):
                body = {"run_id": run_id, "schedule": schedule, "base_lrs": [0.1]}
                http.post("/v1/runs", json=body).raise_for_status()
            _report(http, 1, reports)
    result: dict[str, Any] = {}
    with Server(db, work, tree=tree) as server, httpx.Client(base_url=server.url, timeout=600) as http:
        http.get("/v1/runs/long").raise_for_status()  # the run loaded: the view's own work is timed
        with _Victim(server.url) as victim:
            time.sleep(3)
            idle_end = time.perf_counter()
            started = time.perf_counter()
            view = http.get("/v1/runs/long/spike-guard").json()
            result["view_s"] = time.perf_counter() - started
            while view.get("bands_through", view["horizon"]) is None:
                time.sleep(0.05)
                view = http.get("/v1/runs/long/spike-guard").json()
            ended = time.perf_counter()
            result["bands_s"] = ended - started
            assert len(view["band"]["0"]["steps"]) == 1000, "the bands shown are the whole run's"
            idle, busy = victim.between(idle_end - 3, idle_end), victim.between(started, ended)
        result["idle"], result["busy"] = _latencies(idle), _latencies(busy or [0.0])
        _report(http, reports + 1, reports + worst)
        started = time.perf_counter()
        view = http.get("/v1/runs/long/spike-guard").json()
        result["worst_s"] = time.perf_counter() - started
        assert view.get("bands_through", view["horizon"]) == reports + worst, "read in the request"
    return result


def run(other: Path | None, reports: int, worst: int, rounds: int, backend: str) -> dict[str, Any]:
    trees = {"this": ROOT, **({"other": other} if other is not None else {})}
    turns: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    loads = []
    for order in rotations(list(trees), rounds):
        for name in order:
            loads.append(os.getloadavg()[0])
            with workdir("lrserve-spike-views-") as work:
                if backend == "postgres":
                    with pg_schema() as db:
                        turns[name].append(_turn(trees[name], db, work, reports, worst))
                else:
                    turns[name].append(_turn(trees[name], sqlite_url(work), work, reports, worst))
    loads.append(os.getloadavg()[0])

    def med(got: list[dict[str, Any]], *keys: str) -> float:
        values = []
        for turn in got:
            value: Any = turn
            for key in keys:
                value = value[key]
            values.append(value)
        return statistics.median(values)

    return {
        "reports": reports, "worst": worst, "rounds": rounds, "backend": backend,
        "load": [min(loads), max(loads)],
        "trees": {name: {"view_s": med(got, "view_s"), "bands_s": med(got, "bands_s"),
                         "worst_s": med(got, "worst_s"),
                         **{f"{phase}_{key}": med(got, phase, key) for phase in ("idle", "busy")
                            for key in ("p50_ms", "p99_ms", "max_ms")}}
                  for name, got in turns.items()},
    }


def _print(result: dict[str, Any]) -> None:
    low, high = result["load"]
    print(f"a guarded run of {result['reports']} reports, its first view after a restart "
          f"({result['backend']}, {result['rounds']} rounds, load average {low:.1f}-{high:.1f})")
    for name, got in result["trees"].items():
        print(f"  {name:5}  first view {got['view_s'] * 1e3:8.1f} ms  bands after {got['bands_s']:6.2f} s  "
              f"worst allowed view ({result['worst']} new reports) {got['worst_s'] * 1e3:7.1f} ms")
        print(f"         another run's step p50 / p99 / max: idle {got['idle_p50_ms']:.2f} / "
              f"{got['idle_p99_ms']:.2f} / {got['idle_max_ms']:.1f} ms; until the bands "
              f"{got['busy_p50_ms']:.2f} / {got['busy_p99_ms']:.2f} / {got['busy_max_ms']:.1f} ms "
              f"(p99 {got['busy_p99_ms'] / got['idle_p99_ms']:.2f}x idle)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", nargs="?", type=Path, help="the root of another checkout to compare with")
    parser.add_argument("--reports", type=int, default=100_000)
    parser.add_argument("--worst", type=int, default=13_000, help="new reports the worst allowed view reads")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    result = run(args.other, args.reports, args.worst, args.rounds, args.backend)
    _print(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
