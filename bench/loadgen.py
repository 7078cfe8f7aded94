"""Keep-alive HTTP load on loopback: wrk when installed, else a bounded asyncio generator.

``load(port, paths, ...)`` runs for ``duration_s`` from ``connections`` keep-alive
connections and returns requests/s, p50/p99 latency and error counts. Paths may hold
``{n}``: the generator fills in ``n = 1 + i // len(paths)`` for its i-th request, so a
list of per-run paths steps every run forward by one step per turn (the commit path).

The fallback runs in its own process (``python -m bench.loadgen``) so that it never
shares the bench's interpreter (and GIL) with anything it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.stats import percentile

HOST = "127.0.0.1"

_WRK_SCRIPT = """
local paths = {%s}
local counter = 0
request = function()
  local k = counter %% #paths
  local n = math.floor(counter / #paths) + 1
  counter = counter + 1
  local p = (string.gsub(paths[k + 1], "{n}", tostring(n)))
  return wrk.format("GET", p)
end
"""


def wrk_path() -> str | None:
    return shutil.which("wrk")


def load(port: int, paths: list[str], *, connections: int, duration_s: float,
         tool: str | None = None) -> dict[str, Any]:
    """Run one load; ``tool`` is ``"wrk"``, ``"python"`` or None: wrk if installed and the load
    lasts whole seconds (wrk's unit), else the asyncio generator."""
    tool = tool or ("wrk" if wrk_path() and duration_s >= 1 else "python")
    if tool == "wrk":
        return run_wrk(port, paths, connections=connections, duration_s=duration_s)
    return run_python(port, paths, connections=connections, duration_s=duration_s)


def run_wrk(port: int, paths: list[str], *, connections: int, duration_s: float) -> dict[str, Any]:
    """``wrk -t1``: one load thread leaves the other core to the server."""
    listed = ", ".join(json.dumps(p) for p in paths)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_SCRIPT % listed)
    try:
        duration = max(1, round(duration_s))
        cmd = [wrk_path() or "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "5s",
               "--latency", "-s", script.name, f"http://{HOST}:{port}/"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30, check=True).stdout
    finally:
        Path(script.name).unlink(missing_ok=True)
    return parse_wrk(out) | {"tool": "wrk", "connections": connections, "duration_s": duration}


def parse_wrk(out: str) -> dict[str, Any]:
    """Requests/s, latency percentiles (ms), requests and errors from wrk's report."""
    def grab(pattern: str, default: str | None = None) -> str | None:
        m = re.search(pattern, out, re.MULTILINE)
        return m.group(1) if m else default

    rps = float(grab(r"^Requests/sec:\s+([\d.]+)") or "nan")
    requests = int(grab(r"^\s*(\d+) requests in") or 0)
    non2xx = int(grab(r"Non-2xx or 3xx responses:\s+(\d+)") or 0)
    socket_errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        socket_errors = sum(int(g) for g in m.groups())
    pct = {}
    for q, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.MULTILINE):
        pct[q] = float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]
    return {
        "rps": rps,
        "p50_ms": pct.get("50", float("nan")),
        "p99_ms": pct.get("99", float("nan")),
        "requests": requests,
        "errors": non2xx + socket_errors,
    }


def run_python(port: int, paths: list[str], *, connections: int, duration_s: float) -> dict[str, Any]:
    """The asyncio generator in a child process; its JSON report."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as spec:
        json.dump(paths, spec)
    try:
        cmd = [sys.executable, "-m", "bench.loadgen", "--port", str(port), "--paths", spec.name,
               "--connections", str(connections), "--duration", str(duration_s)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60, check=True,
                             cwd=Path(__file__).resolve().parent.parent).stdout
    finally:
        Path(spec.name).unlink(missing_ok=True)
    return json.loads(out) | {"tool": "python-asyncio", "connections": connections, "duration_s": duration_s}


async def _drive(port: int, paths: list[str], connections: int, duration_s: float) -> dict[str, Any]:
    from bench.rawhttp import Connection, HttpError

    latencies: list[float] = []
    errors = 0
    counter = 0
    deadline = time.perf_counter() + duration_s

    async def one() -> None:
        nonlocal errors, counter
        conn = Connection(HOST, port)
        try:
            while time.perf_counter() < deadline:
                i = counter
                counter += 1
                path = paths[i % len(paths)].replace("{n}", str(i // len(paths) + 1))
                started = time.perf_counter()
                try:
                    status, _ = await conn.request("GET", path)
                except HttpError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)
                if status >= 300:
                    errors += 1
        finally:
            await conn.close()

    began = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(connections)))
    elapsed = time.perf_counter() - began
    ms = [s * 1e3 for s in latencies]
    return {
        "rps": len(latencies) / elapsed if elapsed else float("nan"),
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "requests": len(latencies),
        "errors": errors,
    }


def raise_fd_limit() -> None:
    """Many connections need many descriptors: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    from bench.rawhttp import new_event_loop

    parser = argparse.ArgumentParser(description="bounded keep-alive GET load on loopback")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--paths", required=True, help="JSON file: a list of paths")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args(argv)
    raise_fd_limit()
    paths = json.loads(Path(args.paths).read_text())
    loop = new_event_loop()
    try:
        result = loop.run_until_complete(
            asyncio.wait_for(_drive(args.port, paths, args.connections, args.duration), args.duration + 30)
        )
    finally:
        loop.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
