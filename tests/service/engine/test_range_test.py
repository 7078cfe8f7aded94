"""The range test's rules against PyTorch Lightning's own ``Tuner.lr_find``, run for real."""

from __future__ import annotations

import math

import pytest
import torch
from lrserve.service.engine.range_test import RangeTest


def tiny_regression():
    """A small model whose loss curve over a range test has a clear valley (Lightning is
    imported here, not at collection: it costs seconds in every worker that collects)."""
    import lightning.pytorch as lightning

    class TinyRegression(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
            self.lr = 1e-3
            self.raw_losses: list[float] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.raw_losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(4096, 8, generator=g)
            y = (x @ torch.linspace(-1, 1, 8)).unsqueeze(1)
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)

    return TinyRegression()


@pytest.mark.slow  # imports Lightning and runs its Tuner
@pytest.mark.filterwarnings("ignore")  # Lightning's own advice (workers, loggers) is not ours to fix
def test_smoothing_early_stop_and_suggestion_equal_lightnings(tmp_path):
    import lightning.pytorch as lightning

    torch.manual_seed(0)
    model = tiny_regression()
    trainer = lightning.Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    finder = lightning.tuner.Tuner(trainer).lr_find(model, min_lr=1e-5, max_lr=10.0, num_training=100)
    ours = RangeTest(
        min_lr=1e-5, max_lr=10.0, num_steps=100, mode="exponential", beta=0.98, early_stop_threshold=4.0
    )
    for lr, loss in zip(finder.results["lr"], model.raw_losses, strict=False):
        assert not ours.done  # Lightning went on, so must we
        ours.record(lr, loss)
    assert ours.losses == finder.results["loss"]
    assert ours.done == (len(model.raw_losses) < 100)  # both stopped early on divergence, or neither
    assert ours.steepest() == finder.suggestion()
    assert ours.steepest() is not None and math.isfinite(ours.steepest())


def test_lr_rises_from_min_to_max():
    test = RangeTest(
        min_lr=1e-4, max_lr=1.0, num_steps=4, mode="exponential", beta=0.98, early_stop_threshold=None
    )
    assert [test.lr_at(k) for k in range(5)] == [1e-4 * (1.0 / 1e-4) ** (k / 4) for k in range(5)]
    linear = RangeTest(
        min_lr=0.0001, max_lr=1.0, num_steps=4, mode="linear", beta=0.98, early_stop_threshold=None
    )
    assert linear.lr_at(4) == 1.0


def test_too_few_points_falls_back():
    test = RangeTest(
        min_lr=1e-4, max_lr=1.0, num_steps=100, mode="exponential", beta=0.98, early_stop_threshold=4.0
    )
    for k in range(11):
        test.record(test.lr_at(k), 1.0 - k * 0.05)
    assert test.steepest() is None  # the first ten and the last point are skipped: nothing left
    assert test.min_over_10() is None
    assert test.finish(fallback=0.1) == 0.1
    for k in range(11, 20):
        test.record(test.lr_at(k), 1.0 - k * 0.05)
    lowest = min(range(10, 19), key=lambda i: test.losses[i])  # not the first ten, not the last
    assert test.min_over_10() == test.lr_at(lowest) / 10
