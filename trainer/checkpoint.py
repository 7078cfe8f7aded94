"""Checkpoints: model, optimizer, scheduler (and AMP scaler) state after each finished epoch.

Written by rank 0 only (DDP keeps the replicas identical) to a temporary file and renamed,
so a job killed while saving leaves the previous checkpoint intact. The scheduler part is
``RemoteScheduler.state_dict()``: the run id and step. Values at steps already handed out
are final on the server, so a resumed job gets exactly the LRs it would have had; and
since the data order is seeded per epoch, it trains exactly as an uninterrupted job.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["load", "save"]

FORMAT = 1


def save(path: str | os.PathLike[str], *, epoch: int, model: torch.nn.Module, optimizer: Any,
         scheduler: Any, scaler: Any | None, extra: dict[str, Any]) -> None:
    """Write the state after ``epoch`` (1-based: the number of epochs done) to ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        **extra,
    }
    tmp = target.with_name(target.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, target)


def load(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (tensors on the CPU), or None when there is none yet."""
    target = Path(path)
    if not target.exists():
        return None
    # weights_only: a checkpoint holds tensors and plain values only, so nothing in the
    # file can run code when loaded.
    state = torch.load(target, map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT:
        raise SystemExit(
            f"trainer: {target} is not a checkpoint of this trainer (format {state.get('format')})"
        )
    return state
