"""Figure 2: the server's hot path against the ceiling of its own stack.

One server process (lrserve's app plus ``GET /bench/ping``, see ``bench._app``) on SQLite.
Runs are stepped ahead first, so every ``GET .../lr?step=k`` asks for a final value:
the path a training job's window fetches take. The same keep-alive load (wrk, or the
asyncio fallback) hits, in rotated order each round:

- ``ping``: an ``async`` route returning a constant JSON body: the ceiling of the stack;
- ``healthz``: ``GET /healthz``, a plain ``def`` route (FastAPI runs it in a thread);
- ``lr``: ``GET /v1/runs/{id}/lr?step=k``, one final step, over many runs and steps;
- ``lr window``: the same with ``ahead=99`` (100 steps per answer, as clients ask).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import report
from bench.loadgen import load, wrk_path
from bench.servers import Pool, Server, http_get
from bench.sizes import Size
from bench.stats import median, rotations

NAME = "hot_path"
TITLE = "Figure 2: server hot path, GET .../lr of final steps vs the stack's ceiling"
TARGET = 0.8
RUNS = 16
HORIZON = 2500
RECENT = 2000  # final steps asked are in RECENT..HORIZON: near the horizon, as jobs ask
SCHEDULE = {"type": "SequentialLR", "milestones": [100], "schedulers": [
    {"type": "LinearLR", "start_factor": 0.1, "total_iters": 100},
    {"type": "CosineAnnealingLR", "T_max": 100_000}]}


def prepare_runs(port: int, prefix: str, runs: int = RUNS, horizon: int = HORIZON,
                 groups: int = 1) -> list[str]:
    """Create ``runs`` runs and make steps 0..horizon final; their ids."""
    import httpx

    ids = [f"{prefix}-{i}" for i in range(runs)]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60.0) as http:
        for run_id in ids:
            body = {"run_id": run_id, "base_lrs": [0.1] * groups, "schedule": SCHEDULE}
            http.post("/v1/runs", json=body).raise_for_status()
            http.get(f"/v1/runs/{run_id}/lr", params={"step": 0, "ahead": horizon}).raise_for_status()
    return ids


def final_paths(ids: list[str], low: int = RECENT, high: int = HORIZON, ahead: int = 0,
                count: int = 512) -> list[str]:
    """Paths of final steps in ``low..high`` spread over the runs (wrk cycles through them).

    Near the horizon by default: that is what training jobs ask. A process serves steps
    below the snapshot it loaded a run from by replaying them (figure 5 shows that cost).
    """
    paths = []
    for i in range(count):
        step = low + (i * 7919) % max(1, high - ahead - low)
        suffix = f"&ahead={ahead}" if ahead else ""
        paths.append(f"/v1/runs/{ids[i % len(ids)]}/lr?step={step}{suffix}")
    return paths


def settled_load(server: Server, paths: list[str], size: Size, seconds: float) -> dict[str, Any]:
    """One load, then wait for the server to go idle (nothing queued spills into the next)."""
    result = load(server.port, paths, connections=size.load_connections, duration_s=seconds)
    server.settle()
    return result


def measure_loads(server: Server, targets: dict[str, list[str]],
                  size: Size) -> dict[str, list[dict[str, Any]]]:
    """Warm each target up once, then load them in rotated order for ``load_rounds`` rounds."""
    for paths in targets.values():
        if size.load_warmup_s:
            settled_load(server, paths, size, size.load_warmup_s)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    for order in rotations(list(targets), size.load_rounds):
        for name in order:
            results[name].append(settled_load(server, targets[name], size, size.load_seconds))
    return results


def load_row(name: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "target": name,
        "rps": median([r["rps"] for r in rounds]),
        "p50_ms": median([r["p50_ms"] for r in rounds]),
        "p99_ms": median([r["p99_ms"] for r in rounds]),
        "requests": sum(r["requests"] for r in rounds),
        "errors": sum(r["errors"] for r in rounds),
    }


def paired_ratio(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
    """Median over rounds of a's requests/s over b's in the same round."""
    return median([x["rps"] / y["rps"] for x, y in zip(a, b, strict=True) if y["rps"]])


COLUMNS = [("target", "target"), ("rps", "req/s"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
           ("vs_ping", "vs ping"), ("vs_healthz", "vs healthz"), ("requests", "requests"),
           ("errors", "errors")]


def run(size: Size, work: Path, pool: Pool) -> dict[str, Any]:
    with pool.sqlite("hot_path", app="bench") as server:
        ids = prepare_runs(server.port, "hot", runs=size.hot_runs)
        status, body = http_get(server.port, final_paths(ids)[1])
        assert status == 200, body
        targets = {
            "ping": ["/bench/ping"],
            "healthz": ["/healthz"],
            "lr": final_paths(ids),
            "lr window": final_paths(ids, ahead=99),
        }
        results = measure_loads(server, targets, size)
    rows = []
    for name, rounds in results.items():
        row = load_row(name, rounds)
        row["vs_ping"] = paired_ratio(rounds, results["ping"])
        row["vs_healthz"] = paired_ratio(rounds, results["healthz"])
        rows.append(row)
    lr = next(r for r in rows if r["target"] == "lr")
    tool = results["lr"][0]["tool"]
    return report.figure(
        NAME, TITLE,
        ran=f"bench app (lrserve + GET /bench/ping) under uvicorn, 1 process, SQLite; {tool} "
            f"(1 thread), {size.load_connections} keep-alive connections, {size.load_rounds} rounds x "
            f"{size.load_seconds:g} s per target in rotated order; {size.hot_runs} runs, "
            f"final steps {RECENT}..{HORIZON}",
        target=f"lr req/s >= {TARGET} x the ceiling (ping, an async no-op route on the same stack)",
        holds=lr["vs_ping"] >= TARGET,
        columns=COLUMNS, rows=rows,
        notes=[
            "medians over rounds; p50/p99 are the load generator's per-round percentiles (median of rounds)",
            "healthz is a sync route (runs in FastAPI's thread pool), so it is a lower bar than ping",
            f"load generator: {_tool_name(tool)}; it shares the 2 cores with the server",
        ],
    )


def _tool_name(tool: str) -> str:
    return f"wrk ({wrk_path()})" if tool == "wrk" else "python asyncio (bench.loadgen)"
