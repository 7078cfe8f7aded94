"""The training side of ``bench.plateau_loop``, run as a script in its own process.

It imports ``lrserve.client`` from whatever tree is first on ``PYTHONPATH`` (so two trees'
clients can be measured against one server) and nothing of ``bench``. It reads one command
per line on stdin and answers one JSON line on stdout:

``seg MODE WORK_S REPORTS EPOCH``: ``REPORTS + 1`` epochs of ``EPOCH`` training steps (sleep
``WORK_S``, ``optimizer.step()``), ``step(metric)`` at the end of each (torch's pattern,
``steps_per_epoch=1``), on the scheduler of ``MODE`` (``waits`` or ``overlap``; made at its
first segment). Per report it answers what the training thread paid: wall time and its own
CPU (``time.thread_time``) inside ``step(metric)`` and inside the optimizer's pre-step hooks
(where an overlapping client takes its decision), summed over the epoch after it; and one
bare ``http.client`` ``POST .../step`` with the metric on a run of its own (the round trip,
the yardstick) in the middle of each epoch, timed the same way, after a pause of
``WORK_S`` as the report comes after one (right after another request the caches are warm);
and the timing pair's own cost (``floor``: the pre-step hooks of an optimizer with the pair
alone, stepped once per epoch after such a pause, times ``EPOCH``), which the hooks' figures
hold whatever the scheduler does.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
import urllib.parse
import uuid
from typing import Any

SCHEDULE = {"type": "ReduceLROnPlateau", "factor": 0.5, "patience": 2}


def _metric(epoch: int) -> float:
    return 1.0 / (1 + epoch % 9)  # improves, then stalls: the plateau reduces sometimes


class _Hooks:
    """Wall and thread-CPU ns spent in the pre-step hooks registered between these two."""

    def __init__(self, optimizer: Any) -> None:
        self.wall = self.cpu = 0
        self._w = self._c = 0
        optimizer.register_step_pre_hook(self._start)

    def seal(self, optimizer: Any) -> _Hooks:
        optimizer.register_step_pre_hook(self._stop)
        return self

    def _start(self, *_: Any) -> None:
        self._w, self._c = time.perf_counter_ns(), time.thread_time_ns()

    def _stop(self, *_: Any) -> None:
        self.wall += time.perf_counter_ns() - self._w
        self.cpu += time.thread_time_ns() - self._c


class _Bare:
    """``POST .../step`` with the metric through one ``http.client`` keep-alive connection."""

    def __init__(self, url: str, run_id: str, name: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        self.path = f"/v1/runs/{run_id}/step"
        self.name = name
        self.step = 0

    def reconnect(self) -> None:
        """A new connection, used once untimed (the server closes one idle for 5 s, as it
        may be while the other variants run)."""
        self.conn.close()
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        self.post(1.0)

    def post(self, value: float) -> None:
        self.step += 1
        body = json.dumps({"step": self.step, "metrics": {self.name: value}, "rank": 0, "ahead": 0})
        self.conn.request("POST", self.path, body, {"Content-Type": "application/json"})
        answer = self.conn.getresponse()
        answer.read()
        if answer.status != 200:
            raise RuntimeError(f"bare POST .../step answered {answer.status}")


def main() -> None:
    import torch
    from lrserve.client import LRClient, RemoteScheduler

    url = sys.argv[1]
    tag = uuid.uuid4().hex[:8]
    made: dict[str, tuple[Any, Any, _Hooks]] = {}
    client = LRClient(url)
    ref = f"bench-plateau-ref-{tag}"
    client.create_run(SCHEDULE, [0.1], run_id=ref)
    bare: _Bare | None = None
    floor_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    floor = _Hooks(floor_opt).seal(floor_opt)
    epochs: dict[str, int] = {}
    for line in sys.stdin:
        _, mode, work_s, reports, epoch = line.split()
        work, n, e = float(work_s), int(reports), int(epoch)
        if mode not in made:
            opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
            hooks = _Hooks(opt)
            sched = RemoteScheduler(opt, SCHEDULE, run_id=f"bench-plateau-{tag}-{mode}", url=url,
                                    steps_per_epoch=1, overlap_decisions=mode == "overlap")
            made[mode] = (opt, sched, hooks.seal(opt))
            epochs[mode] = 0
        opt, sched, hooks = made[mode]
        if bare is None:
            bare = _Bare(url, ref, next(iter(sched.watched)))
        bare.reconnect()
        out: dict[str, list[float]] = {k: [] for k in ("wall", "cpu", "tick_wall", "tick_cpu", "hook_wall",
                                                       "hook_cpu", "rtt", "rtt_cpu", "floor_cpu")}
        sleep, clock, tclock = time.sleep, time.perf_counter_ns, time.thread_time_ns
        ticks: list[tuple[int, int]] = []
        hooked: list[tuple[int, int]] = []
        floors: list[int] = []
        for _ in range(n + 1):
            hw, hc = hooks.wall, hooks.cpu
            for i in range(e):  # the first optimizer.step() takes an overlapping decision
                sleep(work)
                opt.step()
                if i == e // 2:  # the yardstick mid-epoch, after a pause as the report comes
                    sleep(work)
                    w0, c0 = clock(), tclock()
                    bare.post(_metric(epochs[mode] + 1))
                    out["rtt"].append((clock() - w0) / 1e3)
                    out["rtt_cpu"].append((tclock() - c0) / 1e3)
                if i == (e // 2 + 2) % e:  # the timing pair alone, after a pause
                    fc = floor.cpu
                    sleep(work)
                    floor_opt.step()
                    floors.append((floor.cpu - fc) * e)
            hooked.append((hooks.wall - hw, hooks.cpu - hc))
            epochs[mode] += 1
            w0, c0 = clock(), tclock()
            sched.step(_metric(epochs[mode]))
            ticks.append((clock() - w0, tclock() - c0))
        # a report's cost: its step(metric), then the hooks of the epoch after it
        for (tw, tc), (hw, hc), fc in zip(ticks[:-1], hooked[1:], floors[1:], strict=True):
            out["tick_wall"].append(tw / 1e3)
            out["tick_cpu"].append(tc / 1e3)
            out["hook_wall"].append(hw / 1e3)
            out["hook_cpu"].append(hc / 1e3)
            out["wall"].append((tw + hw) / 1e3)
            out["cpu"].append((tc + hc) / 1e3)
            out["floor_cpu"].append(fc / 1e3)
        print(json.dumps(out), flush=True)
    for _, sched, _ in made.values():
        sched.close()
    client.close()


if __name__ == "__main__":
    main()
