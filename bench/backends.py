"""Figure 5: the hot path on SQLite (1 process) and PostgreSQL (1 and 2 processes), side by side.

Three servers run at once; the load visits them in rotated order each round, so the
three are measured under the same weather. Two loads:

- **final**: ``GET .../lr?step=k`` of final steps near the horizon (the hot path; served
  from memory, the database is not touched once a process has loaded the run);
- **final, old steps** (2 processes only): final steps below the snapshot a worker loaded
  the run from; that worker replays them once per run (its first read of them), then holds
  them (``RunCache.values_between``);
- **commit**: ``GET .../lr?step=n`` where each request asks the next step of one of as
  many runs as connections: every answer makes a new step final, a durable transaction (on PostgreSQL with
  2 processes: row lock on the run, catch up with the other process's entries, append).

"2 processes" is ``lrserve serve --workers 2`` (uvicorn workers sharing the socket). This
machine has 2 cores, shared by the load generator and every process measured.

Where pgbench is installed, the commit load's rounds also run **pgbench** with lrserve's own
commit (``bench.pg_ceiling``: the same statements, pipelined and prepared as lrserve sends
them, as many clients as PostgreSQL x2 has pooled connections, on a schema of its own): the
most commits/s this machine's PostgreSQL gives with no HTTP and no Python, in the same rounds.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from lrserve.service.store import POSTGRES_POOL_SIZE

from bench import pg_ceiling, report
from bench.hot_path import RECENT, final_paths, load_row, paired_ratio, prepare_runs, settled_load
from bench.servers import Pool, pg_problem
from bench.sizes import Size
from bench.stats import rotations

NAME = "backends"
OLD = "final, old steps"
PGBENCH = "pgbench, same commit"
TITLE = "Figure 5: backends, SQLite x1 vs PostgreSQL x1 vs PostgreSQL x2 processes"


def commit_paths(ids: list[str]) -> list[str]:
    """The commit load's paths: each turn of the load asks every run's next step."""
    return [f"/v1/runs/{run_id}/lr?step={{n}}" for run_id in ids]


COLUMNS = [("server", "server"), ("load", "load"), ("rps", "req/s"), ("p50_ms", "p50 ms"),
           ("p99_ms", "p99 ms"), ("vs_sqlite", "vs SQLite x1"), ("requests", "requests"),
           ("errors", "errors")]


def run(size: Size, work: Path, pool: Pool) -> dict[str, Any]:
    problem = pg_problem()
    if problem:
        return report.skipped(NAME, TITLE, problem)
    # pgbench's clients: as many sessions as PostgreSQL x2 commits on at once (its two pools); more
    # would meet the server's max_connections beside the three servers' pools (and other users')
    variant = pg_ceiling.Variant(min(size.load_connections, 2 * POSTGRES_POOL_SIZE))
    ceiling = (pg_ceiling.commit_schema(variant.clients) if pg_ceiling.pgbench_path()
               else contextlib.nullcontext(""))
    with pool.sqlite("backends") as sqlite, pool.postgres() as pg, ceiling as bench_url:
        servers = {"SQLite x1": sqlite, "PostgreSQL x1": pg[1], "PostgreSQL x2": pg[2]}
        commit_runs = max(8, size.load_connections)
        paths: dict[tuple[str, str], list[list[str]]] = {}
        for label, server in servers.items():
            tag = label.split()[0].lower() + label[-1]
            ids = prepare_runs(server.port, f"be-{tag}", runs=size.hot_runs)
            paths[(label, "final")] = [final_paths(ids)] * size.load_rounds
            if server.workers > 1:
                paths[(label, OLD)] = [final_paths(ids, low=0, high=RECENT)] * size.load_rounds
            paths[(label, "commit")] = [
                commit_paths(prepare_runs(server.port, f"bc-{tag}-{r}", runs=commit_runs, horizon=0))
                for r in range(size.load_rounds + 1)  # one set for the warm-up
            ]
        for (label, kind), sets in paths.items():  # warm-up: every worker loads the runs
            if size.load_warmup_s and kind != OLD:
                warm = sets[-1] if kind == "commit" else sets[0]
                settled_load(servers[label], warm, size, size.load_warmup_s)
        results: dict[tuple[str, str], list[dict[str, Any]]] = {key: [] for key in paths}
        if bench_url:
            results[(PGBENCH, "commit")] = []
        labels = [*servers, PGBENCH] if bench_url else list(servers)
        for kinds in (("final", "commit"), (OLD,)):  # old steps last: their replays queue up
            for r, order in enumerate(rotations(labels, size.load_rounds)):
                for kind in kinds:
                    for label in order:
                        if label == PGBENCH and kind == "commit":
                            found = pg_ceiling.run(bench_url, variant, size.load_seconds)
                            results[(label, kind)].append(found)
                        elif (label, kind) in paths:
                            paths_now = paths[(label, kind)][r]
                            results[(label, kind)].append(
                                settled_load(servers[label], paths_now, size, size.load_seconds))
    rows = []
    for (label, kind), rounds in results.items():
        row = {"server": label, **load_row(kind, rounds)}
        row["load"] = row.pop("target")
        base = results[("SQLite x1", "final" if kind.startswith("final") else kind)]
        row["vs_sqlite"] = paired_ratio(rounds, base)
        rows.append(row)
    rows.sort(key=lambda row: (["final", "commit"].index(row["load"]) if row["load"] in ("final", "commit")
                               else 2, row["server"]))
    errors = sum(row["errors"] for row in rows)
    tool = next(iter(results.values()))[0]["tool"]
    notes = []
    if bench_url:
        pgbench = results[(PGBENCH, "commit")]
        x1, x2 = (paired_ratio(results[(f"PostgreSQL x{w}", "commit")], pgbench) for w in (1, 2))
        notes.append(
            f"{PGBENCH}: pgbench -M prepared, lrserve's two pipelined flushes, {variant.clients} "
            f"clients (at most PostgreSQL x2's {2 * POSTGRES_POOL_SIZE} pooled connections), -j1, "
            f"{max(1, round(size.load_seconds))} s per round (bench.pg_ceiling); "
            f"PostgreSQL x2 / pgbench {x2:.2f}, x1 / pgbench {x1:.2f} (same rounds)")
    return report.figure(
        NAME, TITLE,
        ran=f"`lrserve serve` x3 at once (SQLite; PostgreSQL; PostgreSQL --workers 2, one "
            f"database), {tool} 1 thread, {size.load_connections} keep-alive connections, "
            f"{size.load_rounds} rounds x {size.load_seconds:g} s per server and load, rotated order; "
            "2 cores shared by the load generator and all processes",
        target="side by side in one run, zero errors (the issue sets no number)",
        holds=errors == 0, columns=COLUMNS, rows=rows,
        notes=[*notes, "commit: every request makes one new step final (durable before the answer)",
               f"final: steps {RECENT}.. near the horizon; 'final, old steps': steps 0..{RECENT - 1}, below "
               "the snapshot the second worker loaded the runs from, so that worker replays them once per "
               "run (its first read of them) and holds them after (the first worker computed them and "
               "holds them); compared with SQLite x1's final"],
    )
