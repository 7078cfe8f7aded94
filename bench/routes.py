"""Figure 8: every route near the hot path: each route's time against the cached ``GET .../lr``.

One server process on SQLite; one client (``http.client``, one keep-alive connection, the
lightest client there is, so the figure is the server's), sequential requests, the routes
taking turns in rotated rounds. Routes:

- ``lr (cached)``: ``GET .../lr`` of one final step (the hot path: the yardstick);
- ``run``: ``GET /v1/runs/{id}``;
- ``control``: ``POST .../control`` ``{"action": "scale", "factor": 1.0}`` (a durable write);
- ``metrics``: ``POST .../metrics``, one value (a durable write);
- ``history 200``: ``GET .../history?max_points=200`` of a run of 10,000 steps;
- ``history 10k``: the same with ``max_points=10000`` (reported with its cost per point).

Columns: the client's p50 and p99 per route, the server's own mean (its request histogram,
``/metrics``), and the p50 over ``lr (cached)``'s p50 (the target: within 2x).
"""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.hot_path import prepare_runs
from bench.report_decide import server_seconds
from bench.servers import HOST, Pool
from bench.sizes import Size
from bench.stats import median, percentile, rotations

NAME = "routes"
TITLE = "Figure 8: every route near the hot path, against the cached GET .../lr"
TARGET = 2.0
LONG_RUN = 10_000
COLUMNS = [("route", "route"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("server_ms", "server mean ms"),
           ("vs_lr", "p50 / lr p50"), ("per_point_us", "us per point"), ("calls", "calls")]
NEAR = ("run", "control", "metrics", "history 200")


def _routes(run_id: str) -> dict[str, tuple[str, str, Any, str]]:
    """name -> (method, path, body, the route's template in /metrics)."""
    base = f"/v1/runs/{run_id}"
    return {
        "lr (cached)": ("GET", f"{base}/lr?step=5000", None, "/v1/runs/{run_id}/lr"),
        "run": ("GET", base, None, "/v1/runs/{run_id}"),
        "control": ("POST", f"{base}/control", {"action": "scale", "factor": 1.0},
                    "/v1/runs/{run_id}/control"),
        "metrics": ("POST", f"{base}/metrics", None, "/v1/runs/{run_id}/metrics"),
        "history 200": ("GET", f"{base}/history?max_points=200", None, "/v1/runs/{run_id}/history"),
        "history 10k": ("GET", f"{base}/history?max_points={LONG_RUN}", None, "/v1/runs/{run_id}/history"),
    }


def run(size: Size, work: Path, pool: Pool) -> dict[str, Any]:
    del work
    calls = size.report_calls
    with pool.sqlite("routes") as srv:
        (run_id,) = prepare_runs(srv.port, "routes", runs=1, horizon=LONG_RUN)
        routes = _routes(run_id)
        conn = http.client.HTTPConnection(HOST, srv.port, timeout=60)
        step = [0]

        def call(method: str, path: str, body: Any) -> None:
            if path.endswith("/metrics"):
                step[0] += 1
                body = {"records": [{"step": step[0], "name": "loss", "value": 1.0 / step[0], "rank": 0}]}
            data = None if body is None else json.dumps(body)
            headers = {} if data is None else {"Content-Type": "application/json"}
            conn.request(method, path, data, headers)
            answer = conn.getresponse()
            answer.read()
            if answer.status >= 300:
                raise RuntimeError(f"{method} {path}: {answer.status}")

        for method, path, body, _ in routes.values():  # warm-up
            for _ in range(3):
                call(method, path, body)
        times: dict[str, list[float]] = {name: [] for name in routes}
        inside: dict[str, list[float]] = {name: [] for name in routes}
        for order in rotations(list(routes), size.report_rounds):
            for name in order:
                method, path, body, template = routes[name]
                before = server_seconds(srv.port, template, method)
                for _ in range(calls):
                    t0 = time.perf_counter()
                    call(method, path, body)
                    times[name].append((time.perf_counter() - t0) * 1e3)
                after = server_seconds(srv.port, template, method)
                if after[1] > before[1]:
                    inside[name].append((after[0] - before[0]) / (after[1] - before[1]) * 1e3)
        conn.close()
    lr_p50 = median(times["lr (cached)"])
    rows = []
    for name, ms in times.items():
        p50 = median(ms)
        row = {"route": name, "p50_ms": p50, "p99_ms": percentile(ms, 99),
               "server_ms": median(inside[name]) if inside[name] else None,
               "vs_lr": p50 / lr_p50, "calls": len(ms)}
        if name == "history 10k":
            row["per_point_us"] = p50 * 1e3 / LONG_RUN
        rows.append(row)
    worst = max(row["vs_lr"] for row in rows if row["route"] in NEAR)
    return report.figure(
        NAME, TITLE,
        ran=f"`lrserve serve` (SQLite, 1 process); one http.client keep-alive connection, "
            f"sequential requests, {size.report_rounds} rotated rounds x {calls} calls per route; "
            f"a run of {LONG_RUN:,} final steps",
        target=f"p50 of {', '.join(NEAR)} within {TARGET:g}x of the cached GET .../lr (issue 15, target 2)",
        holds=worst <= TARGET, columns=COLUMNS, rows=rows,
        notes=[f"worst of the four: {worst:.2f}x; 'server mean': lrserve's request histogram over the "
               "same calls (the rest is the client and loopback)",
               "history 10k: the cost per point is its p50 over its points"],
    )

