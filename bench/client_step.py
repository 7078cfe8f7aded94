"""Figure 1: what ``RemoteScheduler.step()`` costs a training loop, against torch's own.

Both schedulers drive their own SGD optimizer in the same loop, in alternating segments
(torch, remote, and an empty tick that measures the loop itself). Between ticks the loop
"trains" by sleeping ``step_work_s``: a GIL-free pause, as torch kernels are, during which
the client's fetch thread may run on the other core, as it would in a real job.

Per segment, each variant reports:

- **time in step()**: the sum of the time spent inside ``step()`` divided by the steps,
  so a step that waits for a window, and the one request per epoch a plateau schedule
  makes, are paid in full (what the loop waits for);
- **CPU per step**: the process's CPU time over the segment (all threads: the fetch
  thread's requests and JSON parsing included) minus the empty tick's, per step.

The table shows the median over segments and the p99 of single ``step()`` calls.
"""

from __future__ import annotations

import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import report
from bench.servers import Pool
from bench.sizes import Size
from bench.stats import median, percentile, rotations

NAME = "client_step"
TITLE = "Figure 1: client step cost, RemoteScheduler.step() vs torch scheduler.step()"
TARGET_RATIO = 1.0
AIM_RATIO = 0.5
EPOCH = 100  # steps per epoch; the plateau schedule gets its metric once per epoch
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


def _ticks(name: str, torch_sched: Any, remote: Any) -> dict[str, Callable[[], None]]:
    """One call per training step, for each variant; plateau ones report once per epoch."""
    if name != "plateau":
        return {"torch": torch_sched.step, "remote": remote.step, "loop": lambda: None}
    counts = {"torch": 0, "remote": 0}

    def torch_tick() -> None:
        counts["torch"] += 1
        if counts["torch"] % EPOCH == 0:
            torch_sched.step(_metric(counts["torch"] // EPOCH))

    def remote_tick() -> None:
        counts["remote"] += 1
        k = counts["remote"]
        if k % EPOCH == 0:
            remote.step(_metric(k // EPOCH))
        else:
            remote.step()

    return {"torch": torch_tick, "remote": remote_tick, "loop": lambda: None}


def _segment(tick: Callable[[], None], steps: int, work_s: float) -> tuple[list[int], float, float]:
    """Run ``steps`` ticks; per-call ns, mean ns per step inside tick, CPU seconds."""
    times = []
    clock = time.perf_counter_ns
    sleep = time.sleep
    cpu0 = time.process_time()
    for _ in range(steps):
        sleep(work_s)
        t0 = clock()
        tick()
        times.append(clock() - t0)
    cpu = time.process_time() - cpu0
    return times, sum(times) / steps, cpu


def _measure(url: str, name: str, groups: int, size: Size, tag: str) -> dict[str, Any]:
    import httpx

    from client import RemoteScheduler

    requests = [0]
    http = httpx.Client(base_url=url, timeout=httpx.Timeout(10.0, connect=3.0),
                        event_hooks={"request": [lambda _: requests.__setitem__(0, requests[0] + 1)]})
    opt_t, opt_r = _optimizer(groups), _optimizer(groups)
    torch_sched = _torch_scheduler(name, opt_t)
    opt_t.step()  # torch warns when its scheduler steps before the optimizer ever did
    t0 = time.perf_counter()
    remote = RemoteScheduler(opt_r, SCHEDULES[name], run_id=f"bench-{tag}-{name.replace('+', '-')}-{groups}",
                             http_client=http, steps_per_epoch=EPOCH if name == "plateau" else None)
    create_ms = (time.perf_counter() - t0) * 1e3
    try:
        ticks = _ticks(name, torch_sched, remote)
        for variant in ("torch", "remote"):  # warm-up: the client's windows grow to size here
            _segment(ticks[variant], size.step_segment, size.step_work_s)
        requests[0] = 0
        per_step: dict[str, list[float]] = {v: [] for v in ticks}
        cpu: dict[str, list[float]] = {v: [] for v in ticks}
        calls: dict[str, list[int]] = {v: [] for v in ticks}
        for order in rotations(list(ticks), size.step_rounds):
            for variant in order:
                times, mean_ns, cpu_s = _segment(ticks[variant], size.step_segment, size.step_work_s)
                per_step[variant].append(mean_ns / 1e3)
                cpu[variant].append(cpu_s)
                calls[variant].extend(times)
    finally:
        remote.close()
        http.close()
    base_cpu = median(cpu["loop"])
    n = size.step_segment
    row: dict[str, Any] = {"schedule": name, "groups": groups, "create_ms": create_ms}
    for variant in ("torch", "remote"):
        row[f"{variant}_us"] = median(per_step[variant])
        row[f"{variant}_p99_us"] = percentile(calls[variant], 99) / 1e3
        row[f"{variant}_cpu_us"] = max(0.0, (median(cpu[variant]) - base_cpu) / n * 1e6)
    pairs = zip(per_step["remote"], per_step["torch"], strict=True)
    row["ratio"] = median([r / t for r, t in pairs if t > 0])
    row["cpu_ratio"] = row["remote_cpu_us"] / row["torch_cpu_us"] if row["torch_cpu_us"] else float("nan")
    row["loop_us"] = median(per_step["loop"])
    row["requests_per_1k"] = requests[0] / (size.step_rounds * n) * 1000
    return row


COLUMNS = [
    ("schedule", "schedule"), ("groups", "groups"),
    ("torch_us", "torch us/step"), ("remote_us", "remote us/step"), ("ratio", "ratio"),
    ("torch_p99_us", "torch p99 us"), ("remote_p99_us", "remote p99 us"),
    ("torch_cpu_us", "torch CPU us"), ("remote_cpu_us", "remote CPU us"), ("cpu_ratio", "CPU ratio"),
    ("requests_per_1k", "req/1k steps"),
]


def run(size: Size, work: Path, pool: Pool, *, schedules: list[str] | None = None) -> dict[str, Any]:
    try:
        import torch  # noqa: F401
    except ImportError:
        return report.skipped(NAME, TITLE, "torch is not installed")
    tag = uuid.uuid4().hex[:8]
    rows = []
    with pool.sqlite("client_step") as server, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation chatter is not what is measured
        for name in schedules or list(SCHEDULES):
            for groups in (1, 10):
                rows.append(_measure(server.url, name, groups, size, tag))
    ratios = [r["ratio"] for r in rows]
    holds = all(r <= TARGET_RATIO for r in ratios)
    failing = [f"{r['schedule']}/{r['groups']}" for r in rows if r["ratio"] > TARGET_RATIO]
    notes = [
        f"loop: sleep {size.step_work_s * 1e6:.0f} us (a GIL-free 'training step'), then step(); "
        f"{size.step_rounds} rounds x {size.step_segment} steps per variant after a warm-up segment",
        f"timer overhead inside every step (empty tick): {median([r['loop_us'] for r in rows]):.2f} us",
        f"aim ratio <= {AIM_RATIO}: met by {sum(r <= AIM_RATIO for r in ratios)} of {len(rows)} rows",
        "plateau: torch calls ReduceLROnPlateau.step(metric) once per epoch of "
        f"{EPOCH} steps and nothing in between; the remote calls step() every step and "
        "step(metric) once per epoch (one POST .../step round trip, which decides that step)",
    ]
    if failing:
        notes.append("ratio above target: " + ", ".join(failing))
    return report.figure(
        NAME, TITLE,
        ran=f"RemoteScheduler against `python -m service serve` (SQLite, 1 process, loopback); "
            f"torch {_torch_version()} schedulers in the same process and loop",
        target=f"ratio (remote / torch time in step()) <= {TARGET_RATIO} for every row "
               f"(aim <= {AIM_RATIO})",
        holds=holds, columns=COLUMNS, rows=rows, notes=notes,
    )


def _torch_version() -> str:
    import torch

    return torch.__version__
