"""Helpers of the trainer's end-to-end tests: run ``python -m lrserve.trainer`` (plainly or under
torchrun) against a real server, read the per-rank traces, and compute in torch what the
server should have served."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "trainer-test-admin"
JOB_TOKEN = "trainer-test-job"
TOKENS = f"admin:{ADMIN_TOKEN},write:{JOB_TOKEN}"
STDERR_TAIL = 40_000  # characters of a trainer's stderr a failure shows (Trainer.output)


def torchrun() -> list[str]:
    """The ``torchrun`` of this interpreter's environment (its module form as a fallback)."""
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


class Trainer:
    """``python -m lrserve.trainer`` (or ``torchrun --nproc_per_node=N -m lrserve.trainer``), a child
    process.

    ``through_outages=True`` runs it through ``tests.trainer.through_outages``: the one warning a
    job riding out a server outage must show, ``ServerAwayWarning``, is printed to stderr
    instead of raised; every other warning stays an error. ``exit_threads=True`` runs it through
    ``tests.trainer.exit_threads``: each rank names its native threads at exit
    (``exit_threads()``).
    """

    def __init__(self, tmp: Path, name: str, url: str, *args: str, ranks: int = 1,
                 through_outages: bool = False, exit_threads: bool = False) -> None:
        self.tmp = tmp
        self.name = name
        self.trace = str(tmp / f"{name}.{{rank}}.jsonl")
        launcher = ([sys.executable] if ranks == 1
                    else [*torchrun(), "--standalone", f"--nproc_per_node={ranks}"])
        assert not (through_outages and exit_threads), "one wrapper module at a time"
        module = ("tests.trainer.through_outages" if through_outages
                  else "tests.trainer.exit_threads" if exit_threads else "lrserve.trainer")
        self.cmd = [*launcher, "-m", module, "--url", url, "--token", JOB_TOKEN,
                    "--trace", self.trace, *args]
        env = {k: v for k, v in os.environ.items()
               if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK"} and not k.startswith("LRSERVE_")}
        # Warnings are errors in the trainer too (as in pytest); one thread per rank suits
        # this small model on a small machine. A rank that dies of a signal (a fresh-clone CI
        # saw rank 1 abort: "terminate called without an active exception", SIGABRT, once in
        # five runs, not reproduced since) prints every thread's native stack (torch's handler,
        # which the trainer installs when faulthandler is on: ddp.native_stacks_on_crash),
        # then every thread's Python stack (faulthandler); output() keeps them.
        env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="error", PYTHONFAULTHANDLER="1")
        self.out = tmp / f"{name}.out"
        self.err = tmp / f"{name}.err"
        with open(self.out, "ab") as out, open(self.err, "ab") as err:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=err, env=env, cwd=ROOT,
                                         start_new_session=True)

    def wait(self, timeout: float = 150.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"trainer {self.name} ran over {timeout}s:\n{self.output()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=30)

    def output(self) -> str:
        """stdout, and stderr's last ``STDERR_TAIL`` characters: a crashed rank's stacks (~16,000
        characters for a rank of two) come before the other rank's traceback and torchrun's report."""
        return self.out.read_text() + "\n--- stderr ---\n" + self.err.read_text()[-STDERR_TAIL:]

    def exit_threads(self) -> dict[int, list[str]]:
        """Each rank's native threads at exit, by rank (``exit_threads=True``)."""
        found = re.findall(r"^exit threads rank (\d+): (\[.*\])$", self.err.read_text(), re.MULTILINE)
        return {int(rank): json.loads(names) for rank, names in found}

    def summary(self) -> dict[str, str]:
        lines = [ln for ln in self.out.read_text().splitlines() if ln.startswith("summary ")]
        assert len(lines) == 1, self.output()
        return dict(re.findall(r"(\w+)=(\S+)", lines[0]))

    def records(self, rank: int, kind: str = "step") -> list[dict[str, Any]]:
        return read_trace(Path(self.trace.replace("{rank}", str(rank))), kind)


def read_trace(path: Path, kind: str = "step") -> list[dict[str, Any]]:
    """The complete records of ``kind`` in a trace (a line being written is left out)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["kind"] == kind:
            records.append(record)
    return records


def wait_until(what: str, ready: Callable[[], bool], trainer: Trainer, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if trainer.proc.poll() is not None:
            raise AssertionError(f"the trainer ended before {what}:\n{trainer.output()}")
        if time.monotonic() > deadline:
            trainer.kill()
            raise AssertionError(f"no {what} within {timeout}s:\n{trainer.output()}")
        time.sleep(0.01)


def admin(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})


def rank_order_mean(values: Sequence[float]) -> float:
    """The server's barrier mean: the sum in rank order, divided by the number of ranks."""
    total = 0.0
    for value in values:
        total += value
    return total / len(values)


def warmup_plateau_reference(spec: Mapping[str, Any], base_lr: float, steps: int,
                             metrics: Mapping[int, float], scales: Mapping[int, float]) -> list[float]:
    """The LR at steps ``0..steps`` of a warm-up-then-plateau run, computed with torch in process.

    The server's rule (README, "Plateau inside SequentialLR"): LinearLR warms up; at the
    milestone the LR restarts at its base value and a ReduceLROnPlateau takes over, which
    hears the metric reported with step k only if it was already in charge at step k-1.
    An operator's ``scale`` at step s multiplies the LR right after the s-th ``step()``.
    """
    import torch

    warm_spec, plateau_spec = spec["schedulers"]
    (milestone,) = spec["milestones"]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr, momentum=0.9)
    warmup = torch.optim.lr_scheduler.LinearLR(
        opt, **{k: v for k, v in warm_spec.items() if k != "type"})
    kwargs = {k: v for k, v in plateau_spec.items() if k not in {"type", "monitor"}}
    plateau = None
    lrs = [opt.param_groups[0]["lr"]]
    for k in range(1, steps + 1):
        opt.step()
        if k < milestone:
            warmup.step()
        elif k == milestone:
            opt.param_groups[0]["lr"] = opt.param_groups[0]["initial_lr"]
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kwargs)
        elif k in metrics:
            assert plateau is not None
            plateau.step(metrics[k])
        if k in scales:
            opt.param_groups[0]["lr"] *= scales[k]
        lrs.append(opt.param_groups[0]["lr"])
    return lrs
