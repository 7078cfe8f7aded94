"""Figure 5's commit load on PostgreSQL, two versions of lrserve side by side.

``python -m bench.commit_ab OTHER [--rounds 6] [--seconds 5] [--workers 2] [--connections 32]``
starts one PostgreSQL server (``--workers`` processes, one schema each, in the database of
``$LRSERVE_BENCH_PG`` or the default bench URL) from this checkout ("this") and one from
``OTHER``, the root of another checkout ("other", e.g. ``git archive main | tar -x -C
/tmp/base``), and runs the commit load (``GET .../lr?step=n``, each request making a new step
final, over as many runs as connections; a fresh set of runs per round) on each in rotated
rounds. Per round and median over rounds: req/s, p50, **the server's CPU per commit** and
**the database sessions' CPU per commit** (every session on the database: use a database of
your own, so that only these servers' sessions count), and PostgreSQL's own counters per
commit (``pg_stat_database``: transactions, tuples fetched and updated).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
import uuid
from pathlib import Path
from typing import Any

from bench.backends import commit_paths
from bench.hot_path import prepare_runs
from bench.loadgen import load
from bench.pg_ceiling import SessionCpu
from bench.servers import Server, pg_base_url, workdir
from bench.stats import median, rotations

TREES = ("this", "other")
_COUNTERS = ("xact_commit", "tup_fetched", "tup_updated")


def _counters(conn: Any, database: str) -> dict[str, int]:
    row = conn.execute(f"SELECT {', '.join(_COUNTERS)} FROM pg_stat_database WHERE datname = %s",
                       (database,)).fetchone()
    return dict(zip(_COUNTERS, row, strict=True))


def main(argv: list[str] | None = None) -> None:
    import psycopg
    from sqlalchemy import make_url

    parser = argparse.ArgumentParser(prog="python -m bench.commit_ab", description=__doc__)
    parser.add_argument("other", type=Path, help="the root of another checkout of the repository")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args(argv)
    base = make_url(pg_base_url())
    database = base.database or "postgres"
    libpq = base.set(drivername="postgresql", query={}).render_as_string(hide_password=False)
    admin = psycopg.connect(libpq, autocommit=True)
    schemas = {tree: f"lrserve_ab_{uuid.uuid4().hex[:10]}" for tree in TREES}
    servers: dict[str, Server] = {}
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(workdir())
        stack.callback(_cleanup, admin, servers, schemas)
        for tree, schema in schemas.items():
            admin.execute(f'CREATE SCHEMA "{schema}"')
            url = base.update_query_dict({"options": f"-csearch_path={schema}"})
            servers[tree] = Server(url.render_as_string(hide_password=False), work, workers=args.workers,
                                   tree=args.other if tree == "other" else None, name=f"ab-{tree}").spawn()
        paths: dict[str, list[list[str]]] = {}
        for tree, server in servers.items():
            server.wait_ready()
            paths[tree] = [commit_paths(prepare_runs(server.port, f"ab{r}", runs=args.connections, horizon=0))
                           for r in range(args.rounds + 1)]
            load(server.port, paths[tree][-1], connections=args.connections, duration_s=2)  # warm-up
        print(f"PostgreSQL x{args.workers}, {args.connections} connections, {args.seconds:g} s per round; "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        rows: dict[str, list[dict[str, float]]] = {tree: [] for tree in TREES}
        for r, order in enumerate(rotations(list(TREES), args.rounds)):
            for tree in order:
                server = servers[tree]
                time.sleep(0.5)
                sessions, before, cpu = SessionCpu(database), _counters(admin, database), server.cpu_seconds()
                found = load(server.port, paths[tree][r], connections=args.connections,
                             duration_s=args.seconds)
                cpu = server.cpu_seconds() - cpu
                time.sleep(0.3)  # the statistics collector's counters
                after, db_cpu = _counters(admin, database), sessions.seconds()
                n = max(int(found["requests"]), 1)
                row = {"rps": found["rps"], "p50_ms": found["p50_ms"], "server_us": 1e6 * cpu / n,
                       "sessions_us": 1e6 * db_cpu / n, **{k: (after[k] - before[k]) / n for k in _COUNTERS},
                       "errors": found.get("errors", 0), "load": os.getloadavg()[0]}
                rows[tree].append(row)
                shown = "  ".join(f"{k} {v:.2f}" for k, v in row.items())
                print(f"round {r} {tree:>5}: {shown}", flush=True)
        for tree in TREES:
            keys = ("rps", "p50_ms", "server_us", "sessions_us", *_COUNTERS)
            shown = "  ".join(f"{k} {median([x[k] for x in rows[tree]]):.2f}" for k in keys)
            print(f"median {tree:>5}: {shown}")
        ratios = [a["rps"] / b["rps"] for a, b in zip(rows["this"], rows["other"], strict=True)]
        shown = ", ".join(f"{x:.2f}" for x in ratios)
        print(f"this / other req/s per round: {shown}; median {median(ratios):.2f}")


def _cleanup(admin: Any, servers: dict[str, Server], schemas: dict[str, str]) -> None:
    for server in servers.values():
        server.stop()
    for schema in schemas.values():
        admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    admin.close()


if __name__ == "__main__":
    main()
