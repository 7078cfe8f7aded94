"""Named example schedules, and reading a schedule spec from a JSON file.

Specs are lrserve's JSON form of torch schedulers (API.md). The named examples are written
in *epochs* and turned into scheduler steps here, because how many steps an epoch has
depends on the batch size, the number of ranks and ``--step-per``; the JSON file form is
taken literally (its step counts are the user's business).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["EXAMPLES", "describe_examples", "resolve_schedule"]

Spec = dict[str, Any]


def _warmup_plateau(steps_per_epoch: int, epochs: int, lr: float) -> Spec:
    # Plateau patience counts reports (one per epoch), not steps. A high threshold (a 5%
    # relative improvement is needed) makes reductions happen within a short run on digits.
    warm = steps_per_epoch
    return {
        "type": "SequentialLR",
        "milestones": [warm],
        "schedulers": [
            {"type": "LinearLR", "start_factor": 0.1, "total_iters": warm},
            {"type": "ReduceLROnPlateau", "monitor": "val_loss", "mode": "min", "factor": 0.5,
             "patience": 0, "threshold": 0.05, "min_lr": lr * 1e-3},
        ],
    }


def _warmup_cosine(steps_per_epoch: int, epochs: int, lr: float) -> Spec:
    warm = steps_per_epoch
    return {
        "type": "SequentialLR",
        "milestones": [warm],
        "schedulers": [
            {"type": "LinearLR", "start_factor": 0.1, "total_iters": warm},
            {"type": "CosineAnnealingLR", "T_max": max(1, steps_per_epoch * epochs - warm),
             "eta_min": lr * 1e-2},
        ],
    }


def _one_cycle(steps_per_epoch: int, epochs: int, lr: float) -> Spec:
    # Cycles momentum too: the trace then shows the momentum the server sends.
    return {"type": "OneCycleLR", "max_lr": lr, "total_steps": steps_per_epoch * epochs}


def _step(steps_per_epoch: int, epochs: int, lr: float) -> Spec:
    return {"type": "StepLR", "step_size": 2 * steps_per_epoch, "gamma": 0.5}


def _plateau(steps_per_epoch: int, epochs: int, lr: float) -> Spec:
    return {"type": "ReduceLROnPlateau", "factor": 0.5, "patience": 1, "threshold": 0.01}


def _range_test(steps_per_epoch: int, epochs: int, lr: float) -> Spec:
    # Two epochs of an exponential sweep (enough points past the 10 the suggestion skips),
    # then cosine decay from the suggested LR. T_max spans the whole job so the cosine never
    # passes its minimum and rises again, wherever the test stops early.
    num_steps = max(2, 2 * steps_per_epoch)
    return {
        "type": "LRRangeTest", "min_lr": 1e-4, "max_lr": 10.0, "num_steps": num_steps,
        "then": {"type": "CosineAnnealingLR", "T_max": max(1, steps_per_epoch * epochs)},
    }


EXAMPLES: dict[str, tuple[Callable[[int, int, float], Spec], str]] = {
    "warmup-plateau": (_warmup_plateau, "1 epoch linear warm-up from 0.1x, then halve on a val_loss plateau"),
    "warmup-cosine": (_warmup_cosine, "1 epoch linear warm-up, then cosine decay to 0.01x"),
    "onecycle": (_one_cycle, "OneCycleLR to --lr over the whole run (cycles momentum)"),
    "step": (_step, "halve the LR every 2 epochs"),
    "plateau": (_plateau, "ReduceLROnPlateau alone (patience 1)"),
    "range-test": (_range_test, "2 epochs of LR range test 1e-4 to 10, then cosine decay from the "
                   "suggested LR (weights restored at the switch)"),
}


def describe_examples() -> str:
    """One line per named example, for ``--help``."""
    return "; ".join(f"{name}: {doc}" for name, (_, doc) in EXAMPLES.items())


def resolve_schedule(value: str, *, steps_per_epoch: int, epochs: int, lr: float) -> Spec:
    """A named example (sized to this run) or the spec in the JSON file ``value``.

    Raises:
        SystemExit: ``value`` is neither a known name nor a readable JSON object.
    """
    if value in EXAMPLES:
        return EXAMPLES[value][0](steps_per_epoch, epochs, lr)
    path = Path(value)
    if not path.is_file():
        raise SystemExit(
            f"trainer: --schedule {value!r} is neither a named example ({', '.join(EXAMPLES)}) "
            "nor a JSON file"
        )
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SystemExit(f"trainer: {path} is not valid JSON: {exc}") from exc
    if not isinstance(spec, dict) or "type" not in spec:
        raise SystemExit(f'trainer: {path} must hold a spec object like {{"type": "StepLR", ...}}')
    return spec
