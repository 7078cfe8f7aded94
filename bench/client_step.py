"""Figure 1: what ``RemoteScheduler`` costs a training loop, against torch's own scheduler.

Each variant drives its own SGD optimizer in the same loop, in rotated segments (torch, the
remote, and an empty tick that measures the loop itself). One training step of the loop:
sleep ``work`` (a GIL-free pause, as torch kernels are, during which the client's worker
thread may run on the other core, as it would in a real job), ``optimizer.step()``, then
the scheduler's tick.

What a variant costs per step is the time spent inside its tick (``step()``) **plus** the
time its optimizer's pre-step hooks took: a ``RemoteScheduler`` with
``overlap_decisions=True`` returns from ``step(metric)`` before the decision and takes it in
such a hook, so a wait moved there is paid in full, not hidden. The hooks are timed by a
pair of hooks the bench registers around them (the same pair on every optimizer).

Plateau rows use torch's call pattern on both sides: ``step(metric)`` once per epoch and no
call in between (``steps_per_epoch=1`` for the remote). They run at the short training step
of the other rows and at a long one (longer than a round trip, as a GPU step is), once with
the default client (``step(metric)`` waits for the decision) and once overlapping.

Per segment, each variant reports time per step (as above) and the process's CPU time over
the segment (all threads: the worker's requests included) minus the empty tick's. The
table shows medians over segments and the p99 of single steps.

The remote variants are ``RemoteScheduler`` as users build it: its own client, so its default
transport (``http.client`` keep-alive to a plain ``http://`` server). Their requests are
counted by the server (its ``lrserve_requests_total`` of ``/v1/`` routes over each
segment), not by a hook in the client.
"""

from __future__ import annotations

import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import report
from bench.servers import Pool, http_get
from bench.sizes import Size
from bench.stats import median, percentile, rotations

NAME = "client_step"
TITLE = "Figure 1: client step cost, RemoteScheduler vs torch's scheduler in the training loop"
TARGET_RATIO = 1.0
AIM_RATIO = 0.5
EPOCH = 100  # training steps per epoch; a plateau schedule gets its metric once per epoch
TOTAL = 1_000_000  # horizon of the time-based schedules (never reached)
WARMUP = 500

SCHEDULES: dict[str, dict[str, Any]] = {
    "StepLR": {"type": "StepLR", "step_size": 1000, "gamma": 0.5},
    "CosineAnnealingLR": {"type": "CosineAnnealingLR", "T_max": TOTAL},
    "OneCycleLR": {"type": "OneCycleLR", "max_lr": 0.1, "total_steps": TOTAL},
    "warmup+cosine": {"type": "SequentialLR", "milestones": [WARMUP], "schedulers": [
        {"type": "LinearLR", "start_factor": 0.1, "total_iters": WARMUP},
        {"type": "CosineAnnealingLR", "T_max": TOTAL}]},
    "plateau": {"type": "ReduceLROnPlateau", "factor": 0.5, "patience": 2},
}


def _torch_scheduler(name: str, opt: Any) -> Any:
    from torch.optim import lr_scheduler as s

    if name == "StepLR":
        return s.StepLR(opt, step_size=1000, gamma=0.5)
    if name == "CosineAnnealingLR":
        return s.CosineAnnealingLR(opt, T_max=TOTAL)
    if name == "OneCycleLR":
        return s.OneCycleLR(opt, max_lr=0.1, total_steps=TOTAL)
    if name == "warmup+cosine":
        return s.SequentialLR(opt, [s.LinearLR(opt, start_factor=0.1, total_iters=WARMUP),
                                    s.CosineAnnealingLR(opt, T_max=TOTAL)], milestones=[WARMUP])
    if name == "plateau":
        return s.ReduceLROnPlateau(opt, factor=0.5, patience=2)
    raise ValueError(name)


def _optimizer(groups: int) -> Any:
    import torch

    params = [{"params": [torch.zeros(1, requires_grad=True)], "lr": 0.1} for _ in range(groups)]
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _metric(epoch: int) -> float:
    """A validation loss that improves, then stalls for a while: the plateau reduces sometimes."""
    return 1.0 / (1 + epoch % 9)


def tick(name: str, scheduler: Any) -> Callable[[], None]:
    """One call per training step; plateau ones report once per epoch and do nothing else."""
    if name != "plateau":
        return scheduler.step
    count = [0]

    def plateau_tick() -> None:
        count[0] += 1
        if count[0] % EPOCH == 0:
            scheduler.step(_metric(count[0] // EPOCH))

    return plateau_tick


class HookTimer:
    """Times the optimizer's pre-step hooks registered between its creation and ``seal()``."""

    def __init__(self, optimizer: Any) -> None:
        self.ns = 0
        self._t0 = 0
        optimizer.register_step_pre_hook(self._start)

    def seal(self, optimizer: Any) -> HookTimer:
        optimizer.register_step_pre_hook(self._stop)
        return self

    def _start(self, *_: Any) -> None:
        self._t0 = time.perf_counter_ns()

    def _stop(self, *_: Any) -> None:
        self.ns += time.perf_counter_ns() - self._t0


@dataclass
class Variant:
    """One scheduler in the loop: its optimizer, its tick, the timer of its optimizer's hooks."""

    optimizer: Any
    tick: Callable[[], None]
    hooks: HookTimer


def _segment(v: Variant, steps: int, work_s: float) -> tuple[list[int], float, float]:
    """Run ``steps`` training steps; per-step ns (tick + hooks), mean ns, CPU seconds."""
    times = []
    clock = time.perf_counter_ns
    sleep = time.sleep
    opt_step, tick_, hooks = v.optimizer.step, v.tick, v.hooks
    cpu0 = time.process_time()
    for _ in range(steps):
        sleep(work_s)
        h0 = hooks.ns
        opt_step()
        t0 = clock()
        tick_()
        times.append(clock() - t0 + hooks.ns - h0)
    cpu = time.process_time() - cpu0
    return times, sum(times) / steps, cpu


def _modes(name: str) -> list[str]:
    """The client modes a row is measured in: overlapping decisions only matters for reports."""
    return ["waits", "overlap"] if name == "plateau" else ["-"]


def api_requests(url: str, settle_s: float = 0.05) -> int:
    """How many ``/v1/`` requests the server at ``url`` has answered (its ``/metrics``), read
    until two reads ``settle_s`` apart agree: the server counts a request once its answer has
    gone out, so the last one a client read may be counted a moment later. An overlapping
    client's report still on its way at the end of a segment is counted in no segment."""
    port = int(url.rsplit(":", 1)[1])
    last = None
    for _ in range(40):
        status, text = http_get(port, "/metrics")
        if status != 200:
            raise RuntimeError(f"GET /metrics: {status}")
        total = int(sum(float(line.rsplit(" ", 1)[1]) for line in text.decode().splitlines()
                        if line.startswith("lrserve_requests_total{") and 'route="/v1/' in line))
        if total == last:
            return total
        last = total
        time.sleep(settle_s)
    return last or 0


def _measure(url: str, name: str, groups: int, work_s: float, steps: int, size: Size,
             tag: str) -> list[dict[str, Any]]:
    from lrserve.client import RemoteScheduler

    variants: dict[str, Variant] = {}
    opt = _optimizer(groups)
    timer = HookTimer(opt)
    torch_sched = _torch_scheduler(name, opt)
    opt.step()  # torch warns when its scheduler steps before the optimizer ever did
    variants["torch"] = Variant(opt, tick(name, torch_sched), timer.seal(opt))
    opt = _optimizer(groups)
    variants["loop"] = Variant(opt, lambda: None, HookTimer(opt).seal(opt))
    requests: dict[str, int] = {}
    closers: list[Callable[[], None]] = []
    created_ms: dict[str, float] = {}
    try:
        for mode in _modes(name):
            requests[mode] = 0
            opt = _optimizer(groups)
            timer = HookTimer(opt)
            t0 = time.perf_counter()
            remote = RemoteScheduler(
                opt, SCHEDULES[name], url=url,
                run_id=f"bench-{tag}-{name.replace('+', '-')}-{groups}-{work_s}-{mode}",
                steps_per_epoch=1 if name == "plateau" else None, overlap_decisions=mode == "overlap")
            created_ms[mode] = (time.perf_counter() - t0) * 1e3
            closers.insert(0, remote.close)
            variants[mode] = Variant(opt, tick(name, remote), timer.seal(opt))
        for v in variants.values():  # warm-up: the client's windows grow to size here
            _segment(v, steps, work_s)
        per_step: dict[str, list[float]] = {v: [] for v in variants}
        cpu: dict[str, list[float]] = {v: [] for v in variants}
        calls: dict[str, list[int]] = {v: [] for v in variants}
        for order in rotations(list(variants), size.step_rounds):
            for key in order:
                before = api_requests(url) if key in requests else 0
                times, mean_ns, cpu_s = _segment(variants[key], steps, work_s)
                if key in requests:
                    requests[key] += api_requests(url) - before
                per_step[key].append(mean_ns / 1e3)
                cpu[key].append(cpu_s)
                calls[key].extend(times)
    finally:
        for close in closers:
            close()
    base_cpu = median(cpu["loop"])

    def cpu_us(key: str) -> float:
        return max(0.0, (median(cpu[key]) - base_cpu) / steps * 1e6)

    rows = []
    for mode in _modes(name):
        pairs = zip(per_step[mode], per_step["torch"], strict=True)
        torch_cpu, remote_cpu = cpu_us("torch"), cpu_us(mode)
        rows.append({
            "schedule": name, "groups": groups, "work_us": work_s * 1e6, "client": mode,
            "torch_us": median(per_step["torch"]), "remote_us": median(per_step[mode]),
            "ratio": median([r / t for r, t in pairs if t > 0]),
            "torch_p99_us": percentile(calls["torch"], 99) / 1e3,
            "remote_p99_us": percentile(calls[mode], 99) / 1e3,
            "torch_cpu_us": torch_cpu, "remote_cpu_us": remote_cpu,
            "cpu_ratio": remote_cpu / torch_cpu if torch_cpu else None,
            "requests_per_1k": requests[mode] / (size.step_rounds * steps) * 1000,
            "loop_us": median(per_step["loop"]), "create_ms": created_ms[mode],
        })
    return rows


COLUMNS = [
    ("schedule", "schedule"), ("groups", "groups"), ("work_us", "step us"), ("client", "client"),
    ("torch_us", "torch us/step"), ("remote_us", "remote us/step"), ("ratio", "ratio"),
    ("torch_p99_us", "torch p99 us"), ("remote_p99_us", "remote p99 us"),
    ("torch_cpu_us", "torch CPU us"), ("remote_cpu_us", "remote CPU us"), ("cpu_ratio", "CPU ratio"),
    ("requests_per_1k", "req/1k steps"),
]


def _plan(size: Size, schedules: list[str]) -> list[tuple[str, int, float, int]]:
    """(schedule, groups, work per step, steps per segment) of every measurement."""
    plan = []
    for name in schedules:
        works = [(size.step_work_s, size.step_segment)]
        if name == "plateau":
            works.append((size.step_long_work_s, size.step_long_segment))
        plan.extend((name, groups, w, n) for w, n in works for groups in (1, 10))
    return plan


def run(size: Size, work: Path, pool: Pool, *, schedules: list[str] | None = None) -> dict[str, Any]:
    try:
        import torch  # noqa: F401
    except ImportError:
        return report.skipped(NAME, TITLE, "torch is not installed")
    tag = uuid.uuid4().hex[:8]
    rows = []
    with pool.sqlite("client_step") as server, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation chatter is not what is measured
        for name, groups, work_s, steps in _plan(size, schedules or list(SCHEDULES)):
            rows.extend(_measure(server.url, name, groups, work_s, steps, size, tag))
    ratios = [r["ratio"] for r in rows]
    holds = all(r <= TARGET_RATIO for r in ratios)
    failing = [f"{r['schedule']}/{r['groups']}/{r['work_us']:.0f}us/{r['client']}" for r in rows
               if r["ratio"] > TARGET_RATIO]
    notes = [
        "a training step: sleep 'step us' (GIL-free, as torch kernels), optimizer.step(), the tick; "
        f"{size.step_rounds} rounds x {size.step_segment} steps ({size.step_long_segment} at "
        f"{size.step_long_work_s * 1e3:g} ms) per variant after a warm-up segment",
        "us/step = time inside the tick + time in the optimizer's pre-step hooks (where an "
        "overlapping client takes its decision), over all steps",
        f"the loop itself (empty tick and hook timers): {median([r['loop_us'] for r in rows]):.2f} us/step",
        f"aim ratio <= {AIM_RATIO}: met by {sum(r <= AIM_RATIO for r in ratios)} of {len(rows)} rows",
        f"plateau: both sides call step(metric) once per {EPOCH} steps and nothing in between "
        "(torch's pattern); client 'waits' = the default (step(metric) returns with the decision), "
        "'overlap' = overlap_decisions=True (taken in the next optimizer.step())",
    ]
    if failing:
        notes.append("ratio above target: " + ", ".join(failing))
    return report.figure(
        NAME, TITLE,
        ran=f"RemoteScheduler against `lrserve serve` (SQLite, 1 process, loopback); "
            f"torch {_torch_version()} schedulers in the same process and loop",
        target=f"ratio (remote / torch, time per step in the scheduler) <= {TARGET_RATIO} for every row "
               f"(aim <= {AIM_RATIO})",
        holds=holds, columns=COLUMNS, rows=rows, notes=notes,
    )


def _torch_version() -> str:
    import torch

    return torch.__version__
