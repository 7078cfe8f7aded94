"""The client's CPU per request (issue 15, target 6): ``python -m bench.client_transport``.

The client's requests run on its fetch thread, which holds the GIL the training loop needs,
so what counts is the CPU time of the calling thread (``time.thread_time``), not the wall
clock. Measured against a real server on loopback, side by side in rotated rounds (medians):

- ``LRClient``, as users get it: a plain ``http://`` URL, so its own keep-alive connections
  (``client/_transport.py``, ``KeepAliveSender``: HTTP/1.1 written and read over a socket);
- ``LRClient`` over an ``httpx.Client`` (what every request paid before; what ``https://``,
  a proxy from the environment or an injected client still take);
- a bare ``httpx.Client.get`` and a bare ``http.client`` exchange, for scale.

Each for a cached ``GET .../lr`` (a window read) and a ``POST .../step`` with a metric.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from lrserve.client import LRClient
from lrserve.client._client import DEFAULT_TIMEOUT

from bench.servers import Server


def cpu_ms_per_call(fn: Callable[[], object], calls: int) -> float:
    fn()
    start = time.thread_time()
    for _ in range(calls):
        fn()
    return (time.thread_time() - start) / calls * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.client_transport",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="requests per case per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lrserve-transport-"))
    server = Server(f"sqlite:///{work}/db.sqlite", work).start()
    try:
        spec = {"type": "ReduceLROnPlateau", "patience": 10**6}
        with LRClient(server.url) as setup:
            setup.create_run(spec, [0.1], run_id="reads")
            setup.read_lr("reads", 0, ahead=100)
            for key in ("direct", "httpx"):
                setup.create_run(spec, [0.1], run_id=f"steps-{key}")
        direct = LRClient(server.url)
        over_httpx = LRClient(server.url, http_client=httpx.Client(timeout=DEFAULT_TIMEOUT))
        bare_httpx = httpx.Client(timeout=DEFAULT_TIMEOUT)
        bare = [http.client.HTTPConnection("127.0.0.1", server.port)]
        steps = {"direct": 0, "httpx": 0}  # each its own run

        def bare_get() -> object:
            for _ in range(2):  # the server closes a connection idle for 5 s (while others ran)
                try:
                    bare[0].request("GET", "/v1/runs/reads/lr?step=5")
                    return json.loads(bare[0].getresponse().read())
                except (http.client.HTTPException, ConnectionError):
                    bare[0].close()
                    bare[0] = http.client.HTTPConnection("127.0.0.1", server.port)
            raise RuntimeError("no answer")

        def step(api: LRClient, key: str) -> object:
            steps[key] += 1
            return api.step_run(f"steps-{key}", steps[key], metrics={"val_loss": 1.0})

        cases: dict[str, Callable[[], object]] = {
            "GET .../lr: LRClient (KeepAliveSender, the default)": lambda: direct.read_lr("reads", 5),
            "GET .../lr: LRClient over httpx.Client": lambda: over_httpx.read_lr("reads", 5),
            "GET .../lr: bare httpx.Client.get": lambda: bare_httpx.get(
                f"{server.url}/v1/runs/reads/lr", params={"step": 5}).json(),
            "GET .../lr: bare http.client": bare_get,
            "POST .../step: LRClient (KeepAliveSender, the default)": lambda: step(direct, "direct"),
            "POST .../step: LRClient over httpx.Client": lambda: step(over_httpx, "httpx"),
        }
        found: dict[str, list[float]] = {name: [] for name in cases}
        names = list(cases)
        for round_ in range(args.rounds):
            for name in names[round_ % len(names):] + names[: round_ % len(names)]:  # rotated
                found[name].append(cpu_ms_per_call(cases[name], args.calls))
        print(f"load average {os.getloadavg()[0]:.1f}; {args.rounds} rounds of {args.calls} calls, medians")
        for name, values in found.items():
            print(f"{name:52s} {statistics.median(values):.3f} ms CPU per request")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
