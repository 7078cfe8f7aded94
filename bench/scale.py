"""Figure 4: many runs and many ranks on one server process (SQLite).

- **Memory per run**: the server's resident memory (VmRSS of its process, from
  ``/proc``) after creating and stepping N runs from 16 concurrent connections
  (``bench.drivers populate``), less what it held after a warm-up of 100 runs (fewer at
  the tiny size), per run.
  Run counts the size does not reach (100,000 at the default size; pass
  ``--scale-runs 10000 100000`` to measure it, ~15 min here) are extrapolated linearly and
  labelled so. Values of every final step stay in memory, so a run's footprint grows with
  its steps: the figure also measures the memory of one held step.
- **Cold start**: spawn to first answer of ``GET .../lr`` for a final step, on the
  database with all those runs against one with a single run, alternating.
- **Ranks**: simulated ranks (``bench.drivers ranks``) of jobs with ``world_size``
  ranks each, stepping a warm-up-then-plateau schedule as ``RemoteScheduler`` does:
  windows of final values, one metric report per epoch through the metric barrier.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import report
from bench.hot_path import prepare_runs
from bench.servers import Pool, Server, sqlite_url
from bench.sizes import Size
from bench.stats import median, rotations

NAME = "scale"
TITLE = "Figure 4: scale, memory per run, cold start, 1,000 ranks"
EXTRAPOLATE_TO = 100_000
ROOT = Path(__file__).resolve().parent.parent


def _driver(*args: str, timeout: float) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "bench.drivers", *args], capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"bench.drivers {args[0]} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def populate(port: int, prefix: str, runs: int, steps: int) -> dict[str, Any]:
    return _driver("populate", "--port", str(port), "--prefix", prefix, "--runs", str(runs),
                   "--steps", str(steps), "--connections", "16", timeout=7200)


def _memory(server: Server, size: Size) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    warm_runs = max(size.scale_step_runs, min(100, min(size.scale_runs)))
    populate(server.port, "warm", warm_runs, size.scale_steps_per_run)
    base = server.rss_bytes()
    rows, extra = [], {"rss_base_mb": base / 2**20}
    done = 0
    per_run = float("nan")
    for total in sorted(size.scale_runs):
        result = populate(server.port, f"scale{total}", total - done, size.scale_steps_per_run)
        done = total
        rss = server.rss_bytes()
        per_run = (rss - base) / total
        rows.append({"what": f"memory: {total:,} runs x {size.scale_steps_per_run} steps",
                     "value": per_run / 1024, "unit": "KiB/run", "rss_mb": rss / 2**20,
                     "detail": f"created+stepped at {result['runs_per_s']:.0f} runs/s",
                     "errors": result["errors"]})
    if max(size.scale_runs) < EXTRAPOLATE_TO:
        rows.append({"what": f"memory: {EXTRAPOLATE_TO:,} runs (EXTRAPOLATED, linear)",
                     "value": per_run / 1024, "unit": "KiB/run",
                     "rss_mb": (base + per_run * EXTRAPOLATE_TO) / 2**20,
                     "detail": f"from {max(size.scale_runs):,} measured; not measured", "errors": None})
    # one held step: step some runs further and read the memory again
    import httpx

    before = server.rss_bytes()
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for i in range(size.scale_step_runs):
            start = size.scale_steps_per_run + 1
            http.get(f"/v1/runs/warm-{i}/lr", params={"step": start, "ahead": size.scale_extra_steps - 1}
                     ).raise_for_status()
    grown = server.rss_bytes() - before
    held = size.scale_step_runs * size.scale_extra_steps
    rows.append({"what": f"memory: one more final step held ({held:,} steps added)",
                 "value": grown / held, "unit": "B/step", "rss_mb": server.rss_bytes() / 2**20,
                 "detail": "values of final steps are kept in memory", "errors": 0})
    extra["runs_on_disk"] = warm_runs + done
    return rows, extra


def _cold_start(big_db: str, small_db: str | None, first_run: str, work: Path,
                size: Size) -> list[dict[str, Any]]:
    path = f"/v1/runs/{first_run}/lr?step=5"
    variants = ["big", "small"] if small_db else ["big"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    rss: dict[str, list[float]] = {v: [] for v in variants}
    for order in rotations(variants, size.scale_cold_rounds):
        for which in order:
            server = Server(big_db if which == "big" else small_db, work, name=f"cold-{which}")
            try:
                times[which].append(server.spawn().first_answer(path))
                rss[which].append(server.rss_bytes() / 2**20)
            finally:
                server.stop()
    return [
        {"what": f"cold start to first answer, {label}", "value": median(times[which]), "unit": "s",
         "rss_mb": median(rss[which]),
         "detail": f"median of {len(times[which])}; max {max(times[which]):.2f} s", "errors": 0}
        for which, label in (("big", "all runs on disk"), ("small", "1 run on disk")) if which in times
    ]


def _ranks(size: Size, pool: Pool) -> dict[str, Any]:
    with pool.sqlite("ranks") as server:
        prepare_runs(server.port, "ranks-warm", runs=1, horizon=10)  # the first run's one-time imports
        timeout = size.rank_epochs * size.rank_epoch_s * 10 + 120
        return _driver("ranks", "--port", str(server.port), "--runs", str(size.rank_runs),
                       "--ranks", str(size.ranks), "--epochs", str(size.rank_epochs),
                       "--epoch-s", str(size.rank_epoch_s), "--timeout", str(timeout), timeout=timeout + 30)


COLUMNS = [("what", "measure"), ("value", "value"), ("unit", "unit"), ("rss_mb", "server RSS MiB"),
           ("errors", "errors"), ("detail", "detail")]


def run(size: Size, work: Path, pool: Pool) -> dict[str, Any]:
    small_db = sqlite_url(work, "one") if size.scale_cold_small else None
    with contextlib.ExitStack() as stack:
        if small_db:  # the comparison: a database with one run, made while the other starts
            small = Server(small_db, work, name="one").spawn()
            stack.callback(small.stop)
        big = stack.enter_context(pool.sqlite("scale"))
        if small_db:
            small.wait_ready()
            prepare_runs(small.port, "warm", runs=1, horizon=size.scale_steps_per_run)
            small.stop()
        rows, extra = _memory(big, size)
        big_db = big.db
    if size.scale_cold_rounds:
        rows += _cold_start(big_db, small_db, "warm-0", work, size)
    ranks = _ranks(size, pool)
    rows.append({"what": f"ranks: {ranks['ranks']:,} ranks over {ranks['runs']} runs, p99 all requests",
                 "value": ranks["all_p99_ms"], "unit": "ms", "rss_mb": None, "errors": ranks["errors"],
                 "detail": f"{ranks['requests']:,} requests in {ranks['seconds']:.1f} s; "
                           f"{ranks['epochs']} epochs of {size.rank_epoch_s:g} s"})
    rows.append({"what": "ranks: POST /v1/runs (every rank creates or joins) p50 / p99",
                 "value": ranks["create_p50_ms"], "unit": "ms", "rss_mb": None, "errors": None,
                 "detail": f"p99 {ranks['create_p99_ms']:.1f} ms"})
    rows.append({"what": "ranks: GET .../lr windows p50 / p99", "value": ranks["get_p50_ms"], "unit": "ms",
                 "rss_mb": None, "errors": None, "detail": f"p99 {ranks['get_p99_ms']:.1f} ms"})
    rows.append({"what": "ranks: POST .../step at the barrier p50 / p99", "value": ranks["post_p50_ms"],
                 "unit": "ms", "rss_mb": None, "errors": None,
                 "detail": f"p99 {ranks['post_p99_ms']:.1f} ms; waits for all {ranks['world_size']} ranks"})
    rows.append({"what": "ranks: steps where ranks got different values", "value": ranks["divergent_steps"],
                 "unit": "steps", "rss_mb": None, "errors": None,
                 "detail": f"of {ranks['decided_steps']} decided (run, step) pairs"})
    extra["ranks"] = ranks
    populate_errors = sum(r["errors"] or 0 for r in rows if r["what"].startswith("memory"))
    holds = ranks["errors"] == 0 and ranks["divergent_steps"] == 0 and populate_errors == 0
    return report.figure(
        NAME, TITLE,
        ran="`python -m service serve`, 1 process, SQLite; drivers in a separate process (asyncio, "
            "keep-alive, 1 connection per rank); RSS = VmRSS from /proc",
        target="ranks: zero errors and identical values on every rank; memory, cold start and p99 "
               "reported (the issue sets no number for them)",
        holds=holds, columns=COLUMNS, rows=rows, extra=extra,
        notes=["ranks per epoch: windows of final values (GET .../lr, 1 s of steps each), then one "
               "POST .../step with the metric at the barrier; POST latency includes waiting for the "
               "run's slowest rank"],
    )
