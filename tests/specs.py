"""Sample schedule specs the tests share: one home for the shapes many tests need.

Each is a function returning a fresh dict (a test may change its copy); keyword arguments
override or add the schedule's own arguments, so a test states only what it depends on:
``plateau(threshold=0.0, threshold_mode="abs")``. Specs whose point is one odd field (the
validation tables of ``test_spec.py``) stay written out where they are tested.
"""

from __future__ import annotations

from typing import Any

Spec = dict[str, Any]


def plateau(**args: Any) -> Spec:
    """``ReduceLROnPlateau`` that halves the LR at the first report that does not improve on
    the best (``factor=0.5, patience=0``), watching ``val_loss`` (torch's defaults otherwise)."""
    return {"type": "ReduceLROnPlateau", "factor": 0.5, "patience": 0, **args}


def plateau_on_any_rise(**args: Any) -> Spec:
    """``plateau()`` whose threshold is zero: any report not strictly below the best reduces."""
    return plateau(threshold=0.0, threshold_mode="abs", **args)


def plateau_max_acc(**args: Any) -> Spec:
    """A plateau on a metric that should rise: ``monitor="val_acc", mode="max"``."""
    return {"type": "ReduceLROnPlateau", "monitor": "val_acc", "mode": "max", **args}


def warmup_then(schedule: Spec, *, steps: int, start_factor: float = 0.1) -> Spec:
    """``LinearLR`` from ``start_factor`` up to the base LR over ``steps``, then ``schedule``."""
    return {"type": "SequentialLR", "milestones": [steps], "schedulers": [
        {"type": "LinearLR", "start_factor": start_factor, "total_iters": steps}, schedule]}
