"""The trainer's side of a spike guard (``--spike-guard``, ``--inject-spike``).

With ``--spike-guard`` the schedule is wrapped in a ``SpikeGuard`` and every rank logs its
own batch loss with every step (``RemoteScheduler.log``: sent in the background, the step
never waits). The server judges each rank's losses; a spike on any rank backs the LR off
on every rank from the same step, and ``on_spike`` is called there on every rank.

**Rollback.** The job keeps in-memory snapshots of the model and optimizer state every
``snapshot_every`` steps (the state after that many optimizer steps). ``on_spike``
restores the newest snapshot taken at or before the event's ``last_good_step``: every
rank took the same snapshots at the same steps and gets the same event at the same step,
so DDP's replicas stay identical without a broadcast. Training then goes on with the next
batches (the spike's batch is not repeated) at the backed-off LR, which the scheduler
writes right after the callback.

**Injection** (``--inject-spike STEP:RANK:FACTOR``, or ``STEP:RANK:nan``) multiplies one
rank's loss of the batch reported with ``STEP`` before the backward pass (or makes it
NaN): the gradient DDP averages is wrecked on every rank, as a real bad batch would, and
only that rank reports the spike.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Injection", "SpikeHandler", "guard_schedule", "parse_injection"]

DEFAULT_SNAPSHOT_EVERY = 10
DEFAULT_SNAPSHOTS_KEPT = 200
LOG_EVERY = 4
"""Batch losses are read off the device (a sync) and logged every this many steps."""


@dataclass(frozen=True)
class Injection:
    """Multiply rank ``rank``'s loss reported with ``step`` by ``factor`` (NaN: make it NaN)."""

    step: int
    rank: int
    factor: float


def parse_injection(text: str) -> Injection:
    """``STEP:RANK:FACTOR`` or ``STEP:RANK:nan``, e.g. ``150:1:50``."""
    parts = text.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        step, rank = int(parts[0]), int(parts[1])
        factor = float(parts[2])
    except ValueError:
        expected = "expected STEP:RANK:FACTOR or STEP:RANK:nan"
        raise SystemExit(f"trainer: --inject-spike {text!r}: {expected}") from None
    if step < 1 or rank < 0 or not (math.isnan(factor) or factor > 0):
        raise SystemExit(f"trainer: --inject-spike {text!r}: STEP >= 1, RANK >= 0, FACTOR > 0 or nan")
    return Injection(step, rank, factor)


def guard_schedule(spec: Mapping[str, Any], settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """``spec`` inside a ``SpikeGuard`` (the server's defaults, unless ``settings`` name others)."""
    if spec.get("type") == "SpikeGuard":
        return dict(spec)
    return {"type": "SpikeGuard", "schedule": dict(spec), **(settings or {})}


@dataclass
class SpikeHandler:
    """Logs batch losses, injects spikes, snapshots and rolls back on ``on_spike``."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    rank: int
    enabled: bool
    injections: Sequence[Injection] = ()
    monitor: str = "loss"
    snapshot_every: int = DEFAULT_SNAPSHOT_EVERY
    snapshots: deque[tuple[int, dict[str, Any]]] = field(
        default_factory=lambda: deque(maxlen=DEFAULT_SNAPSHOTS_KEPT)
    )
    events: list[dict[str, Any]] = field(default_factory=list)
    rollbacks: list[int] = field(default_factory=list)  # the snapshot step restored, per spike
    _pending: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    _new: list[tuple[dict[str, Any], int]] = field(default_factory=list)

    def take_new(self) -> list[tuple[dict[str, Any], int]]:
        """The spikes handled since the last call, with the snapshot step restored (-1: none)."""
        new, self._new = self._new, []
        return new

    def shape_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The loss to back-propagate for the batch reported with ``step`` (injected or not)."""
        for inj in self.injections:
            if inj.step == step and inj.rank == self.rank:
                return loss * inj.factor if not math.isnan(inj.factor) else loss * float("nan")
        return loss

    def after_step(self, scheduler: Any, loss: torch.Tensor, step: int) -> None:
        """The batch reported with ``step`` is done: log its loss, snapshot every few steps."""
        if not self.enabled:
            return
        self._pending.append((step, loss.detach()))
        if len(self._pending) >= LOG_EVERY:
            self.flush_losses(scheduler)
        if step % self.snapshot_every == 0:
            self.snapshot(step)

    def flush_losses(self, scheduler: Any) -> None:
        """Log the batch losses held (one device sync for all of them)."""
        if not self._pending:
            return
        values = torch.stack([t.float() for _, t in self._pending]).tolist()
        for (step, _), value in zip(self._pending, values, strict=True):
            scheduler.log({self.monitor: value}, step=step)
        self._pending.clear()

    def snapshot(self, step: int) -> None:
        """Keep the state after ``step`` optimizer steps (on the CPU)."""
        state = {
            "model": {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()},
            "optimizer": copy.deepcopy(_to_cpu(self.optimizer.state_dict())),
        }
        self.snapshots.append((step, state))

    def on_spike(self, event: dict[str, Any]) -> None:
        """``RemoteScheduler``'s callback: restore the newest snapshot at or before ``last_good_step``."""
        self.events.append(event)
        good = int(event["last_good_step"])
        chosen = None
        for step, state in reversed(self.snapshots):
            if step <= good:
                chosen = (step, state)
                break
        if chosen is None:
            self.rollbacks.append(-1)  # nothing old enough kept: train on (the backoff still helps)
            self._new.append((event, -1))
            return
        step, state = chosen
        device = next(self.model.parameters()).device
        self.model.load_state_dict({k: v.to(device) for k, v in state["model"].items()})
        self.optimizer.load_state_dict(state["optimizer"])
        self.rollbacks.append(step)
        self._new.append((event, step))
        while self.snapshots and self.snapshots[-1][0] > step:  # taken on the spoiled weights
            self.snapshots.pop()


def _to_cpu(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_to_cpu(v) for v in state]
    return state
