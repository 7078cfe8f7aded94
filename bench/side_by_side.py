"""Two versions of lrserve side by side: figure 3's report-and-decide and figure 8's writes.

``python -m bench.side_by_side OTHER [--rounds 9] [--calls 150] [--json PATH]`` starts one
SQLite server from this checkout ("this") and one from ``OTHER``, the root of another checkout
of the repository ("other", e.g. ``git worktree add /tmp/base main``), and Optuna's gRPC proxy
on ``InMemoryStorage`` when Optuna is installed (figure 3's yardstick). The variants take turns
in rotated rounds of sequential calls from this one process:

- ``step``: ``POST .../step`` with the watched metric through ``LRClient`` (figure 3), on a run
  at step 1,000 and on one at step 100,000 (target 3), and through ``http.client`` (the
  lightest client: the server's share);
- ``lr`` / ``control`` / ``metrics``: figure 8's cached ``GET .../lr``, ``POST .../control``
  and ``POST .../metrics`` through ``http.client``.

Per variant: p50 and p99 of the calls, this process's CPU per call, the server's request
histogram (``/metrics``) and **the server's CPU and run-queue wait per request**
(``Server.scheduled_ns``: on a busy machine the p50 is mostly the wait for a core; the CPU
is what the code costs). ``python -m bench`` measures one tree; this compares two.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.hot_path import prepare_runs
from bench.report_decide import LONG, SHORT, lrserve_caller, optuna_caller, optuna_proxy, server_seconds
from bench.servers import HOST, Server, scheduled_between, sqlite_url, workdir
from bench.stats import median, percentile, rotations

STEP = "/v1/runs/{run_id}/step"
TREES = ("this", "other")


class _Connection:
    """One ``http.client`` keep-alive connection that reconnects when the server closed it
    while idle (between rounds)."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection(HOST, port, timeout=60)

    def call(self, method: str, path: str, body: Any = None) -> None:
        data = None if body is None else json.dumps(body)
        headers = {} if data is None else {"Content-Type": "application/json"}
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, data, headers)
                answer = self.conn.getresponse()
                answer.read()
                break
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
                self.conn.close()
                if attempt:
                    raise
        if answer.status >= 300:
            raise RuntimeError(f"{method} {path}: {answer.status}")

    def close(self) -> None:
        self.conn.close()


def _raw_step(port: int, url: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    """``POST .../step`` with the metric through ``http.client`` on a new plateau run."""
    from lrserve.client import LRClient

    run_id = f"raw-{uuid.uuid4().hex[:8]}"
    with contextlib.closing(LRClient(url)) as api:
        api.create_run({"type": "ReduceLROnPlateau", "factor": 0.5, "patience": 2}, [0.1], run_id=run_id)
    conn = _Connection(port)

    def call(k: int) -> None:
        conn.call("POST", f"/v1/runs/{run_id}/step", {"step": k, "metrics": {"val_loss": 1.0 / (1 + k % 13)}})

    return call, conn.close


def _route_callers(port: int, run_id: str) -> dict[str, tuple[Callable[[int], None], str, str]]:
    """Figure 8's cached lr, control and metrics: name -> (call, method, route template)."""
    conn = _Connection(port)
    base = f"/v1/runs/{run_id}"
    return {
        "lr (cached)": (lambda k: conn.call("GET", f"{base}/lr?step=5000"), "GET", "/v1/runs/{run_id}/lr"),
        "control": (lambda k: conn.call("POST", f"{base}/control", {"action": "scale", "factor": 1.0}),
                    "POST", "/v1/runs/{run_id}/control"),
        "metrics": (lambda k: conn.call("POST", f"{base}/metrics", {"records": [
            {"step": k, "name": "loss", "value": 1.0 / k, "rank": 0}]}), "POST", "/v1/runs/{run_id}/metrics"),
    }


def _measure(callers: dict[str, tuple[Callable[[int], None], Server | None, str, str]], rounds: int,
             calls: int) -> list[dict[str, Any]]:
    """Rotated rounds over ``callers`` (name -> (call, its server or None, method, template))."""
    step = dict.fromkeys(callers, 0)
    for name, (call, *_) in callers.items():  # warm-up: connections, caches
        for _ in range(5):
            step[name] += 1
            call(step[name])
    times: dict[str, list[float]] = {name: [] for name in callers}
    inside: dict[str, list[float]] = {name: [] for name in callers}
    spent = {name: [0, 0, 0.0] for name in callers}  # server on-CPU ns, server waiting ns, client CPU s
    for order in rotations(list(callers), rounds):
        for name in order:
            call, server, method, template = callers[name]
            before = server.scheduled_ns() if server else {}
            seen = server_seconds(server.port, template, method) if server else (0.0, 0.0)
            cpu = time.process_time()
            for _ in range(calls):
                step[name] += 1
                t0 = time.perf_counter()
                call(step[name])
                times[name].append((time.perf_counter() - t0) * 1e3)
            spent[name][2] += time.process_time() - cpu
            if server is not None:
                on_cpu, waiting = scheduled_between(before, server.scheduled_ns())
                spent[name][0] += on_cpu
                spent[name][1] += waiting
                total, count = server_seconds(server.port, template, method)
                if count > seen[1]:
                    inside[name].append((total - seen[0]) / (count - seen[1]) * 1e3)
    rows = []
    for name, ms in times.items():
        n = len(ms)
        has_server = callers[name][1] is not None
        rows.append({"variant": name, "p50_ms": median(ms), "p99_ms": percentile(ms, 99),
                     "server_mean_ms": median(inside[name]) if inside[name] else None,
                     "server_cpu_us": spent[name][0] / n / 1e3 if has_server else None,
                     "server_wait_us": spent[name][1] / n / 1e3 if has_server else None,
                     "client_cpu_us": spent[name][2] / n * 1e6, "calls": n})
    return rows


def run(other: Path, rounds: int, calls: int) -> dict[str, Any]:
    load = os.getloadavg()
    with workdir("lrserve-side-") as work, contextlib.ExitStack() as stack:
        servers: dict[str, Server] = {}
        for tree in TREES:
            server = Server(sqlite_url(work, tree), work, name=tree, tree=other if tree == "other" else None)
            stack.enter_context(server)
            servers[tree] = server
        decide: dict[str, tuple[Callable[[int], None], Server | None, str, str]] = {}
        try:
            import grpc  # noqa: F401
            import optuna  # noqa: F401
        except ImportError as exc:
            print(f"(no Optuna with gRPC: {exc}; its row is left out)")
        else:
            port = stack.enter_context(optuna_proxy("memory", work))
            call, close = optuna_caller(port, 10)
            stack.callback(close)
            decide["optuna gRPC (in-memory)"] = (call, None, "", "")
        for tree, server in servers.items():
            for start in (SHORT, LONG):
                call, close = lrserve_caller(server.url, start)
                stack.callback(close)
                decide[f"{tree}: step, run at {start:,}"] = (call, server, "POST", STEP)
            call, close = _raw_step(server.port, server.url)
            stack.callback(close)
            decide[f"{tree}: step, http.client"] = (call, server, "POST", STEP)
        figure3 = _measure(decide, rounds, calls)
        routes: dict[str, tuple[Callable[[int], None], Server | None, str, str]] = {}
        for tree, server in servers.items():
            (run_id,) = prepare_runs(server.port, f"routes-{tree}", runs=1, horizon=10_000)
            for name, (call, method, template) in _route_callers(server.port, run_id).items():
                routes[f"{tree}: {name}"] = (call, server, method, template)
        figure8 = _measure(routes, rounds, calls)
    return {"other": str(other), "rounds": rounds, "calls": calls, "load_before": load,
            "load_after": os.getloadavg(), "report_decide": figure3, "routes": figure8}


def _print(result: dict[str, Any]) -> None:
    print(f"this tree vs {result['other']}: {result['rounds']} rotated rounds x {result['calls']} calls; "
          f"load {result['load_before'][0]:.1f} -> {result['load_after'][0]:.1f}")
    columns = {"p50_ms": ".3f", "p99_ms": ".2f", "server_mean_ms": ".3f", "server_cpu_us": ".0f",
               "server_wait_us": ".0f", "client_cpu_us": ".0f"}
    for figure in ("report_decide", "routes"):
        print(f"== {figure}")
        print(f"{'variant':34s}" + "".join(f"{c:>16s}" for c in columns))
        for row in result[figure]:
            cells = "".join(f"{'-' if row[c] is None else format(row[c], spec):>16s}"
                            for c, spec in columns.items())
            print(f"{row['variant']:34s}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="the root of another checkout of the repository")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=150)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    result = run(args.other.resolve(), args.rounds, args.calls)
    _print(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
