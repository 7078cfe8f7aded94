"""No per-request memory that outlives the request: 50,000 404s against a real server process.

The issue measured +22 MiB after 100k requests for unknown run ids (the run-lock map kept an
entry per id, never freed). Here every request names a run id never seen before, or one that
was created, used and deleted, over the routes that take a run id; the server's resident set
is read from ``/proc`` after a warm-up and after the 50,000 requests.

Why 50,000 (it was 100,000, half of this test's time, which was among the suite's longest):
the old map, put back in a copy of the tree, grows the resident set in proportion (on the
2-core machine at load 28-50: +5.93, +6.09 and +6.11 MiB after 50,000, +9.98 after 100,000;
this test fails), while the fixed one stays flat after the warm-up (+0.56, +0.62, +0.70, +0.90
MiB after 50,000, +1.04 after 100,000). The 3 MiB limit is twice below the old map's growth
and over three times above the fix's, the margins the 100,000 with 4 MiB had (2.5x and 3.8x).
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.live_server import ServerProcess

REQUESTS = 50_000
WARM_UP = 5_000
CONNECTIONS = 4
PIPELINED = 100  # requests written at once on a connection before reading their answers
GROWTH_LIMIT_MIB = 3.0
"""Allowed growth of the resident set over the 50,000 requests (the old map: about 6 MiB)."""

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


def request(i: int, deleted: list[str]) -> bytes:
    """The ``i``-th request: a 404 on one of five routes, for a new id or a deleted run's."""
    run_id = deleted[i % len(deleted)] if i % 5 == 4 else f"never-{i}"
    kind = i % 4
    if kind == 0:
        return f"GET /v1/runs/{run_id}/lr?step={i % 7} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    if kind == 1:
        body = b'{"step": 1, "metrics": {"loss": 0.5}}'
        return (f"POST /v1/runs/{run_id}/step HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    if kind == 2:
        return f"GET /v1/runs/{run_id}/history HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    return f"GET /v1/runs/{run_id} HTTP/1.1\r\nHost: t\r\n\r\n".encode()


async def read_answer(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


async def send_all(port: int, first: int, count: int, deleted: list[str]) -> Counter:
    """``count`` requests from number ``first`` on, over ``CONNECTIONS`` keep-alive connections."""
    statuses: Counter = Counter()

    async def one_connection(numbers: range) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for at in range(0, len(numbers), PIPELINED):
                batch = numbers[at : at + PIPELINED]
                writer.write(b"".join(request(i, deleted) for i in batch))
                for _ in batch:
                    statuses[await read_answer(reader)] += 1
        finally:
            writer.close()

    await asyncio.gather(*(one_connection(range(first + c, first + count, CONNECTIONS))
                           for c in range(CONNECTIONS)))
    return statuses


@pytest.mark.timeout(900)  # 55,000 requests at 1-3 ms of server time each, on a busy 2-core machine
def test_fifty_thousand_404s_leave_no_memory_behind(server: ServerProcess):
    assert server.proc is not None
    pid = server.proc.pid
    deleted = [f"deleted-{i}" for i in range(50)]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for run_id in deleted:  # used, then deleted: whatever a run leaves must go with it
            http.post("/v1/runs", json={"run_id": run_id, "schedule": {"type": "StepLR", "step_size": 3},
                                        "base_lrs": [0.1]}).raise_for_status()
            step = {"step": 1, "metrics": {"loss": 1.0}}
            http.post(f"/v1/runs/{run_id}/step", json=step).raise_for_status()
            http.get(f"/v1/runs/{run_id}/history").raise_for_status()
            assert http.delete(f"/v1/runs/{run_id}").status_code == 204
    warm = asyncio.run(send_all(server.port, 0, WARM_UP, deleted))  # allocator pools, caches
    before = rss_mib(pid)
    statuses = asyncio.run(send_all(server.port, WARM_UP, REQUESTS, deleted))
    after = rss_mib(pid)
    assert set(warm) == {404} and statuses == Counter({404: REQUESTS}), statuses
    print(f"server RSS {before:.1f} MiB -> {after:.1f} MiB after {REQUESTS} 404s")
    assert after - before < GROWTH_LIMIT_MIB, (before, after)


def test_a_method_outside_http_never_reaches_the_metrics(server: ServerProcess):
    # The request metrics are labelled by method, which the client picks: only llhttp's fixed
    # set of methods gets past uvicorn's parser (a 400 before the app), so their keys stay bounded.
    async def ask(raw: bytes) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(raw)
            return int((await reader.readuntil(b"\r\n")).split(b" ", 2)[1])
        finally:
            writer.close()

    assert asyncio.run(ask(b"FOOBAR1 /v1/runs/x HTTP/1.1\r\nHost: t\r\n\r\n")) == 400
    assert asyncio.run(ask(b"PROPFIND /v1/runs/x HTTP/1.1\r\nHost: t\r\n\r\n")) == 405
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert 'method="PROPFIND"' in metrics and "FOOBAR1" not in metrics
