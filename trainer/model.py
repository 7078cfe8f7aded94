"""The network: a small multi-layer perceptron over the 64 pixels of a digit.

Small on purpose: the point of the reference trainer is the loop around it (schedules,
ranks, checkpoints), and an MLP this size trains to ~97% in a few seconds on a CPU, so the
end-to-end tests can run real training. No dropout, so a run is a deterministic function
of its seed and data order, which lets the tests compare a resumed run with an
uninterrupted one bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["make_model"]


def make_model(n_features: int, n_classes: int, hidden: int = 128, seed: int = 0) -> nn.Module:
    """``Linear -> ReLU -> Linear -> ReLU -> Linear``, initialised from ``seed``.

    The seed makes every rank start from the same weights even before DDP broadcasts
    rank 0's (and makes single-process runs reproducible).
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return nn.Sequential(
            nn.Linear(n_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )
    finally:
        torch.random.set_rng_state(generator_state)
