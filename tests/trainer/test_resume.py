"""Resume from a checkpoint after ``kill -9`` mid-epoch: the job goes on as if never stopped.

One job trains straight through; another, identical but for its run id, is killed in the
middle of epoch 3 and started again from its checkpoint (taken after epoch 2). The steps
of epoch 3 that the first attempt already took are final on the server, so the second
attempt must apply exactly the values the first applied, and, since model, optimizer and
data order are restored too, end bit for bit where the uninterrupted job ended.
"""

from __future__ import annotations

import pytest
import torch

from tests.trainer.harness import Trainer, wait_until

pytestmark = pytest.mark.slow

ARGS = ("--epochs", "5", "--batch-size", "8", "--lr", "0.02", "--threads", "1", "--no-progress")


def test_kill_mid_epoch_and_resume_replays_identical_values(server, tmp_path):
    straight = Trainer(tmp_path, "straight", server.url, "--run-id", "straight", *ARGS)
    ckpt = tmp_path / "ckpt.pt"
    first = Trainer(tmp_path, "resumed", server.url, "--run-id", "resumed", "--checkpoint", str(ckpt), *ARGS)
    wait_until("epoch 3", lambda: sum(r["epoch"] == 2 for r in first.records(0)) >= 5, first, timeout=120)
    first.kill()
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] >= 2 and saved["run_id"] == "resumed"  # later if this machine is slow
    killed_at = first.records(0)[-1]["step"]
    assert killed_at > saved["scheduler"]["last_epoch"]  # steps to replay

    second = Trainer(tmp_path, "resumed", server.url, "--checkpoint", str(ckpt), *ARGS)  # id from it
    assert second.wait() == 0, second.output()
    assert straight.wait() == 0, straight.output()

    expected = {r["step"]: r["lrs"] for r in straight.records(0)}
    applied = second.records(0)  # both attempts: the replayed steps appear twice
    replayed = [r for r in applied if saved["scheduler"]["last_epoch"] < r["step"] <= killed_at]
    assert len(replayed) >= 2 * (killed_at - saved["scheduler"]["last_epoch"])
    assert all(r["lrs"] == expected[r["step"]] for r in applied)
    assert {r["step"] for r in applied} == set(expected)
    assert len(set(expected_lr[0] for expected_lr in expected.values())) > 2  # the LR did move

    done = [(e["epoch"], e["train_loss"], e["val_loss"]) for e in second.records(0, "epoch")]
    assert done == [(e["epoch"], e["train_loss"], e["val_loss"]) for e in straight.records(0, "epoch")]
    summary = second.summary()
    assert summary["val_acc"] == straight.summary()["val_acc"] and float(summary["val_acc"]) > 0.9
    print(f"\nresumed: {summary}")
