"""Where the server's time goes under the bench's loads: py-spy samples, summed by function.

``python -m bench.profile [--seconds S] [--out DIR] [--only NAME ...]`` starts a server per
scenario, attaches ``py-spy record`` (raw, collapsed stacks; ``--nonblocking``, so the
server is never paused) while a load runs, and prints the top functions by self and by
inclusive share of the samples. Scenarios:

- ``hot_path``: figure 2's load (``GET .../lr`` of final steps, keep-alive, wrk);
- ``client_step``: figure 1's clients (``RemoteScheduler`` loops, one per schedule);
- ``report``: figure 3's lrserve side (sequential ``POST .../step`` with a metric);
- ``commit``: figure 5's commit load (``GET .../lr?step=n``, each request makes one new step
  of one of 32 runs final, 32 keep-alive connections);
- ``ranks``: figure 4's simulated ranks (windows + metric barrier);
- ``run_read``: figure 8's ``GET /v1/runs/{id}``, sequential, one keep-alive connection;
- ``history``: figure 8's ``GET .../history?max_points=200`` of a 10,000-step run with
  metrics and operator actions on it (as figure 8 leaves it), sequential;
- ``control``, ``metrics``: figure 8's ``POST .../control`` (``scale`` by 1.0) and
  ``POST .../metrics`` (one record a call) on that run, sequential.

py-spy is a dev tool (``pip install py-spy``); without it the command says so and stops.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.servers import Server, sqlite_url, workdir

# Leaf frames of threads that wait for work: the thread pool's idle workers. They are
# counted apart, so the shares below are of the samples where the server did something.
IDLE_LEAVES = ("Condition.wait (threading.py)", "Event.wait (threading.py)", "Queue.get (queue.py)")


def py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else None


def summarise(collapsed: str, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output.

    Frames look like ``func (path/file.py:line)``; the line is dropped so a function is one
    entry. Inclusive counts a function once per sample however deep it recurs. Samples of
    idle pool threads are left out. ``Runner.run`` as a leaf is the event loop inside C
    (uvloop, httptools: parsing, sockets) or waiting for I/O: py-spy sees no Python there.
    """
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_function(f) for f in stack.split(";")]
        if frames[-1] in IDLE_LEAVES:
            idle += n
            continue
        total += n
        self_counts[frames[-1]] += n
        for name in set(frames):
            incl_counts[name] += n

    def share(counter: collections.Counter[str]) -> list[list[Any]]:
        return [[name, round(100.0 * c / total, 1)] for name, c in counter.most_common(top)] if total else []

    ours = collections.Counter({k: v for k, v in incl_counts.items() if "(service/" in k})
    layers: collections.Counter[str] = collections.Counter()
    for name, n in self_counts.items():
        layers[_layer(name)] += n
    return {"samples": total, "idle_samples": idle, "self": share(self_counts),
            "inclusive": share(incl_counts), "service_inclusive": share(ours), "layers": share(layers)}


LAYERS = (
    ("(service/", "lrserve (service/)"),
    ("(sqlalchemy/", "SQLAlchemy + sqlite3/psycopg"), ("(sqlite3/", "SQLAlchemy + sqlite3/psycopg"),
    ("(psycopg", "SQLAlchemy + sqlite3/psycopg"),
    ("(torch/", "torch"),
    ("(fastapi/", "FastAPI + Starlette"), ("(starlette/", "FastAPI + Starlette"),
    ("(pydantic", "pydantic"),
    ("(uvicorn/", "uvicorn (HTTP, socket writes)"),
    ("Runner.run (asyncio/runners.py)", "event loop in C (uvloop, httptools) or waiting"),
    ("(anyio/", "anyio (thread pool hand-off)"), ("(threading.py)", "threads (locks, hand-off)"),
    ("(json/", "json"), ("(orjson", "json"),
    ("(<frozen importlib", "imports (one-time)"),
)


def _layer(function: str) -> str:
    for marker, layer in LAYERS:
        if marker in function:
            return layer
    return "other (stdlib, sympy, ...)"


def _function(frame: str) -> str:
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})" if path else name


def record(pid: int, out: Path, seconds: float, load: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
    """Sample ``pid`` while ``load()`` runs (at most ``seconds``); the summary and load's result."""
    spy = py_spy()
    assert spy is not None
    raw = out.with_suffix(".txt")
    proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw",
                             "--output", str(raw), "--duration", str(int(seconds)), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # let py-spy attach
    result = load()
    proc.wait(timeout=seconds + 30)
    text = raw.read_text() if raw.exists() else ""
    return summarise(text), result


def _warm(server: Server) -> None:
    """One run created and stepped first: the one-time imports (torch's on the first
    optimizer) are not what the profile is about."""
    from bench.hot_path import prepare_runs

    prepare_runs(server.port, "warm", runs=1, horizon=10)


def _hot_path(server: Server, seconds: float) -> Any:
    from bench.hot_path import final_paths, prepare_runs
    from bench.loadgen import load

    ids = prepare_runs(server.port, "prof")
    return lambda: load(server.port, final_paths(ids), connections=64, duration_s=seconds - 2)


def _client_step(server: Server, seconds: float) -> Any:
    import warnings

    from bench.client_step import SCHEDULES, _optimizer, tick

    def go() -> dict[str, Any]:
        from lrserve.client import RemoteScheduler

        steps = 0
        deadline = time.monotonic() + seconds - 2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            while time.monotonic() < deadline:
                for name in SCHEDULES:
                    opt = _optimizer(10)
                    remote = RemoteScheduler(opt, SCHEDULES[name], url=server.url,
                                             steps_per_epoch=1 if name == "plateau" else None)
                    step = tick(name, remote)
                    for _ in range(1000):
                        time.sleep(0.0001)
                        opt.step()
                        step()
                        steps += 1
                    remote.close()
        return {"steps": steps}

    return go


def _commit(server: Server, seconds: float) -> Any:
    from bench.backends import commit_paths
    from bench.hot_path import prepare_runs
    from bench.loadgen import load

    paths = commit_paths(prepare_runs(server.port, "prof-commit", runs=32, horizon=0))
    return lambda: load(server.port, paths, connections=32, duration_s=seconds - 2)


def _report(server: Server, seconds: float) -> Any:
    from bench.report_decide import lrserve_caller

    def go() -> dict[str, Any]:
        call, close = lrserve_caller(server.url)
        k = 0
        deadline = time.monotonic() + seconds - 2
        while time.monotonic() < deadline:
            k += 1
            call(k)
        close()
        return {"calls": k}

    return go


def _ranks(server: Server, seconds: float) -> Any:
    def go() -> Any:
        cmd = [sys.executable, "-m", "bench.drivers", "ranks", "--port", str(server.port), "--runs", "20",
               "--ranks", "200", "--epochs", "2", "--epoch-s", "2"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120, check=True,
                             cwd=Path(__file__).resolve().parent.parent)
        return json.loads(out.stdout)

    return go


def _sequential_get(server: Server, seconds: float, path: str) -> Any:
    """``GET path`` one at a time on one ``http.client`` keep-alive connection (figure 8's client)."""
    return _sequential(server, seconds, "GET", path, lambda k: None)


def _sequential(
    server: Server, seconds: float, method: str, path: str, body: Callable[[int], Any]
) -> Any:
    """``method path`` with ``body(k)`` as JSON (None: none) one at a time on one ``http.client``
    keep-alive connection (figure 8's client)."""
    import http.client

    def go() -> dict[str, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        calls = 0
        deadline = time.monotonic() + seconds - 2
        while time.monotonic() < deadline:
            data = body(calls + 1)
            if data is None:
                conn.request(method, path)
            else:
                conn.request(method, path, json.dumps(data), {"Content-Type": "application/json"})
            answer = conn.getresponse()
            answer.read()
            if answer.status >= 300:
                raise RuntimeError(f"{method} {path}: {answer.status}")
            calls += 1
        conn.close()
        return {"calls": calls}

    return go


def _figure8_run(server: Server) -> str:
    """Figure 8's run: 10,000 final steps, then 500 metric records and 500 operator actions
    (what figure 8's own rounds of ``POST .../metrics`` and ``.../control`` leave on it)."""
    import httpx

    from bench.hot_path import prepare_runs
    from bench.routes import LONG_RUN

    (run_id,) = prepare_runs(server.port, "prof", runs=1, horizon=LONG_RUN)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for k in range(1, 501):
            record = {"step": k, "name": "loss", "value": 1.0 / k, "rank": 0}
            http.post(f"/v1/runs/{run_id}/metrics", json={"records": [record]}).raise_for_status()
            action = {"action": "scale", "factor": 1.0}
            http.post(f"/v1/runs/{run_id}/control", json=action).raise_for_status()
    return run_id


def _run_read(server: Server, seconds: float) -> Any:
    return _sequential_get(server, seconds, f"/v1/runs/{_figure8_run(server)}")


def _history(server: Server, seconds: float) -> Any:
    return _sequential_get(server, seconds, f"/v1/runs/{_figure8_run(server)}/history?max_points=200")


def _control(server: Server, seconds: float) -> Any:
    action = {"action": "scale", "factor": 1.0}
    return _sequential(server, seconds, "POST", f"/v1/runs/{_figure8_run(server)}/control", lambda k: action)


def _metrics(server: Server, seconds: float) -> Any:
    return _sequential(server, seconds, "POST", f"/v1/runs/{_figure8_run(server)}/metrics",
                       lambda k: {"records": [{"step": k, "name": "loss", "value": 1.0 / k, "rank": 0}]})


SCENARIOS = {"hot_path": _hot_path, "client_step": _client_step, "report": _report, "commit": _commit,
             "ranks": _ranks, "run_read": _run_read, "history": _history, "control": _control,
             "metrics": _metrics}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--out", default="bench/results/profile")
    parser.add_argument("--only", nargs="*", choices=list(SCENARIOS))
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    if py_spy() is None:
        print("bench.profile: py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for name in args.only or list(SCENARIOS):
        with workdir() as work, Server(sqlite_url(work, name), work, name=name) as server:
            _warm(server)
            load = SCENARIOS[name](server, args.seconds)
            summary, result = record(server.proc.pid, out / name, args.seconds, load)
        summaries[name] = {**summary, "load": result}
        print(f"== {name}: {summary['samples']} samples; load: {json.dumps(result)[:300]}")
        for kind in ("layers", "self", "service_inclusive"):
            print(f"-- {kind} (% of busy samples)")
            for fn, pct in summary[kind][: args.top]:
                print(f"{pct:6.1f}%  {fn}")
    (out / "summary.json").write_text(json.dumps(summaries, indent=1))
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench-profile"
    raise SystemExit(main())
