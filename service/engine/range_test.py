"""The learning-rate range test (``LRRangeTest``): raise the LR, watch the loss, suggest one.

The rules follow PyTorch Lightning's ``Tuner.lr_find`` (``lightning/pytorch/tuner/
lr_finder.py``, ``_LRCallback`` and ``_LRFinder.suggestion``), re-derived here so the
service needs no Lightning:

- **LR at step k** of a ``num_steps`` test: ``min_lr * (max_lr/min_lr) ** (k/num_steps)``
  (exponential) or ``min_lr + (max_lr - min_lr) * k/num_steps`` (linear).
- **Smoothing**: the *i*-th reported loss (*i* from 1, Lightning's ``global_step``)
  updates ``avg = beta*avg + (1-beta)*loss`` and records ``avg / (1 - beta**(i+1))``.
- **Early stop**: from the 2nd report on, when the smoothed loss exceeds
  ``early_stop_threshold * best`` (the point is still recorded); ``best`` is the lowest
  smoothed loss, the 1st report included.
- **Steepest** suggestion: drop the first 10 and the last point, keep finite losses, take
  ``torch.gradient(losses, spacing=[lrs])`` (float32, as Lightning builds its tensors)
  and return the LR at its minimum.
- **min_over_10** (fastai's rule of thumb): the LR of the lowest smoothed loss, divided by 10.

A loss reported with step *k* describes training at the LR of step *k-1* (API.md); it is
paired with that LR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

SKIP_BEGIN = 10
SKIP_END = 1


@dataclass
class RangeTest:
    """State of one range test; plain data so it snapshots as JSON."""

    min_lr: float
    max_lr: float
    num_steps: int
    mode: str
    beta: float
    early_stop_threshold: float | None
    monitor: str = "loss"
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    avg: float = 0.0
    best: float = 0.0
    done: bool = False
    chosen: float | None = None

    def lr_at(self, step: int) -> float:
        """The LR the test sets at ``step`` (0 .. num_steps - 1)."""
        r = step / self.num_steps
        if self.mode == "linear":
            return self.min_lr + r * (self.max_lr - self.min_lr)
        growth: float = (self.max_lr / self.min_lr) ** r  # a positive base: a real power
        return self.min_lr * growth

    def record(self, lr: float, loss: float) -> None:
        """Pair a reported loss with the LR it was measured at; may end the test."""
        i = len(self.losses) + 1
        self.avg = self.beta * self.avg + (1 - self.beta) * loss
        smoothed = self.avg / (1 - self.beta ** (i + 1))
        if (
            self.early_stop_threshold is not None
            and i > 1
            and smoothed > self.early_stop_threshold * self.best
        ):
            self.done = True
        if smoothed < self.best or i == 1:
            self.best = smoothed
        self.lrs.append(lr)
        self.losses.append(smoothed)

    def steepest(self) -> float | None:
        """Lightning's suggestion: the LR where the smoothed loss falls fastest."""
        losses = torch.tensor(self.losses[SKIP_BEGIN:-SKIP_END])
        lrs = torch.tensor(self.lrs[SKIP_BEGIN:-SKIP_END])
        finite = torch.isfinite(losses)
        if int(finite.sum()) < 2:
            return None
        gradients = torch.gradient(losses[finite], spacing=[lrs[finite]])[0]
        index = torch.arange(len(self.losses))[SKIP_BEGIN:-SKIP_END][finite][int(torch.argmin(gradients))]
        return self.lrs[int(index)]

    def min_over_10(self) -> float | None:
        """The LR at the lowest smoothed loss, divided by 10 (same points as ``steepest``).

        The first points are skipped as for ``steepest``: the bias correction makes the
        first smoothed losses come out low, so they would win the minimum.
        """
        pairs = zip(self.losses[SKIP_BEGIN:-SKIP_END], self.lrs[SKIP_BEGIN:-SKIP_END], strict=True)
        points = [(loss, lr) for loss, lr in pairs if math.isfinite(loss)]
        if not points:
            return None
        return min(points)[1] / 10

    def finish(self, fallback: float) -> float:
        """End the test and choose: steepest, else min_over_10, else ``fallback``."""
        self.done = True
        for candidate in (self.steepest(), self.min_over_10()):
            if candidate is not None and math.isfinite(candidate) and candidate > 0:
                self.chosen = candidate
                break
        else:
            self.chosen = fallback
        return self.chosen

    def report(self) -> RangeTestReport:
        """What the test found so far (``GET .../lr-finder`` shows it)."""
        return RangeTestReport(
            self.min_lr, self.max_lr, self.num_steps, self.mode, self.monitor, tuple(self.lrs),
            tuple(self.losses), self.steepest(), self.min_over_10(), self.chosen, self.done,
        )


@dataclass(frozen=True)
class RangeTestReport:
    """A range test's curve (smoothed losses, each paired with its LR), suggestions and choice."""

    min_lr: float
    max_lr: float
    num_steps: int
    mode: str
    monitor: str
    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    steepest: float | None
    min_over_10: float | None
    chosen: float | None
    done: bool
