"""Half-sent requests against a server, with ``/healthz`` measured throughout.

    python -m tests.adversarial.flood N [--url http://127.0.0.1:8000] [--hold SECONDS] [--probe-url URL]

Opens N connections that each send a request's headers and the first byte of a body
they never finish (an attacker's slowloris), while a prober opens a fresh connection for
``GET /healthz`` every 50 ms (on ``--probe-url``: by default the flooded server's URL; a
server's ``LRSERVE_HEALTH_PORT`` to measure that). Prints one JSON object: how the server ended each flood
connection (408, 503, closed without an answer, still open at the end), and the
prober's status counts and latencies (p50, p99, max, in ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import resource
import statistics
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

HALF_SENT = (b"POST /v1/runs HTTP/1.1\r\nHost: flood\r\nContent-Type: application/json\r\n"
             b"Content-Length: 1000\r\n\r\n{")


async def _half_sent(host: str, port: int, hold_s: float, outcomes: Counter, gate: asyncio.Semaphore) -> None:
    async with gate:  # connect a few hundred at a time, as fast as the server accepts
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
            writer.write(HALF_SENT)
            await writer.drain()
        except (OSError, asyncio.TimeoutError):
            outcomes["connect_failed"] += 1
            return
    try:
        answer = await asyncio.wait_for(reader.read(64), hold_s)
        outcomes[answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/1.1 ") else "closed"] += 1
    except asyncio.TimeoutError:
        outcomes["still_open"] += 1
    except OSError:
        outcomes["reset"] += 1
    finally:
        writer.close()


async def _probe(host: str, port: int, stop: Any, results: list[tuple[int | str, float]]) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n"
    while not stop.is_set():
        started = time.perf_counter()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            writer.write(request)
            head = await asyncio.wait_for(reader.read(64), 10)
            writer.close()
            status: int | str = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else "no answer"
        except (OSError, asyncio.TimeoutError) as exc:
            status = type(exc).__name__
        results.append((status, (time.perf_counter() - started) * 1000))
        await asyncio.sleep(0.05)


def _prober(host: str, port: int, stop: Any, out: Any) -> None:
    """The prober, in a process of its own: beside the flood's 20,000 connections on one event
    loop, a probe's answer waited for that loop (its p99 was the client's, not the server's)."""
    results: list[tuple[int | str, float]] = []
    asyncio.run(_probe(host, port, stop, results))
    out.put(results)


async def flood(url: str, n: int, hold_s: float = 15.0, open_at_once: int = 500,
                probe_url: str | None = None) -> dict[str, Any]:
    """Run the flood against ``url`` while probing ``probe_url`` (default ``url``); returns the
    summary the command prints."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 256 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n + 256, hard))
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    outcomes: Counter = Counter()
    probed = urlsplit(probe_url or url)
    spawn = multiprocessing.get_context("spawn")
    stop, out = spawn.Event(), spawn.Queue()
    prober = spawn.Process(target=_prober, args=(probed.hostname or host, probed.port or port, stop, out),
                           daemon=True)
    prober.start()
    gate = asyncio.Semaphore(open_at_once)
    started = time.monotonic()
    await asyncio.gather(*(_half_sent(host, port, hold_s, outcomes, gate) for _ in range(n)))
    stop.set()
    probes = await asyncio.to_thread(out.get, True, 60)
    await asyncio.to_thread(prober.join, 30)
    latencies = sorted(ms for _, ms in probes)
    return {
        "connections": n,
        "seconds": round(time.monotonic() - started, 1),
        "flood_outcomes": dict(outcomes),
        "healthz": {
            "count": len(probes),
            "statuses": dict(Counter(str(s) for s, _ in probes)),
            "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
            "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))], 1) if latencies else None,
            "max_ms": round(latencies[-1], 1) if latencies else None,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n", type=int, help="half-sent connections to open")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--hold", type=float, default=15.0,
                        help="seconds each connection waits for the server to end it (default 15)")
    parser.add_argument("--probe-url", default=None,
                        help="where the prober asks GET /healthz (default: --url)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(flood(args.url, args.n, args.hold, probe_url=args.probe_url))))


if __name__ == "__main__":
    main()
