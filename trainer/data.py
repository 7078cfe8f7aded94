"""The data set: scikit-learn's bundled handwritten digits (8x8 images, 10 classes).

Chosen because it ships inside scikit-learn (``load_digits`` reads a file in the wheel, no
download), so the trainer and its tests run offline, yet it is a real classification task
that a small network learns to ~97% in seconds. The split is stratified and seeded, and
the features are standardised with the training split's statistics only (no leak from
the validation set).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

__all__ = ["Split", "load_split", "train_loader", "val_shard"]

VAL_FRACTION = 0.2


@dataclass(frozen=True)
class Split:
    """Standardised features and labels of the train and validation splits (CPU tensors)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_classes(self) -> int:
        return int(torch.cat([self.y_train, self.y_val]).max()) + 1


def load_split(seed: int = 0) -> Split:
    """Digits, split 80/20 (stratified, seeded) and standardised on the training split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_va, y_tr, y_va = train_test_split(
        x, y, test_size=VAL_FRACTION, stratify=y, random_state=seed
    )
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std[std == 0] = 1.0  # border pixels that are always blank stay 0 instead of dividing by 0

    def prep(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((a - mean) / std).astype(np.float32))

    return Split(prep(x_tr), torch.from_numpy(y_tr).long(), prep(x_va), torch.from_numpy(y_va).long())


def train_loader(
    split: Split, batch_size: int, rank: int, world_size: int, seed: int, pin_memory: bool
) -> DataLoader:
    """Shuffled batches of this rank's share of the training split.

    A ``DistributedSampler`` is used even for one process, so one code path gives the same
    seeded order per epoch (``set_epoch``) with or without torchrun; that is what makes a
    resumed run see the same batches as an uninterrupted one. It pads the shards to equal
    length, so every rank takes the same number of steps per epoch: the scheduler's step
    counts (and the server's steps) must agree across ranks.
    """
    sampler = DistributedSampler(
        TensorDataset(split.x_train, split.y_train),
        num_replicas=world_size,
        rank=rank,
        shuffle=True,
        seed=seed,
    )
    return DataLoader(
        TensorDataset(split.x_train, split.y_train),
        batch_size=batch_size,
        sampler=sampler,
        pin_memory=pin_memory,
    )


def val_shard(split: Split, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of the validation split: every ``world_size``-th sample, no padding.

    No padding, so summing loss and counts over ranks gives the exact global mean; each
    rank's local mean is what it reports to the server's metric barrier.
    """
    return split.x_val[rank::world_size], split.y_val[rank::world_size]
