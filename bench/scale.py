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
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.hot_path import prepare_runs
from bench.servers import Pool, Server, compile_tree, pg_problem, sqlite_url
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


BARRIER_AFTER_LAST_MS = 50.0
"""Target 4 (issue 15): a barrier's answers, p50, after its last rank's report was sent."""
ALL_P99_MS = 500.0
"""Target 4: p99 of all the ranks' requests."""
READY_OVER_TORCH_S = 0.5
"""Target 8 (issue 15): ``lrserve serve`` to a ready ``/readyz`` within ``import torch`` + this."""


def _import_torch() -> float:
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - began


def _cold_start(big_db: str, small_db: str | None, first_run: str, work: Path,
                size: Size) -> tuple[list[dict[str, Any]], bool]:
    """Rotated rounds of: ``import torch`` alone; spawn to a ready ``/readyz``; spawn to the
    first answer of a run on disk (its engine built: torch's lazy imports included)."""
    path = f"/v1/runs/{first_run}/lr?step=5"
    variants = ["torch", "ready", "big", "small"] if small_db else ["torch", "ready", "big"]
    compile_tree()  # what an install has; torch's bytecode came with its own
    times: dict[str, list[float]] = {v: [] for v in variants}
    rss: dict[str, list[float]] = {v: [] for v in variants}
    for order in rotations(variants, size.scale_cold_rounds):
        for which in order:
            if which == "torch":
                times[which].append(_import_torch())
                continue
            server = Server(big_db if which != "small" else small_db, work, name=f"cold-{which}")
            try:
                server.spawn()
                times[which].append(server.first_answer("/readyz" if which == "ready" else path))
                rss[which].append(server.rss_bytes() / 2**20)
            finally:
                server.stop()
    torch_s, ready_s = median(times["torch"]), median(times["ready"])
    rows = [{"what": "cold start: `python -c 'import torch'` (the yardstick)", "value": torch_s, "unit": "s",
             "rss_mb": None, "detail": f"median of {len(times['torch'])}; max {max(times['torch']):.2f} s",
             "errors": 0},
            {"what": "cold start to a ready /readyz (target: import torch + 0.5 s)", "value": ready_s,
             "unit": "s", "rss_mb": median(rss["ready"]),
             "detail": f"import torch {ready_s - torch_s:+.2f} s; median of {len(times['ready'])}",
             "errors": 0}]
    rows += [
        {"what": f"cold start to first answer, {label}", "value": median(times[which]), "unit": "s",
         "rss_mb": median(rss[which]),
         "detail": f"median of {len(times[which])}; max {max(times[which]):.2f} s", "errors": 0}
        for which, label in (("big", "all runs on disk"), ("small", "1 run on disk")) if which in times
    ]
    return rows, ready_s <= torch_s + READY_OVER_TORCH_S


def _ranks(size: Size, server: Server, prefix: str = "ranks") -> dict[str, Any]:
    for _ in range(2 * server.workers - 1):  # the first run's one-time imports, in every worker
        prepare_runs(server.port, f"{prefix}-warm", runs=1, horizon=10)
    timeout = size.rank_epochs * size.rank_epoch_s * 10 + 120
    return _driver("ranks", "--port", str(server.port), "--runs", str(size.rank_runs),
                   "--ranks", str(size.ranks), "--epochs", str(size.rank_epochs), "--prefix", prefix,
                   "--epoch-s", str(size.rank_epoch_s), "--timeout", str(timeout), timeout=timeout + 30)


def _ranks_on_postgres(size: Size, pool: Pool) -> dict[str, Any] | None:
    """The same ranks against PostgreSQL with two worker processes (None without PostgreSQL)."""
    if pg_problem() is not None:
        return None
    with pool.postgres() as pg:
        return _ranks(size, pg[2], prefix="ranks-pg")


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
    cold_holds = True
    if size.scale_cold_rounds:
        cold_rows, cold_holds = _cold_start(big_db, small_db, "warm-0", work, size)
        rows += cold_rows
    with pool.sqlite("ranks") as server:
        ranks = _ranks(size, server)
    pg_ranks = _ranks_on_postgres(size, pool)
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
    rows.append({"what": "ranks: barrier answer after the last rank's report p50 / p99",
                 "value": ranks["after_last_p50_ms"], "unit": "ms", "rss_mb": None, "errors": None,
                 "detail": f"p99 {ranks['after_last_p99_ms']:.1f} ms; from the last rank's send to each "
                           f"rank's answer (target p50 <= {BARRIER_AFTER_LAST_MS:g} ms)"})
    rows.append({"what": "ranks: steps where ranks got different values", "value": ranks["divergent_steps"],
                 "unit": "steps", "rss_mb": None, "errors": None,
                 "detail": f"of {ranks['decided_steps']} decided (run, step) pairs"})
    extra["ranks"] = ranks
    if pg_ranks is not None:
        extra["ranks_postgres_x2"] = pg_ranks
        rows.append({"what": "ranks on PostgreSQL x2: barrier answer after the last report p50 / p99",
                     "value": pg_ranks["after_last_p50_ms"], "unit": "ms", "rss_mb": None,
                     "errors": pg_ranks["errors"],
                     "detail": f"p99 {pg_ranks['after_last_p99_ms']:.1f} ms; barrier POST p50 "
                               f"{pg_ranks['post_p50_ms']:.0f} ms; {pg_ranks['divergent_steps']} divergent "
                               f"of {pg_ranks['decided_steps']}"})
        rows.append({"what": "ranks on PostgreSQL x2: p99 all requests", "value": pg_ranks["all_p99_ms"],
                     "unit": "ms", "rss_mb": None, "errors": None,
                     "detail": f"{pg_ranks['requests']:,} requests in {pg_ranks['seconds']:.1f} s; "
                               f"creates p50 {pg_ranks['create_p50_ms']:.0f} ms, "
                               f"windows p50 {pg_ranks['get_p50_ms']:.0f} ms"})
    populate_errors = sum(r["errors"] or 0 for r in rows if r["what"].startswith("memory"))
    holds = populate_errors == 0 and cold_holds and all(
        r["errors"] == 0 and r["divergent_steps"] == 0 and r["after_last_p50_ms"] <= BARRIER_AFTER_LAST_MS
        and r["all_p99_ms"] <= ALL_P99_MS for r in (ranks, pg_ranks) if r is not None)
    return report.figure(
        NAME, TITLE,
        ran="`lrserve serve`, 1 process, SQLite (the ranks also on PostgreSQL, --workers 2); "
            "drivers in a separate process (asyncio, "
            "keep-alive, 1 connection per rank); RSS = VmRSS from /proc",
        target=f"ranks: zero errors and identical values on every rank, barrier answer p50 <= "
               f"{BARRIER_AFTER_LAST_MS:g} ms after the last report, p99 of all requests <= "
               f"{ALL_P99_MS:g} ms; "
               f"cold start to /readyz <= import torch + {READY_OVER_TORCH_S:g} s; memory reported",
        holds=holds, columns=COLUMNS, rows=rows, extra=extra,
        notes=["ranks per epoch: windows of final values (GET .../lr, 1 s of steps each), then one "
               "POST .../step with the metric at the barrier; POST latency includes waiting for the "
               "run's slowest rank"],
    )
