"""The trainer's side of an LR range test (an ``LRRangeTest`` schedule, with or without ``then``).

The server raises the LR step by step and chooses one from the losses it hears, so while
the test runs the job must report its training loss with *every* step. With the metric
barrier each rank reports its own batch loss and the server decides on their mean (the
test's ``monitor`` is a watched metric); with ``--metric-mode allreduce`` the ranks
all_reduce it first. Once the run switches to ``then``, the job goes back to reporting
the validation metric at epoch ends.

The test's high LRs wreck the weights, so the job keeps the model and optimizer state of
before the test and puts it back in ``RemoteScheduler``'s ``on_schedule_switch`` hook,
as Lightning's ``lr_find`` does: training then starts afresh at the chosen LR. Every rank
restores the same saved state, so DDP's replicas stay identical without a broadcast.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lrserve.client import LRClient, LRServiceError

__all__ = [
    "RangeTest", "allreduce_mean", "finder_line", "is_range_test", "read_finder", "weights_fingerprint",
]

SNAPSHOT_KEY = "before_range_test"


def is_range_test(spec: Mapping[str, Any]) -> bool:
    return spec.get("type") == "LRRangeTest"


def finder_line(finder: Mapping[str, Any]) -> str:
    """One line about ``GET /v1/runs/{id}/lr-finder``'s answer, for rank 0 to print."""
    suggestions = finder.get("suggestions") or {}
    lrs = finder.get("lrs") or []
    swept = f" lr {_g(lrs[0])}..{_g(lrs[-1])}" if lrs else ""
    line = (f"lr-finder: chosen={_g(finder.get('chosen'))} steepest={_g(suggestions.get('steepest'))} "
            f"min_over_10={_g(suggestions.get('min_over_10'))} switched_at={finder.get('switched_at')} "
            f"points={len(lrs)}/{finder.get('num_steps')}{swept}")
    if finder.get("chosen") is not None and not any(v is not None for v in suggestions.values()):
        # both rules skip the first 10 points and the last: a test this short suggests nothing
        line += " (too few points for a suggestion: the run's base LR, --lr)"
    return line


def weights_fingerprint(model: torch.nn.Module) -> float:
    """A sum over every weight: equal on two models with equal weights (traced at the switch,
    so a test can see the restore happened and left the ranks' replicas identical)."""
    return float(sum(float(t.double().sum()) for t in model.state_dict().values()))


def read_finder(url: str, token: str | None, run_id: str) -> dict[str, Any] | None:
    """The run's ``lr-finder`` answer, or None (said on stdout) when the server gives none.

    Only printed and summarised: a failed read must not end a training job.
    """
    try:
        with LRClient(url, token=token) as api:
            return api.read_lr_finder(run_id)
    except LRServiceError as exc:
        print(f"trainer: could not read the lr-finder of run {run_id!r}: {exc}", flush=True)
        return None


def _g(value: Any) -> str:
    return "None" if value is None else f"{float(value):.4g}"


class RangeTest:
    """Whether the run's range test is on, what to report with a step, and the restore hook.

    Args:
        spec: The run's schedule; anything but an ``LRRangeTest`` makes this a no-op.
        model: The (unwrapped) model whose weights are saved and restored.
        optimizer: Its optimizer (momentum buffers are restored too).
        mean: Turns this rank's loss into the value to report (the identity with the
            barrier, the all_reduced mean in allreduce mode).
        scaler: fp16's GradScaler, if any: the test's overflows lower its scale, so it is
            restored too.
    """

    def __init__(self, spec: Mapping[str, Any], model: torch.nn.Module, optimizer: Any,
                 mean: Callable[[float], float] = float, scaler: Any | None = None) -> None:
        self.enabled = is_range_test(spec)
        self.running = self.enabled
        self.monitor = str(spec.get("monitor") or "loss")
        self.switched_at: int | None = None
        self._model = model
        self._optimizer = optimizer
        self._mean = mean
        self._scaler = scaler
        self._saved: dict[str, Any] | None = None
        self._untraced = False

    def start(self, checkpoint: Mapping[str, Any] | None) -> None:
        """Take the state to restore: now, or the checkpoint's (a job resumed mid-test).

        Call after the model and optimizer are loaded from ``checkpoint`` and before the
        scheduler is, so a resumed job knows whether the test is over.
        """
        if not self.enabled:
            return
        switched = (checkpoint or {}).get("scheduler", {}).get("switched_at")
        if switched is not None:  # the checkpoint was taken after the switch
            self.running, self.switched_at = False, int(switched)
        elif checkpoint is not None and checkpoint.get(SNAPSHOT_KEY) is not None:
            self._saved = checkpoint[SNAPSHOT_KEY]
        else:
            self._saved = self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        scaler = self._scaler.state_dict() if self._scaler is not None else None
        return {"model": copy.deepcopy(self._model.state_dict()),
                "optimizer": copy.deepcopy(self._optimizer.state_dict()),
                "scaler": copy.deepcopy(scaler)}

    def step_metrics(self, loss: Any) -> dict[str, float] | None:
        """What to pass to ``scheduler.step()`` for a step that trained with ``loss``.

        ``None`` outside the test, so the loop's plain steps stay the scheduler's fast path
        (and read no loss from the device).
        """
        if not self.running:
            return None
        return {self.monitor: self._mean(float(loss))}

    def on_switch(self, scheduler: Any) -> None:
        """``RemoteScheduler``'s hook: the test is over at this step; restore the saved state."""
        if self._saved is not None:
            self._model.load_state_dict(self._saved["model"])
            self._optimizer.load_state_dict(self._saved["optimizer"])
            if self._scaler is not None and self._saved.get("scaler"):
                self._scaler.load_state_dict(self._saved["scaler"])
        self._saved = None
        self.running = False
        self.switched_at = int(scheduler.last_epoch)
        self._untraced = True

    def just_switched(self) -> bool:
        """True once, on the first call after the switch (to trace and print it once)."""
        untraced, self._untraced = self._untraced, False
        return untraced

    def checkpoint_extra(self) -> dict[str, Any]:
        """What a checkpoint taken now must hold to restore the pre-test state after a resume."""
        return {SNAPSHOT_KEY: self._saved} if self.running and self._saved is not None else {}


def allreduce_mean(all_sum: Callable[[list[float]], list[float]],
                   world_size: int) -> Callable[[float], float]:
    """The mean over ranks of a per-rank value (identical on every rank), for allreduce mode."""
    def mean(value: float) -> float:
        return all_sum([value])[0] / world_size
    return mean
