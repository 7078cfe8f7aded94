"""The LR range test in the reference trainer (issue 9).

End to end (slow): two torchrun ranks run the ``range-test`` example against a real
server. The run raises the LR for two epochs' worth of steps while both ranks report
their loss with every step, switches to cosine decay from the suggested LR, and the ranks
put back the weights of before the test in the switch hook. Checked: both ranks switched
at the same step, with the same LR and the same (restored, initial) weights; that step is
the lr-finder's ``switched_at`` and the ``schedule_switch`` event's; the LR there is the
chosen one, which is the server's steepest suggestion (else min_over_10); the LRs before
it are the test's sweep; the finder's curve is the smoothed mean of what the ranks
reported (with the barrier) or their all_reduced loss; after the switch the loss is no
longer sent; training still reaches > 90% on digits.

Fast: the trainer's helpers (what a step reports, the restore hook, resume, the printed
line, the example schedule) and the loop's calls, without a server.
"""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import pytest
import torch
from lrserve.trainer import checkpoint
from lrserve.trainer.data import load_split, train_loader
from lrserve.trainer.loop import EpochContext, Evaluation, make_precision, train_epoch
from lrserve.trainer.model import make_model
from lrserve.trainer.range_test import (
    RangeTest,
    allreduce_mean,
    finder_line,
    weights_fingerprint,
)
from lrserve.trainer.schedules import resolve_schedule

from tests.trainer.harness import Trainer, admin, rank_order_mean

EPOCHS = 10
BETA = 0.98  # the server's default smoothing (LRRangeTest.beta)


# -- end to end ------------------------------------------------------------------------


def smoothed(losses: list[float], beta: float = BETA) -> list[float]:
    """Lightning's smoothing with bias correction, as the server records the curve."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["barrier", "allreduce"])
def test_two_ranks_range_test_switch_to_cosine_at_the_suggested_lr(server, tmp_path, mode):
    run_id = f"ddp-range-{mode}"
    trainer = Trainer(tmp_path, mode, server.url, "--run-id", run_id, "--epochs", str(EPOCHS),
                      "--schedule", "range-test", "--metric-mode", mode, "--no-progress", ranks=2,
                      exit_threads=sys.platform == "linux")
    assert trainer.wait() == 0, trainer.output()
    if sys.platform == "linux":  # the group was freed before exit: gloo's threads joined (ddp.Dist.close)
        threads = trainer.exit_threads()
        assert sorted(threads) == [0, 1], trainer.output()
        assert not [n for names in threads.values() for n in names if "gloo" in n], threads
    with admin(server.url) as http:
        finder = http.get(f"/v1/runs/{run_id}/lr-finder").json()
        history = http.get(f"/v1/runs/{run_id}/history", params={"max_points": 100_000}).json()
        run = http.get(f"/v1/runs/{run_id}").json()
    summary = trainer.summary()
    print(f"\nrange test, {mode}: {summary}")

    # the server's choice: done, switched, the steepest suggestion (else min_over_10)
    at, chosen = finder["switched_at"], finder["chosen"]
    assert finder["done"] and at is not None and run["switched_at"] == at
    rule = finder["suggestions"]["steepest"]
    assert chosen == (rule if rule is not None else finder["suggestions"]["min_over_10"])
    events = [e for e in history["events"] if e["kind"] == "schedule_switch"]
    assert [(e["step"], e["chosen"], e["lrs"]) for e in events] == [(at, chosen, [chosen])]

    # both ranks: one switch each, at the server's step, at the chosen LR, weights restored
    switches = [trainer.records(rank, "switch") for rank in (0, 1)]
    assert switches[0] == switches[1] and len(switches[0]) == 1, switches
    (switch,) = switches[0]
    assert switch["step"] == at and switch["lrs"] == [chosen]
    split = load_split(0)
    initial = weights_fingerprint(make_model(split.n_features, split.n_classes, seed=0))
    assert switch["weights"] == pytest.approx(initial, rel=1e-12)  # what training started from

    # the rank-0 summary and printed finder line say the same
    assert float(summary["chosen_lr"]) == chosen and int(summary["switched_at"]) == at
    assert f"lr-finder: chosen={chosen:.4g}" in trainer.out.read_text()
    assert float(summary["val_acc"]) > 0.9  # trained on from the restored weights at the chosen LR

    # identical LRs on both ranks at every step: the sweep up to the switch, then cosine down
    steps = [trainer.records(rank) for rank in (0, 1)]
    assert [(r["step"], r["lrs"]) for r in steps[0]] == [(r["step"], r["lrs"]) for r in steps[1]]
    lrs = [r["lrs"][0] for r in steps[0]]
    spe = len(lrs) // EPOCHS
    spec = resolve_schedule("range-test", steps_per_epoch=spe, epochs=EPOCHS, lr=0.1)
    sweep = [spec["min_lr"] * (spec["max_lr"] / spec["min_lr"]) ** (k / spec["num_steps"]) for k in range(at)]
    assert lrs[:at] == pytest.approx(sweep, rel=1e-9)
    assert lrs[at] == chosen and all(b <= a for a, b in zip(lrs[at:], lrs[at + 1:], strict=False))
    assert lrs[-1] < chosen / 10

    # the loss of every step of the test and none after; the curve is their (mean's) smoothing
    loss = history["metrics"]["loss"]
    assert sorted(set(loss["steps"])) == list(range(1, at + 1))
    per_step: dict[int, list[float]] = {}
    for step, _rank, value in sorted(zip(loss["steps"], loss["ranks"], loss["values"], strict=True)):
        per_step.setdefault(step, []).append(value)  # in rank order
    reported = [per_step[k] for k in range(1, at + 1)]
    assert all(len(values) == 2 for values in reported)
    if mode == "barrier":
        assert any(a != b for a, b in reported)  # each rank sent its own local loss
    else:
        assert all(a == b for a, b in reported)  # both sent the all_reduced one
    means = [rank_order_mean(values) for values in reported]
    assert finder["losses"] == pytest.approx(smoothed(means), rel=1e-9)
    assert finder["lrs"] == pytest.approx(sweep, rel=1e-9)  # each loss paired with the LR it trained at
    # back to the normal pattern: val_loss at the epoch ends only
    assert set(history["metrics"]["val_loss"]["steps"]) == {spe * e for e in range(1, EPOCHS + 1)}


# -- the helpers -----------------------------------------------------------------------

RANGE = {"type": "LRRangeTest", "min_lr": 1e-4, "max_lr": 10.0, "num_steps": 40,
         "then": {"type": "CosineAnnealingLR", "T_max": 100}}


def model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = make_model(4, 3, hidden=8, seed=0)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def train_a_little(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()


def test_other_schedules_report_nothing_and_save_nothing():
    model, opt = model_and_optimizer()
    test = RangeTest({"type": "StepLR", "step_size": 3}, model, opt)
    test.start(None)
    assert not test.enabled and not test.running
    assert test.step_metrics(torch.tensor(1.5)) is None and test.checkpoint_extra() == {}


def test_reports_the_loss_every_step_until_the_switch_restores_the_weights():
    model, opt = model_and_optimizer()
    test = RangeTest({**RANGE, "monitor": "train_batch_loss"}, model, opt, mean=lambda v: v / 2)
    test.start(None)
    before = weights_fingerprint(model)
    assert test.step_metrics(torch.tensor(3.0)) == {"train_batch_loss": 1.5}
    train_a_little(model, opt)
    assert weights_fingerprint(model) != before and opt.state
    assert not test.just_switched()

    test.on_switch(SimpleNamespace(last_epoch=17))
    assert weights_fingerprint(model) == before and not opt.state  # momentum buffers gone too
    assert test.switched_at == 17 and not test.running
    assert test.just_switched() and not test.just_switched()  # traced and printed once
    assert test.step_metrics(torch.tensor(3.0)) is None and test.checkpoint_extra() == {}


class Scaler:
    """GradScaler's state surface (fp16 runs only, which this CPU cannot make)."""

    def __init__(self) -> None:
        self.scale = 65536.0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale = state["scale"]


def test_the_switch_restores_the_fp16_loss_scale():
    model, opt = model_and_optimizer()
    scaler = Scaler()
    test = RangeTest(RANGE, model, opt, scaler=scaler)
    test.start(None)
    scaler.scale = 0.5  # the test's overflows halved it again and again
    test.on_switch(SimpleNamespace(last_epoch=9))
    assert scaler.scale == 65536.0


def test_a_job_resumed_mid_test_restores_the_checkpoints_saved_state(tmp_path):
    model, opt = model_and_optimizer()
    test = RangeTest(RANGE, model, opt)
    test.start(None)
    initial = weights_fingerprint(model)
    train_a_little(model, opt)
    sched = SimpleNamespace(state_dict=lambda: {"last_epoch": 3, "switched_at": None})
    checkpoint.save(tmp_path / "c.pt", epoch=1, model=model, optimizer=opt, scheduler=sched, scaler=None,
                    extra=test.checkpoint_extra())
    saved = checkpoint.load(tmp_path / "c.pt")

    model2, opt2 = model_and_optimizer()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optimizer"])
    resumed = RangeTest(RANGE, model2, opt2)
    resumed.start(saved)
    assert resumed.running and resumed.step_metrics(2.0) == {"loss": 2.0}
    resumed.on_switch(SimpleNamespace(last_epoch=30))
    assert weights_fingerprint(model2) == initial  # the pre-test weights, not the checkpoint's


def test_a_job_resumed_after_the_switch_reports_no_loss():
    model, opt = model_and_optimizer()
    test = RangeTest(RANGE, model, opt)
    test.start({"scheduler": {"switched_at": 12}})
    assert not test.running and test.switched_at == 12 and not test.just_switched()
    assert test.step_metrics(1.0) is None


def test_allreduce_mean_divides_the_sum_over_ranks():
    assert allreduce_mean(lambda values: [v * 2 + 1 for v in values], 2)(3.0) == 3.5


def test_finder_line():
    finder = {"chosen": 0.2342, "suggestions": {"steepest": 0.2342, "min_over_10": 0.06373},
              "switched_at": 40, "num_steps": 46, "lrs": [1e-4, 1.734]}
    assert finder_line(finder) == ("lr-finder: chosen=0.2342 steepest=0.2342 min_over_10=0.06373 "
                                   "switched_at=40 points=2/46 lr 0.0001..1.734")
    short = {"chosen": 0.1, "suggestions": {"steepest": None, "min_over_10": None}, "switched_at": 2,
             "num_steps": 2, "lrs": [1e-4, 0.03]}
    assert finder_line(short).endswith("(too few points for a suggestion: the run's base LR, --lr)")


def test_range_test_example_is_sized_to_the_job():
    spec = resolve_schedule("range-test", steps_per_epoch=23, epochs=10, lr=0.1)
    assert spec["type"] == "LRRangeTest" and spec["num_steps"] == 46
    assert (spec["min_lr"], spec["max_lr"]) == (1e-4, 10.0)
    # the cosine never passes its minimum (and rises again), wherever the test stops
    assert spec["then"] == {"type": "CosineAnnealingLR", "T_max": 230}


class RecordingScheduler:
    """What ``train_epoch`` passes to ``step()``; the LR stays put."""

    def __init__(self) -> None:
        self.last_epoch = 0
        self.calls: list[dict[str, float] | None] = []
        self.logged: list[dict[str, float]] = []

    def step(self, metrics: dict[str, float] | None = None) -> None:
        self.last_epoch += 1
        self.calls.append(metrics)

    def log(self, **metrics: float) -> None:
        self.logged.append(metrics)


@pytest.mark.parametrize("step_per", ["batch", "epoch"])
def test_the_loop_reports_the_loss_with_every_step_of_the_test(step_per):
    split = load_split(0)
    loader = train_loader(split, 512, 0, 1, seed=0, pin_memory=False)  # 3 batches
    model = make_model(split.n_features, split.n_classes, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    test = RangeTest(RANGE, model, opt)
    test.start(None)
    sched = RecordingScheduler()
    ctx = EpochContext(model, opt, sched, loader, make_precision(torch.device("cpu"), "off"), step_per,
                       on_step=lambda step, epoch: None, on_batch=lambda: None,
                       step_metrics=test.step_metrics)
    evaluation = Evaluation(0.5, 0.9, 0.5, 0.9)
    train_loss, _ = train_epoch(ctx, 0, lambda: evaluation, lambda ev: {"val_loss": ev.local_loss})
    expected = len(loader) if step_per == "batch" else 1
    assert len(sched.calls) == expected and all(c is not None and "loss" in c for c in sched.calls)
    assert all(math.isfinite(c["loss"]) for c in sched.calls)
    assert sched.calls[-1]["val_loss"] == 0.5  # the epoch's report rides on the same step
    if step_per == "epoch":
        assert sched.calls[-1]["loss"] == train_loss  # one step per epoch: the epoch's mean

    test.on_switch(sched)  # after the switch: plain steps again, the report alone at the end
    sched.calls.clear()
    train_epoch(ctx, 1, lambda: evaluation, lambda ev: {"val_loss": ev.local_loss})
    assert sched.calls[-1] == {"val_loss": 0.5} and all(c is None for c in sched.calls[:-1])
