"""The server's CPU per event delivered to a stream (``GET /v1/events``), side by side.

``python -m bench.stream_cost [OTHER] [--streams 200] [--events 300] [--rounds 2] [--json PATH]``
takes turns, in rotated rounds, between a server of this checkout ("this") and, when given,
of ``OTHER``, the root of another checkout ("other"), each a fresh ``lrserve serve`` on a new
SQLite file. In each turn one run gets ``--events`` operator actions (``scale`` by 1.0, one
event each), posted one at a time 2 ms apart, first with no stream open, then with
``--streams`` streams open (a process of their own reading every byte, each stream from the
log's start, ``since=0``, measured once every one has caught up); the server's CPU over
each (its process's user + system time, from ``/proc``) gives the CPU one event costs it per
stream: ``(with - without) / (streams × events)``. Figure 6 (``python -m bench --only
fanout``) shows what that does to the hot path beside 1,000 ranks.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.servers import Server, sqlite_url, workdir
from bench.stats import rotations

_READER = """
import selectors, socket, sys, time
port, streams, events, before = map(int, sys.argv[1:5])
sel = selectors.DefaultSelector()
for _ in range(streams):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /v1/events?since=0 HTTP/1.1\\r\\nHost: bench\\r\\n\\r\\n")  # the whole log
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, [0, b""])  # each stream's events seen, and its last bytes
print("open", flush=True)

def read_until(each, deadline):
    # every stream has ``each`` events, counted across reads that may split a message
    while True:
        counts = [key.data[0] for key in sel.get_map().values()]
        if len(counts) == streams and min(counts) >= each:
            return True
        if time.monotonic() > deadline or not counts:
            return False
        for key, _ in sel.select(1.0):
            data = key.fileobj.recv(1 << 16)
            if not data:
                sel.unregister(key.fileobj)
                continue
            seen = key.data[1] + data
            key.data[0] += seen.count(b"\\nid: ") - key.data[1].count(b"\\nid: ")
            key.data[1] = seen[-5:]

live = read_until(before, time.monotonic() + 120)  # the log so far: every stream is live
print("live" if live else "not live", flush=True)
done = live and read_until(before + events, time.monotonic() + 300)
print(sum(key.data[0] - before for key in sel.get_map().values()) if done else -1, flush=True)
"""


def _post_actions(port: int, events: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    body = json.dumps({"action": "scale", "factor": 1.0})
    for _ in range(events):
        conn.request("POST", "/v1/runs/r/control", body, {"Content-Type": "application/json"})
        answer = conn.getresponse()
        answer.read()
        if answer.status != 200:
            raise RuntimeError(f"control: {answer.status}")
        time.sleep(0.002)
    conn.close()


def _turn(work: Path, tree: Path | None, name: str, streams: int, events: int) -> float:
    """Server CPU seconds per event per stream, for one fresh server."""
    with Server(sqlite_url(work, name), work, name=f"stream-{name}", tree=tree) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port)
        run = {"run_id": "r", "schedule": {"type": "StepLR", "step_size": 10}, "base_lrs": [0.1]}
        conn.request("POST", "/v1/runs", json.dumps(run), {"Content-Type": "application/json"})
        conn.getresponse().read()
        _post_actions(server.port, events)  # warm
        before = server.cpu_seconds()
        _post_actions(server.port, events)
        alone = server.cpu_seconds() - before
        logged = 1 + 2 * events  # the run's created event and the actions so far: each stream
        command = [sys.executable, "-c", _READER, str(server.port), str(streams), str(events), str(logged)]
        reader = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)  # reads them first
        try:
            assert reader.stdout is not None
            if reader.stdout.readline().strip() != "open":
                raise RuntimeError("the streams did not open")
            if reader.stdout.readline().strip() != "live":
                raise RuntimeError("not every stream caught up with the log in 120 s")
            before = server.cpu_seconds()
            _post_actions(server.port, events)
            seen = int(reader.stdout.readline() or -1)  # the reader's own deadline ends it
            streamed = server.cpu_seconds() - before
        finally:
            reader.kill()
            reader.wait()
        if seen < streams * events:
            raise RuntimeError(f"not every stream got every event in 300 s ({seen} deliveries counted)")
        return (streamed - alone) / (streams * events)


def run(other: Path | None, streams: int, events: int, rounds: int) -> dict[str, Any]:
    trees: dict[str, Path | None] = {"this": None, **({"other": other} if other is not None else {})}
    per: dict[str, list[float]] = {name: [] for name in trees}
    with workdir("lrserve-streams-") as work:
        for r, order in enumerate(rotations(list(trees), rounds)):
            for name in order:
                per[name].append(_turn(work, trees[name], f"{name}-{r}", streams, events))
    return {"streams": streams, "events": events, "rounds": rounds,
            "trees": {name: {"us_per_delivery": 1e6 * statistics.median(s), "rounds_us": [1e6 * x for x in s]}
                      for name, s in per.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", nargs="?", type=Path, help="the root of another checkout to compare with")
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    result = run(args.other, args.streams, args.events, args.rounds)
    print(f"{args.events} events to {args.streams} streams, {args.rounds} rotated rounds: "
          "the server's CPU per event per stream")
    for name, got in result["trees"].items():
        rounds = ", ".join(f"{us:.1f}" for us in got["rounds_us"])
        print(f"  {name:5}  {got['us_per_delivery']:6.1f} µs  (rounds: {rounds})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
