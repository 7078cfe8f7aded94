"""One epoch of training and one validation pass, with the scheduler where torch puts it.

Per-batch stepping calls ``scheduler.step()`` after every optimizer step, and on the
epoch's last batch ``scheduler.step(metrics)`` after validation: the metric then describes
the training done at the previous step's values, as API.md's step rule wants. Per-epoch
stepping makes only that last call. Nothing in the hot path forces a GPU sync: the
training loss is accumulated on the device and read once per epoch. Except while a range
test runs: then every step carries the training loss (``step_metrics``), the batch's, or
the epoch's mean when stepping per epoch, since the server chooses the LR from them.

Timing: a step is one batch (to device, forward, backward, optimizer, scheduler); the
time spent inside ``scheduler.step()`` is measured separately, so the summary can say
what share of the step the served schedule costs. The reporting step also waits for the
server's metric barrier (the slowest rank), which is why it is counted apart as well.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["Evaluation", "Precision", "StepTimes", "evaluate", "make_precision", "train_epoch"]


@dataclass
class Precision:
    """Mixed precision on CUDA: autocast at ``dtype``, and a GradScaler for fp16 only."""

    device: torch.device
    dtype: torch.dtype | None = None
    scaler: Any | None = None

    def autocast(self) -> AbstractContextManager[Any]:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "off")  # type: ignore[arg-type]


def make_precision(device: torch.device, choice: str) -> Precision:
    """bf16 needs no loss scaling; fp16 (GPUs without bf16) does; the CPU trains in fp32."""
    if device.type != "cuda" or choice == "off":
        return Precision(device)
    if choice == "bf16" or (choice == "auto" and torch.cuda.is_bf16_supported()):
        return Precision(device, torch.bfloat16)
    return Precision(device, torch.float16, torch.amp.GradScaler("cuda"))


@dataclass
class StepTimes:
    """Seconds spent in training steps and inside ``scheduler.step()``."""

    steps: int = 0
    step_s: float = 0.0
    sched_s: float = 0.0
    reports: int = 0
    report_s: float = 0.0  # scheduler.step(metrics) calls: a request, maybe a barrier wait

    def add(self, step_s: float, sched_s: float, *, report: bool = False) -> None:
        self.steps += 1
        self.step_s += step_s
        self.sched_s += sched_s
        if report:
            self.reports += 1
            self.report_s += sched_s

    def summary(self) -> dict[str, float]:
        plain = self.steps - self.reports
        return {
            "step_ms": 1e3 * self.step_s / max(1, self.steps),
            "scheduler_share": self.sched_s / self.step_s if self.step_s else 0.0,
            "scheduler_us": 1e6 * (self.sched_s - self.report_s) / max(1, plain),
            "report_ms": 1e3 * self.report_s / max(1, self.reports),
        }


@dataclass
class Evaluation:
    """Validation loss and accuracy on this rank's shard and over all ranks."""

    local_loss: float
    local_acc: float
    loss: float
    acc: float
    extra: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: Precision,
             all_sum: Any, chunk: int = 4096) -> Evaluation:
    """Sums on this rank's shard, then one all_reduce for the global figures."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.int64)
    for i in range(0, len(y), chunk):
        xb, yb = x[i:i + chunk], y[i:i + chunk]
        with precision.autocast():
            logits = model(xb)
        loss += F.cross_entropy(logits.float(), yb, reduction="sum").double()
        correct += (logits.argmax(dim=1) == yb).sum()
    model.train(was_training)
    local = [float(loss), float(correct), float(len(y))]
    total = all_sum(local)
    return Evaluation(local[0] / local[2], local[1] / local[2], total[0] / total[2], total[1] / total[2])


def _no_metrics(loss: Any) -> None:
    """Plain steps carry no metric (no range test): the scheduler's fast path."""
    return None


def _same_loss(loss: Any, step: int) -> Any:
    return loss


def _nothing(loss: Any, step: int) -> None:
    return None


@dataclass
class EpochContext:
    """What ``train_epoch`` works with; built once per run."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any
    precision: Precision
    step_per: str
    on_step: Any  # (step, epoch) -> None, after each scheduler.step()
    on_batch: Any  # () -> None, after each batch (progress bar)
    times: StepTimes = field(default_factory=StepTimes)
    step_metrics: Any = field(default=_no_metrics)  # (loss) -> a range test's metrics, or None
    shape_loss: Any = field(default=_same_loss)  # (loss, step) -> the loss to back-propagate
    after_step: Any = field(default=_nothing)  # (loss, step) after scheduler.step(): spike guard


def train_epoch(ctx: EpochContext, epoch: int, validate: Any, report: Any) -> tuple[float, Evaluation]:
    """Train one epoch; returns the rank's mean training loss and the validation result.

    ``validate()`` gives an ``Evaluation``; ``report(evaluation)`` gives the metrics dict
    passed with the epoch's last ``scheduler.step()``.
    """
    device = ctx.precision.device
    ctx.loader.sampler.set_epoch(epoch)
    ctx.model.train()
    loss_sum = torch.zeros((), device=device)
    seen = 0
    last = len(ctx.loader) - 1
    for i, (xb, yb) in enumerate(ctx.loader):
        t0 = time.perf_counter()
        xb = xb.to(device, non_blocking=True)
        yb = yb.to(device, non_blocking=True)
        with ctx.precision.autocast():
            loss = ctx.shape_loss(F.cross_entropy(ctx.model(xb), yb), ctx.scheduler.last_epoch + 1)
        ctx.optimizer.zero_grad(set_to_none=True)
        scaler = ctx.precision.scaler
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(ctx.optimizer)
            scaler.update()
        else:
            loss.backward()
            ctx.optimizer.step()
        loss_sum += loss.detach().float() * len(yb)
        seen += len(yb)
        if i < last:
            if ctx.step_per == "batch":
                metrics = ctx.step_metrics(loss.detach())
                t1 = time.perf_counter()
                ctx.scheduler.step(metrics)
                t2 = time.perf_counter()
                ctx.times.add(t2 - t0, t2 - t1, report=metrics is not None)
                ctx.after_step(loss, ctx.scheduler.last_epoch)
                ctx.on_step(ctx.scheduler.last_epoch, epoch)
            else:
                ctx.times.add(time.perf_counter() - t0, 0.0)
            ctx.on_batch()
            continue
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the epoch's queued GPU work belongs to its steps
        computed = time.perf_counter() - t0
        evaluation = validate()
        train_loss = float(loss_sum) / max(1, seen)
        ctx.scheduler.log(train_loss=train_loss)
        test_loss = loss.detach() if ctx.step_per == "batch" else train_loss
        metrics = {**report(evaluation), **(ctx.step_metrics(test_loss) or {})}
        t1 = time.perf_counter()
        ctx.scheduler.step(metrics)
        sched_s = time.perf_counter() - t1
        ctx.times.add(computed + sched_s, sched_s, report=True)
        ctx.after_step(loss, ctx.scheduler.last_epoch)
        ctx.on_step(ctx.scheduler.last_epoch, epoch)
        ctx.on_batch()
    return train_loss, evaluation
