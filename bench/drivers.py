"""Load drivers that run in their own process (``python -m bench.drivers KIND ...``).

- ``populate``: create runs and step them, from many concurrent connections (figure 4's
  memory per run);
- ``ranks``: simulated ranks of distributed jobs stepping their runs like
  ``RemoteScheduler`` does (figure 4's ranks, figure 6's load);
- ``subscribers``: ``GET /v1/events`` streams held open, timing each event's delivery
  (figure 6); prints ``ready`` once all are connected, stops at a line on stdin.

Both print one JSON object. A separate process keeps the driver's CPU and GIL apart from
the bench (which reads the server's memory and times what happens).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from typing import Any

from bench.loadgen import raise_fd_limit
from bench.rawhttp import Connection, HttpError, new_event_loop
from bench.stats import percentile

HOST = "127.0.0.1"
RANK_SCHEDULE = {"type": "SequentialLR", "milestones": [50], "schedulers": [
    {"type": "LinearLR", "start_factor": 0.1, "total_iters": 50},
    {"type": "ReduceLROnPlateau", "factor": 0.5, "patience": 1}]}
POPULATE_SCHEDULE = {"type": "CosineAnnealingLR", "T_max": 100_000}


def _json(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


async def populate(port: int, prefix: str, runs: int, steps: int, connections: int) -> dict[str, Any]:
    """Create ``runs`` runs and make steps ``0..steps`` final on each."""
    next_index = 0
    errors: list[str] = []

    async def worker() -> None:
        nonlocal next_index
        conn = Connection(HOST, port)
        try:
            while next_index < runs:
                i = next_index
                next_index += 1
                run_id = f"{prefix}-{i}"
                body = _json({"run_id": run_id, "base_lrs": [0.1], "schedule": POPULATE_SCHEDULE})
                for method, path, payload in (
                    ("POST", "/v1/runs", body),
                    ("GET", f"/v1/runs/{run_id}/lr?step=0&ahead={steps}", None),
                ):
                    try:
                        status, answer = await conn.request(method, path, payload)
                    except HttpError as exc:
                        errors.append(f"{method} {path}: {exc}")
                        continue
                    if status >= 300:
                        errors.append(f"{method} {path}: {status} {answer[:200]!r}")
        finally:
            await conn.close()

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - began
    return {"runs": runs, "seconds": elapsed, "runs_per_s": runs / elapsed, "errors": len(errors),
            "first_errors": errors[:5]}


async def ranks(port: int, runs: int, ranks: int, epochs: int, epoch_s: float, windows: int,
                window_steps: int, prefix: str = "ranks") -> dict[str, Any]:
    """Ranks of ``runs`` jobs (``ranks // runs`` each) stepping a warm-up-then-plateau schedule.

    Like ``RemoteScheduler`` with ``steps_per_epoch``: a rank fetches windows of final
    values (``GET .../lr``) ending before the step that carries the watched metric, and
    reports that metric with ``POST .../step`` (the metric barrier: the answer comes once
    every rank of the run reported), whose answer carries the next window. Every rank runs
    the same number of epochs, so no barrier is left waiting for a rank that stopped.
    """
    world = ranks // runs
    epoch_steps = windows * window_steps
    step_s = epoch_s / epoch_steps
    get_ms: list[float] = []
    post_ms: list[float] = []
    create_ms: list[float] = []
    errors: list[str] = []
    seen: dict[tuple[int, int], set[float]] = {}
    barrier_times: dict[tuple[int, int], list[tuple[float, float]]] = {}  # (sent, answered) per rank

    async def call(conn: Connection, method: str, path: str, body: Any, into: list[float]) -> Any:
        t0 = time.perf_counter()
        try:
            status, answer = await conn.request(method, path, None if body is None else _json(body))
        except HttpError as exc:
            errors.append(f"{method} {path}: {exc}")
            return None
        into.append((time.perf_counter() - t0) * 1e3)
        if status >= 300:
            errors.append(f"{method} {path}: {status} {answer[:200]!r}")
            return None
        return json.loads(answer)

    async def rank(run: int, r: int) -> None:
        conn = Connection(HOST, port)
        run_id = f"{prefix}-{run}"
        # jobs start at different times; the ranks of one job start together (DDP keeps them
        # in step: each training step ends in an all-reduce), give or take a few milliseconds
        start = (random.Random(run).random() * epoch_s / windows
                 + random.Random(run * 1000 + r).random() * 0.005)
        try:
            await asyncio.sleep(start)
            await call(conn, "POST", "/v1/runs", {"run_id": run_id, "base_lrs": [0.1], "world_size": world,
                                                  "schedule": RANK_SCHEDULE}, create_ms)
            step = 0
            for epoch in range(epochs):
                report_at = (epoch + 1) * epoch_steps
                while step + 1 < report_at:  # windows of final values up to the report step
                    ahead = min(window_steps, report_at - 1 - step) - 1
                    if epoch == 0 or step % epoch_steps:  # the report's answer carried the first one
                        await call(conn, "GET", f"/v1/runs/{run_id}/lr?step={step + 1}&ahead={ahead}",
                                   None, get_ms)
                    await asyncio.sleep(step_s * (ahead + 1))
                    step += ahead + 1
                metric = 1.0 / (1 + (epoch % 3)) + 0.01 * r
                sent = time.perf_counter()
                answer = await call(conn, "POST", f"/v1/runs/{run_id}/step",
                                    {"step": report_at, "metrics": {"val_loss": metric}, "rank": r,
                                     "ahead": window_steps - 1}, post_ms)
                if answer is not None:
                    seen.setdefault((run, report_at), set()).add(answer["lrs"][0])
                    barrier_times.setdefault((run, report_at), []).append((sent, time.perf_counter()))
                await asyncio.sleep(step_s * window_steps)
                step = report_at + window_steps - 1
        finally:
            await conn.close()

    began = time.perf_counter()
    await asyncio.gather(*(rank(run, r) for run in range(runs) for r in range(world)))
    elapsed = time.perf_counter() - began
    # a barrier's answers, timed from the moment its last rank sent its report (the wait for
    # the slowest rank is the job's, not the server's)
    after_last_ms = [(answered - max(s for s, _ in times)) * 1e3
                     for times in barrier_times.values() for _, answered in times]
    return {
        "ranks": runs * world, "runs": runs, "world_size": world, "epochs": epochs, "seconds": elapsed,
        "requests": len(get_ms) + len(post_ms) + len(create_ms), "errors": len(errors),
        "first_errors": errors[:5],
        "create_p50_ms": percentile(create_ms, 50), "create_p99_ms": percentile(create_ms, 99),
        "get_p50_ms": percentile(get_ms, 50), "get_p99_ms": percentile(get_ms, 99),
        "post_p50_ms": percentile(post_ms, 50), "post_p99_ms": percentile(post_ms, 99),
        "all_p99_ms": percentile(get_ms + post_ms + create_ms, 99),
        "after_last_p50_ms": percentile(after_last_ms, 50),
        "after_last_p99_ms": percentile(after_last_ms, 99),
        "divergent_steps": sum(1 for values in seen.values() if len(values) > 1),
        "decided_steps": len(seen),
    }


async def subscribers(port: int, n: int) -> dict[str, Any]:
    """``n`` SSE streams from now on; the delay from each event's ``at`` (taken as it was
    appended) to its arrival, for events written after every stream was connected.

    Raw sockets and a regular expression, not an HTTP client: 200 streams must cost this
    process little of the cores it shares with the server it measures.
    """
    import re
    import sys
    from datetime import datetime

    message = re.compile(rb'id: (\d+)\ndata: [^\n]*?"at":"([^"]+)"[^\n]*\n\n')
    delays_ms: list[float] = []
    ids: list[set[int]] = [set() for _ in range(n)]
    errors: list[str] = []
    connected = 0
    everyone = asyncio.Event()
    ready_at = [float("inf")]
    stamps: dict[bytes, float] = {}  # "at" text -> epoch seconds (many streams, one parse)

    async def follow(i: int) -> None:
        nonlocal connected
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(f"GET /v1/events HTTP/1.1\r\nHost: {HOST}\r\nAccept: text/event-stream\r\n\r\n"
                         .encode())
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                errors.append(f"stream {i}: {head[:40]!r}")
                return
            connected += 1
            if connected == n:
                everyone.set()
            buffer = b""
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    errors.append(f"stream {i}: closed by the server")
                    return
                now = time.time()
                buffer += chunk
                end = 0
                for found in message.finditer(buffer):
                    end = found.end()
                    text = found.group(2)
                    at = stamps.get(text)
                    if at is None:
                        at = stamps[text] = datetime.fromisoformat(text.decode()).timestamp()
                    if at >= ready_at[0]:
                        delays_ms.append((now - at) * 1e3)
                        ids[i].add(int(found.group(1)))
                if b"event: overflow" in buffer:
                    errors.append(f"stream {i}: cut off as a slow consumer")
                    return
                buffer = buffer[end:]
        except (OSError, asyncio.IncompleteReadError) as exc:
            errors.append(f"stream {i}: {type(exc).__name__}: {exc}")
        finally:
            writer.close()

    tasks = [asyncio.create_task(follow(i)) for i in range(n)]
    await asyncio.wait_for(everyone.wait(), 120)
    ready_at[0] = time.time()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    every = set().union(*ids)
    return {"subscribers": n, "events": len(every), "deliveries": len(delays_ms),
            "missing": sum(len(every - got) for got in ids), "errors": len(errors),
            "first_errors": errors[:5],
            "delivery_p50_ms": percentile(delays_ms, 50), "delivery_p99_ms": percentile(delays_ms, 99),
            "delivery_max_ms": max(delays_ms, default=float("nan"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="load drivers for the scale figure")
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("populate")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--prefix", default="scale")
    p.add_argument("--runs", type=int, required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--connections", type=int, default=16)
    r = sub.add_parser("ranks")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--runs", type=int, default=100)
    r.add_argument("--ranks", type=int, default=1000)
    r.add_argument("--epochs", type=int, default=2)
    r.add_argument("--epoch-s", type=float, default=5.0)
    r.add_argument("--windows", type=int, default=5)
    r.add_argument("--window-steps", type=int, default=50)
    r.add_argument("--timeout", type=float, default=120.0)
    r.add_argument("--prefix", default="ranks", help="run ids are PREFIX-0, PREFIX-1, ...")
    s = sub.add_parser("subscribers")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--n", type=int, default=200)
    args = parser.parse_args(argv)
    raise_fd_limit()
    if args.kind == "populate":
        coro = populate(args.port, args.prefix, args.runs, args.steps, args.connections)
        limit = 3600.0
    elif args.kind == "subscribers":
        coro = subscribers(args.port, args.n)
        limit = 3600.0
    else:
        coro = ranks(args.port, args.runs, args.ranks, args.epochs, args.epoch_s, args.windows,
                     args.window_steps, args.prefix)
        limit = args.timeout
    loop = new_event_loop()
    try:
        result = loop.run_until_complete(asyncio.wait_for(coro, limit))
    finally:
        loop.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
