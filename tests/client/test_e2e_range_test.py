"""A range test through the client: loss every step, the switch hook, training goes on."""

from __future__ import annotations

import copy

import torch
from lrserve.client import RemoteScheduler
from lrserve.service import create_app
from lrserve.service.settings import Settings
from starlette.testclient import TestClient

RANGE = {"type": "LRRangeTest", "min_lr": 1e-4, "max_lr": 10.0, "num_steps": 100,
         "then": {"type": "CosineAnnealingLR", "T_max": 200}}


def test_range_test_then_training_from_restored_weights(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    y = x @ torch.linspace(-1, 1, 8).unsqueeze(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    switches = []

    def restore(sched):
        switches.append(sched.last_epoch)
        model.load_state_dict(saved[0])
        opt.load_state_dict(saved[1])

    with TestClient(create_app(Settings(db=f"sqlite:///{tmp_path}/r.db"))) as api:
        sched = RemoteScheduler(opt, RANGE, run_id="rt", http_client=api, steps_per_epoch=16,
                                on_schedule_switch=restore)
        losses = []
        for k in range(1, 400):
            batch = slice((k * 32) % 512, (k * 32) % 512 + 32)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if not switches:
                sched.step({"loss": loss.item()})  # the range test wants the loss of every step
            else:
                sched.step()
        finder = api.get("/v1/runs/rt/lr-finder").json()
        sched.close()
    assert len(switches) == 1 and switches[0] == finder["switched_at"]
    assert finder["done"] and finder["chosen"] is not None
    assert finder["switched_at"] < 100  # the loss exploded at the high LRs: stopped early
    # after the switch the cosine schedule runs from the chosen LR, not from the test's LRs
    assert sched.get_last_lr()[0] < finder["chosen"]
    first_after = losses[switches[0]]  # trained right after the hook restored the weights
    start = max(losses[:10])
    assert max(losses[: switches[0]]) > 10 * start  # the test drove the loss up...
    assert first_after < 1.5 * start  # ...and training went on from the saved weights
    assert sum(losses[-50:]) / 50 < first_after  # and learns at the chosen LR
