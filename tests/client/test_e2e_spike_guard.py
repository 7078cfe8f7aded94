"""``on_spike`` against the real app, in process: two ranks, a spike logged on one of them."""

from __future__ import annotations

import math

import pytest
import torch
from lrserve.client import RemoteScheduler
from lrserve.service import create_app
from lrserve.service.settings import Settings
from starlette.testclient import TestClient

INNER = {"type": "CosineAnnealingLR", "T_max": 400}
GUARD = {"type": "SpikeGuard", "schedule": INNER}  # the documented defaults


@pytest.fixture
def api(tmp_path):
    with TestClient(create_app(Settings(db=f"sqlite:///{tmp_path}/t.db"))) as client:
        yield client


def optimizer():
    return torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)


def loss(k):
    return 2.0 * math.exp(-k / 100) + 0.3 + 0.01 * math.cos(k)


@pytest.fixture
def made():
    """Schedulers made by the test, closed whatever happens (their threads must not leak)."""
    scheds = []
    yield scheds
    for sched in scheds:
        sched.close()


def ranks(api, schedule, calls, made, run_id="job"):
    opts = [optimizer() for _ in range(2)]
    scheds = [
        RemoteScheduler(opts[r], schedule, run_id=run_id, rank=r, world_size=2, http_client=api,
                        on_spike=lambda event, r=r: calls[r].append(event))
        for r in range(2)
    ]
    made.extend(scheds)
    return opts, scheds


def test_every_rank_gets_on_spike_once_at_the_same_step(api, made):
    calls = {0: [], 1: []}
    opts, scheds = ranks(api, GUARD, calls, made)
    lrs = {0: [], 1: []}
    seen_at = {0: [], 1: []}
    # the backoff lands at the first step no rank has been handed yet: a window (about a
    # second of training, default time_budget_s) after the report arrives
    k = 0
    while not (calls[0] and calls[1]) and k < 50_000:
        k += 1
        for r, sched in enumerate(scheds):
            opts[r].step()
            value = float("nan") if (k, r) == (60, 1) else loss(k)
            sched.log(loss=value)  # feeds the guard in the background
            before = len(calls[r])
            sched.step()
            if len(calls[r]) > before:
                seen_at[r].append(sched.last_epoch)
            lrs[r].append(sched.get_last_lr())
        if k <= 60:  # every report is in, rank 0's too: last_good_step is good on every rank
            assert scheds[0].flush(10.0) and scheds[1].flush(10.0)
    assert lrs[0] == lrs[1]
    assert len(calls[0]) == len(calls[1]) == 1 and calls[0] == calls[1]
    event = calls[0][0]
    assert event["step"] == 60 and event["rank"] == 1 and event["value"] == "NaN"
    assert event["last_good_step"] == 59 and event["applied_at"] > 60
    assert seen_at[0] == seen_at[1] == [event["applied_at"]]
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer(), T_max=400)
    inner = []
    for _ in range(k):
        cosine.optimizer.step()
        cosine.step()
        inner.append(cosine.get_last_lr())
    first = event["applied_at"] - 1
    assert lrs[0][:first] == inner[:first]  # bit-identical before the spike
    assert lrs[0][first] == [inner[first][0] * 0.5]


def test_max_spikes_exceeded_stops_every_rank(api, made):
    calls = {0: [], 1: []}
    opts, scheds = ranks(api, {**GUARD, "max_spikes": 0}, calls, made, run_id="stops")
    stopped_at = {}
    for k in range(1, 50_000):
        for r, sched in enumerate(scheds):
            if r in stopped_at:
                continue
            opts[r].step()
            sched.log(loss=float("inf") if (k, r) == (5, 0) else loss(k))
            sched.step()
            if sched.should_stop:
                stopped_at[r] = sched.last_epoch
        if k == 5:
            assert scheds[0].flush(10.0)
        if len(stopped_at) == 2:
            break
    assert stopped_at[0] == stopped_at[1] == calls[0][0]["applied_at"]
    assert calls[0] == calls[1] and len(calls[0]) == 1


def test_a_bare_metric_goes_to_the_guard(api, made):
    calls = {0: [], 1: []}
    opt = optimizer()
    sched = RemoteScheduler(opt, GUARD, run_id="bare", http_client=api, on_spike=calls[0].append)
    made.append(sched)
    for _ in range(5):
        opt.step()
        sched.step(float("nan"))
    sched.flush(10.0)
    while not calls[0] and sched.last_epoch < 50_000:
        opt.step()
        sched.step()
    assert len(calls[0]) == 1 and calls[0][0]["step"] == 1
